"""The SPIFFE Workload API client: where the agent is, the watches, and when to stop retrying.

**Why a trio-native client, not the ``spiffe`` package over grpcio.** gRPC is plain HTTP/2
(the ``h2`` library weft already uses), 5-byte length-prefixed protobuf messages and a
``grpc-status`` trailer (`weft.grpc_h2`), and the Workload API needs six messages
(`weft.spiffe_wire`). Built on those, the client runs inside weft's own trio processes as one
more task, without threads and without grpcio: grpcio's core starts threads and keeps
process-global state that is unsafe across ``fork`` unless it was never created before the
fork (or fork support is configured with care), and weft's supervisor forks all the time. With
no grpcio in any weft process, there is nothing to get wrong around a fork. The ``spiffe`` and
``grpcio`` packages stay test-only: the oracle of the codec and the agent of the tests.

What this module owns:

* `parse_endpoint`: the ``SPIFFE_ENDPOINT_SOCKET`` syntax of the SPIFFE Workload Endpoint
  spec (§4): ``unix:`` with an absolute path and nothing else (``unix:///run/agent.sock`` or
  ``unix:/run/agent.sock``), or ``tcp://<IP>:<port>`` with nothing else (an IP, never a host
  name). Every refusal says what is wrong. `resolve_endpoint` applies the spec's fallback: the
  configured value, else the environment variable.
* `WorkloadAPIClient`: ``watch_x509`` and ``watch_jwt_bundles`` keep one stream each open for
  as long as they run, reconnecting on their own; ``fetch_jwt_svid`` is one unary call. Every
  request carries the ``workload.spiffe.io: true`` metadata the spec requires (§3).
* The retry policy (`retry_or_stop`, `Backoff`) and the state a readiness probe reports
  (`WatchState`).

**Stop conditions** (Workload Endpoint spec §6 and Appendix A, quoted):
INVALID_ARGUMENT: "Clients encountering the "InvalidArgument" status code SHOULD NOT retry, as
this indicates that an error has been made in the client implementation, and is not
recoverable"; UNIMPLEMENTED: "Report an error, do not retry". A watch raises `WatchStopped`
for those. Everything else is retried with a backoff: UNAVAILABLE and an unreachable agent
("MAY retry with a backoff"), PERMISSION_DENIED ("MAY retry with a backoff, as such a response
could be encountered if the service implementation is eventually consistent"; it is reported
on every attempt, since it usually means a missing registration entry), and any other status.
A stream that ends with OK is reconnected: "the client SHOULD immediately establish a new
connection" (Workload API spec §4.2).

**Backoff**: exponential from `BACKOFF_BASE` (1 s) doubling up to `BACKOFF_CAP` (30 s), with
"equal jitter" (a delay drawn in [d/2, d]) so that many hosts losing one agent fleet at once
spread their reconnects, and reset by any message received. 1 s and 30 s are go-spiffe's
``InitialDelay`` and ``MaxDelay`` (``v2/workloadapi``), whose steps grow linearly and without
jitter; doubling reaches the cap in five steps instead of thirty. The first reconnect after a
healthy stream ended thus comes after 0.5-1 s: "immediately" in the spirit of §4.2, yet never a
tight loop against an agent that accepts and closes at once.

**A PERMISSION_DENIED after an SVID was issued** (spec §5.2.1: "the client SHOULD cease using
the redacted SVIDS") is reported through `on_error` like any other failure and the watch keeps
retrying; the X.509 update last delivered is not withdrawn here. The consumer decides
(`weft.identity` keeps serving it until it expires): a SPIRE agent restarting answers
PERMISSION_DENIED until its cache is synced, and withdrawing the SVID then would take every
worker out of service for an agent restart. A response that lists fewer SVIDs (a redaction
the agent made on purpose) is delivered like any update and applied at once.

The clock and the sleep are the caller's (`sleep`, `random` arguments), so the tests drive
the backoff without waiting for it.
"""

from __future__ import annotations

import ipaddress
import os
import random as _random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import trio

from weft.grpc_h2 import GrpcError, Status, open_call
from weft.spiffe_wire import (
    JWTBundlesRequest,
    JWTBundlesResponse,
    JWTSVIDRequest,
    JWTSVIDResponse,
    WireError,
    X509SVIDRequest,
    X509SVIDResponse,
)

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "ENDPOINT_ENV",
    "Backoff",
    "Endpoint",
    "EndpointError",
    "WatchState",
    "WatchStopped",
    "WorkloadAPIClient",
    "check_jwt_bundles",
    "check_x509",
    "parse_endpoint",
    "resolve_endpoint",
    "retry_or_stop",
]

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
SECURITY_HEADER = {"workload.spiffe.io": "true"}  # Workload Endpoint spec §3, case-sensitive
BACKOFF_BASE = 1.0  # seconds: go-spiffe's InitialDelay
BACKOFF_CAP = 30.0  # seconds: go-spiffe's MaxDelay
CONNECT_TIMEOUT = 5.0  # a local agent accepts at once; more means it is stuck
FETCH_TIMEOUT = 10.0  # a FetchJWTSVID round trip (SPIRE signs locally or asks its server)
_SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path is 108 with the NUL)

_FETCH_X509 = "/SpiffeWorkloadAPI/FetchX509SVID"
_FETCH_JWT_BUNDLES = "/SpiffeWorkloadAPI/FetchJWTBundles"
_FETCH_JWT_SVID = "/SpiffeWorkloadAPI/FetchJWTSVID"

# Statuses after which retrying cannot help (spec §6, Appendix A): a watch stops on them.
_STOP = {
    Status.INVALID_ARGUMENT: "the agent says weft's request is malformed (InvalidArgument: the "
    "workload.spiffe.io header?); not retrying: this is a bug in weft",
    Status.UNIMPLEMENTED: "the agent does not implement this Workload API call "
    "(Unimplemented); not retrying",
}


class EndpointError(ValueError):
    """The Workload API endpoint is missing or not valid; the message says what to change."""


class WatchStopped(Exception):
    """The agent answered with a status after which the spec says not to retry."""

    def __init__(self, error: GrpcError, why: str) -> None:
        super().__init__(f"{why}: {error.message}")
        self.error = error


# -- where the agent is -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed Workload API address: a unix socket `path`, or a TCP `host` (an IP) and
    `port`. `uri` is the value it was parsed from, for messages."""

    uri: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def kind(self) -> str:
        return "unix" if self.path is not None else "tcp"

    @property
    def address(self) -> str | tuple[str, int]:
        if self.path is not None:
            return self.path
        assert self.host is not None and self.port is not None
        return (self.host, self.port)


def parse_endpoint(value: str) -> Endpoint:
    """Parse a ``SPIFFE_ENDPOINT_SOCKET`` value. Raises EndpointError naming the problem."""
    where = f"Workload API endpoint {value!r}"
    if not value or value != value.strip():
        raise EndpointError(f"{where}: empty or surrounded by spaces")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise EndpointError(f"{where}: not a valid URI ({e})") from None
    if parts.scheme not in ("unix", "tcp"):
        raise EndpointError(
            f"{where}: the scheme must be unix or tcp "
            "(unix:///path/to/agent.sock or tcp://127.0.0.1:8081)"
        )
    if "?" in value:
        raise EndpointError(f"{where}: a query is not allowed")
    if "#" in value:
        raise EndpointError(f"{where}: a fragment is not allowed")
    if "@" in parts.netloc:
        raise EndpointError(f"{where}: user information is not allowed")
    if parts.scheme == "unix":
        if parts.netloc:
            raise EndpointError(
                f"{where}: a unix URI has no authority; write the absolute path after "
                f"three slashes (unix:///{parts.netloc}{parts.path})"
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise EndpointError(f"{where}: the socket path must be absolute")
        if "\x00" in path:
            raise EndpointError(f"{where}: the socket path holds a NUL byte")
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise EndpointError(
                f"{where}: the socket path is longer than the {_SUN_PATH_MAX} bytes a unix "
                "socket address holds"
            )
        return Endpoint(value, path=path)
    if parts.path:
        raise EndpointError(f"{where}: a tcp URI has no path (tcp://127.0.0.1:8081)")
    host = parts.hostname or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise EndpointError(
            f"{where}: the host must be an IP address, not a name (the spec forbids resolving it)"
        ) from None
    if port is None or port == 0:
        raise EndpointError(f"{where}: a tcp URI needs a port (tcp://127.0.0.1:8081)")
    return Endpoint(value, host=str(ip), port=port)


def resolve_endpoint(configured: str | None, environ: Mapping[str, str] = os.environ) -> Endpoint:
    """The endpoint to use: `configured` when set, else ``$SPIFFE_ENDPOINT_SOCKET`` (spec §4:
    clients "MUST fall back to the environment variable"). Raises EndpointError."""
    if configured:
        return parse_endpoint(configured)
    value = environ.get(ENDPOINT_ENV)
    if not value:
        raise EndpointError(
            f"no Workload API endpoint: set [spiffe] endpoint or ${ENDPOINT_ENV} "
            "(e.g. unix:///run/spire/agent.sock)"
        )
    return parse_endpoint(value)


# -- retry policy -------------------------------------------------------------------------------


def retry_or_stop(error: GrpcError) -> str | None:
    """None when the failed call should be retried after a backoff; else why not (spec §6)."""
    return _STOP.get(error.code)


class Backoff:
    """Exponential backoff with equal jitter: attempt n waits in [d/2, d], d = base * 2**n
    capped at `cap`. `reset` after a success."""

    __slots__ = ("attempt", "base", "cap", "random")

    def __init__(
        self,
        base: float = BACKOFF_BASE,
        cap: float = BACKOFF_CAP,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.base, self.cap, self.random = base, cap, random
        self.attempt = 0

    def next(self) -> float:
        d = min(self.cap, self.base * 2 ** min(self.attempt, 62))
        self.attempt += 1
        return d / 2 + self.random() * d / 2

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class WatchState:
    """What a watch reports, for readiness and ``weft status``. Times are wall-clock
    (``time.time()``) since they are shown to people and written to files."""

    name: str
    connected: bool = False  # a stream is open and has delivered a message
    updates: int = 0  # messages delivered
    last_update: float | None = None
    failures: int = 0  # failed attempts in a row
    last_error: str | None = None  # kept after a recovery, with its time
    last_error_code: str | None = None
    last_error_at: float | None = None
    retry_in: float | None = None  # the backoff being waited, while it lasts
    stopped: str | None = None  # why the watch gave up (a stop condition)

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# -- checks of mandatory fields (Workload API spec §4.5) ----------------------------------------


def check_x509(resp: X509SVIDResponse) -> None:
    """Raise WireError if a mandatory field is empty (spec §4.5: report and discard)."""
    if not resp.svids:
        raise WireError("X509SVIDResponse without any SVID")
    for i, s in enumerate(resp.svids):
        for name in ("spiffe_id", "x509_svid", "x509_svid_key", "bundle"):
            if not getattr(s, name):
                raise WireError(f"X509SVIDResponse: SVID {i} ({s.spiffe_id!r}) has no {name}")


def check_jwt_bundles(resp: JWTBundlesResponse) -> None:
    """Raise WireError if the response has no bundle (the agent's own is mandatory)."""
    if not resp.bundles:
        raise WireError("JWTBundlesResponse without any bundle")
    for td, jwks in resp.bundles.items():
        if not td or not jwks:
            raise WireError(f"JWTBundlesResponse: an empty trust domain or bundle ({td!r})")


# -- the client ---------------------------------------------------------------------------------

OnError = Callable[[GrpcError | WireError], Awaitable[None] | None]


async def _call_back(fn: Callable[..., Awaitable[None] | None] | None, arg: object) -> None:
    if fn is not None:
        result = fn(arg)
        if result is not None:
            await result


class WorkloadAPIClient:
    """The Workload API as weft uses it: two watches and a unary fetch, over `endpoint`."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
        random: Callable[[], float] = _random.random,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.endpoint = endpoint
        self._sleep = sleep
        self._random = random
        self._backoff = (backoff_base, backoff_cap)
        self.connect_timeout = connect_timeout
        self.x509_state = WatchState("x509")
        self.jwt_state = WatchState("jwt_bundles")

    def _backoff_for(self) -> Backoff:
        return Backoff(*self._backoff, random=self._random)

    async def watch_x509(
        self,
        on_update: Callable[[X509SVIDResponse], Awaitable[None] | None],
        on_error: OnError | None = None,
    ) -> None:
        """Stream X.509-SVID updates into `on_update` until cancelled. A message missing a
        mandatory field is reported to `on_error` and discarded; a failed stream is reported
        to `on_error` and reconnected after the backoff. Raises WatchStopped on a stop
        condition. `on_update` runs inside the watch: a slow one delays the next message."""
        await self._watch(
            _FETCH_X509,
            X509SVIDRequest().encode(),
            X509SVIDResponse.decode,
            check_x509,
            self.x509_state,
            on_update,
            on_error,
        )

    async def watch_jwt_bundles(
        self,
        on_update: Callable[[JWTBundlesResponse], Awaitable[None] | None],
        on_error: OnError | None = None,
    ) -> None:
        """`watch_x509` for the JWT bundles (``FetchJWTBundles``)."""
        await self._watch(
            _FETCH_JWT_BUNDLES,
            JWTBundlesRequest().encode(),
            JWTBundlesResponse.decode,
            check_jwt_bundles,
            self.jwt_state,
            on_update,
            on_error,
        )

    async def _watch(
        self,
        path: str,
        request: bytes,
        decode: Callable[[bytes], Any],
        check: Callable[[Any], None],
        state: WatchState,
        on_update: Callable[[Any], Awaitable[None] | None],
        on_error: OnError | None,
    ) -> None:
        backoff = self._backoff_for()
        ep = self.endpoint
        while True:
            try:
                async with open_call(
                    ep.kind,
                    ep.address,
                    path,
                    request,
                    peer=ep.uri,
                    metadata=SECURITY_HEADER,
                    connect_timeout=self.connect_timeout,
                ) as call:
                    while (message := await call.receive()) is not None:
                        try:
                            update = decode(message)
                            check(update)
                        except WireError as e:
                            _note_error(state, "DATA", f"discarded a message: {e}")
                            await _call_back(on_error, e)
                            continue
                        backoff.reset()
                        state.connected = True
                        state.failures = 0
                        state.updates += 1
                        state.last_update = time.time()
                        await _call_back(on_update, update)
                raise GrpcError(Status.OK, f"{ep.uri} ended the stream")  # spec §4.2: reconnect
            except GrpcError as e:
                state.connected = False
                state.failures += 1
                _note_error(state, e.code.name, e.message)
                await _call_back(on_error, e)
                why = retry_or_stop(e)
                if why is not None:
                    state.stopped = why
                    raise WatchStopped(e, why) from None
            delay = backoff.next()
            state.retry_in = delay
            try:
                await self._sleep(delay)
            finally:
                state.retry_in = None

    async def fetch_jwt_svid(
        self,
        audience: Sequence[str],
        spiffe_id: str = "",
        *,
        timeout: float = FETCH_TIMEOUT,
    ) -> JWTSVIDResponse:
        """One ``FetchJWTSVID`` call (no retry: the caller has a request waiting on it).
        Raises GrpcError (DEADLINE_EXCEEDED after `timeout` seconds), WireError, or
        ValueError for an empty audience (the agent would refuse it)."""
        if not audience or not all(audience):
            raise ValueError("a JWT-SVID needs at least one non-empty audience")
        ep = self.endpoint
        request = JWTSVIDRequest(tuple(audience), spiffe_id).encode()
        metadata = {**SECURITY_HEADER, "grpc-timeout": f"{max(1, int(timeout * 1000))}m"}
        with trio.move_on_after(timeout) as cs:
            async with open_call(
                ep.kind,
                ep.address,
                _FETCH_JWT_SVID,
                request,
                peer=ep.uri,
                metadata=metadata,
                connect_timeout=min(timeout, self.connect_timeout),
            ) as call:
                message = await call.receive()
                if message is None:
                    raise GrpcError(Status.INTERNAL, f"{ep.uri} answered FetchJWTSVID empty")
                resp = JWTSVIDResponse.decode(message)
                if await call.receive() is not None:  # else the trailers said OK
                    raise GrpcError(Status.INTERNAL, f"{ep.uri} sent two FetchJWTSVID answers")
        if cs.cancelled_caught:
            raise GrpcError(Status.DEADLINE_EXCEEDED, f"{ep.uri}: no JWT-SVID in {timeout:g}s")
        if not resp.svids or not all(s.spiffe_id and s.svid for s in resp.svids):
            raise WireError("JWTSVIDResponse without a complete JWT-SVID")
        return resp


def _note_error(state: WatchState, code: str, message: str) -> None:
    state.last_error = message
    state.last_error_code = code
    state.last_error_at = time.time()
