"""The terminal handler of every route: send the request to an endpoint, return its response.

One `Forwarder` per destination per worker. It owns the destination's balancer, in-flight
counts and header policy; connections come from `weft.connection`, and the exchange itself is
the upstream adapter's (`weft.http.upstream.UpstreamConnection.exchange`, HTTP/1.1 in
`weft.http.h1_client`). This module imports no protocol library.

A request, step by step:

1. **Pick** an endpoint (`weft.dst`), skipping those the destination's observer excludes, and
   count it in flight until the response body ends.
2. **Rewrite** the head: hop-by-hop fields out, forwarding fields and Via in, Host by the
   destination's rule, the request id, the body's framing (`weft.http.headers`).
3. **Acquire** a connection (reused or new; the pool may answer 503/502/504).
4. **Exchange** on it (the adapter sends, streams the body, reads the head) and report the
   attempt's outcome to the observer (`weft.outcome`).
5. **Return** the adapter's Response with the response head rewritten the same way; its body
   streams from the upstream and frees the connection when it ends.

A reused connection that turns out dead (closed by the upstream while idle, no response byte
received) is retried once on a fresh connection, as Go's http.Transport does: only when the
request has no body and its method is idempotent (RFC 9110 §9.2.2), because nothing else
guarantees the upstream did not act on it.

Errors the proxy makes are returned as responses (so user middleware sees a 502 like any other
response) whose body names the failure in plain words; the detail goes to the log and
`request.ctx["error"]` carries the reason word for the access log.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Container, Sequence
from typing import Protocol

import trio

from weft import grpc, outcome
from weft.arena_pool import BuffersExhausted
from weft.connection import EndpointPool
from weft.dst import HashKeySource, Position, make_balancer
from weft.http.errors import UpstreamError, error_response
from weft.http.headers import (
    fields_valid,
    forward_request_headers,
    forward_response_headers,
    has_field,
    is_trusted,
    is_upgrade_request,
)
from weft.http.messages import Body, HeaderList, Request, Response
from weft.http.upstream import Outgoing, UpstreamConnection
from weft.outcome import Observer
from weft.schema import Config, Destination

log = logging.getLogger("weft.forward")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# What the client is told for each failure (the detail, which may name addresses or carry
# the upstream's bytes, goes only to the log).
PUBLIC_REASON = {
    "connect_error": "could not connect to the upstream",
    "connect_timeout": "timed out connecting to the upstream",
    "upstream_reset": "the upstream closed the connection",
    "bad_response": "the upstream sent an invalid response",
    "upstream_header_timeout": "the upstream did not answer in time",
    "upstream_body_timeout": "the upstream stalled",
    "upstream_send_timeout": "the upstream stopped reading the request",
    "request_timeout": "request_total exceeded",
    "per_try_timeout": "the upstream did not answer within the time allowed for one try",
    "pool_full": "too many requests wait for an upstream connection",
    "no_endpoint": "no upstream endpoint available",
    "breaker_open": "the upstream is failing; its circuit breaker is open",
    "draining": "the server is shutting down",
    "buffers_exhausted": BuffersExhausted.public,
    "upstream_tls": "TLS with the upstream failed",  # UpstreamTLSError.public names why
}


class Inflight(Protocol):
    """In-flight requests per endpoint of one destination (what least_conn balances on)."""

    def add(self, index: int, delta: int) -> None: ...

    def view(self) -> Sequence[int]: ...


class LocalInflight:
    """Counts of this process alone (one worker, or tests); the supervisor's workers use
    shared-memory counts summed over every worker instead (`weft.workers.shared`)."""

    __slots__ = ("counts",)

    def __init__(self, n: int) -> None:
        self.counts = [0] * n

    def add(self, index: int, delta: int) -> None:
        self.counts[index] += delta

    def view(self) -> Sequence[int]:
        return self.counts


class Forwarder:
    """Sends requests of one destination to its endpoints."""

    def __init__(
        self,
        dest: Destination,
        pools: Sequence[EndpointPool],
        config: Config,
        inflight: Inflight | None = None,
        observer: Observer | None = None,
        position: Position | None = None,
    ) -> None:
        self.dest = dest
        self.pools = list(pools)
        self.config = config
        self.balancer = make_balancer(
            dest.strategy,
            [e.weight for e in dest.endpoints],
            balance_factor=dest.hash_balance_factor,
            # By address: a changed endpoint list moves only the keys of changed endpoints.
            names=[e.authority for e in dest.endpoints],
            position=position,  # shared by the workers (round_robin, weighted)
        )
        self.hash_source = HashKeySource.parse(dest.hash_key) if dest.hash_key else None
        self.endpoint_weights = [e.weight for e in dest.endpoints]
        self.counts: Inflight = inflight if inflight is not None else LocalInflight(len(self.pools))
        # Learns from every attempt and tells the balancer what to skip (weft.outcome).
        self.observer = observer
        # Only these strategies look at in-flight counts; the others skip summing them.
        self.needs_counts = dest.strategy == "least_conn" or (
            dest.strategy == "consistent_hash" and dest.hash_balance_factor > 0
        )
        self.via = config.via.encode()
        # The Via entries weft adds, by the HTTP version of the message it received.
        self.via_request = {"1.1": b"1.1 " + self.via, "1.0": b"1.0 " + self.via}
        self.via_response = b"1.1 " + self.via
        self.rid_header = config.request_id_header.encode()
        self.trusted = config.trusted_proxies
        host_header = dest.host_header
        self.host_mode = host_header if host_header in ("pass", "endpoint") else "literal"
        self.host_literal = host_header.encode()

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._forward(request)
        except UpstreamError as e:
            if e.reason == "request_timeout" and request.ctx.get("per_try_deadline"):
                # The deadline that ran out was the retry middleware's per-try one.
                e.reason = "per_try_timeout"
            request.ctx["error"] = e.reason
            log.info("request %s to %s: %s", request.id, request.ctx.get("endpoint", "-"), e.detail)
            public = getattr(e, "public", None) or PUBLIC_REASON.get(e.reason, "upstream error")
            if e.reason == "request_timeout" and request.ctx.get("deadline_source"):
                public = grpc.DEADLINE_REASON
            return error_response(
                e.status,
                public,
                request.id,
                close=False,
                retry_after=e.retry_after if e.status == 503 else None,
            )

    def _pick(self, request: Request) -> int | None:
        key = None
        if self.hash_source is not None:
            key = self.hash_source.extract(
                request.headers.raw, request.client[0], request.path.encode("latin-1")
            )
        counts = self.counts.view() if self.needs_counts else ()
        obs = self.observer
        tried = request.ctx.get("tried")
        if obs is None and not tried:
            return self.balancer.pick(key=key, inflight=counts)
        excluded: Container[int] = obs.excluded() if obs is not None else ()
        if tried:
            # A retry (Envoy's previous_hosts): an endpoint not tried yet, chosen at random by
            # weight, so that retries do not move the shared round-robin position (a retry that
            # took the next slot would make every first try after it meet the same failing
            # endpoint); when none is left, any usable one, by the balancer.
            fresh = [i for i in range(len(self.pools)) if i not in excluded and i not in tried]
            while fresh:
                idx = (
                    random.choices(fresh, [self.endpoint_weights[i] for i in fresh])[0]
                    if len(fresh) > 1
                    else fresh[0]
                )
                verdict = obs.admit(idx) if obs is not None else 0
                if verdict <= 0:
                    if verdict < 0:
                        request.ctx["trial"] = idx
                    return idx
                fresh.remove(idx)
        pick = self.balancer.pick
        for _ in range(len(self.pools) + 1):
            idx = pick(key=key, inflight=counts, excluded=excluded)
            if idx is None or obs is None:
                return idx
            verdict = obs.admit(idx)
            if verdict <= 0:
                if verdict < 0:
                    request.ctx["trial"] = idx
                return idx
            excluded = set(excluded) | {idx}  # its breaker opened since excluded() was read
        return None

    def _outgoing(self, request: Request, endpoint_authority: str) -> Outgoing:
        """The request as it goes upstream: the header policy applied."""
        raw = request.headers.raw
        upgrade = is_upgrade_request(raw)
        host = None
        for k, v in raw:
            if k == b"host":
                host = v
                break
        if self.host_mode == "pass":
            upstream_host = host if host is not None else endpoint_authority.encode()
        elif self.host_mode == "endpoint":
            upstream_host = endpoint_authority.encode()
        else:
            upstream_host = self.host_literal
        version = request.http_version
        via = self.via_request.get(version) or f"{version} ".encode() + self.via
        headers = forward_request_headers(
            raw,
            client_ip=request.client[0],
            trusted=is_trusted(request.client[0], self.trusted),
            scheme=request.scheme,
            host=host,
            upstream_host=upstream_host,
            via=via,
            request_id_header=self.rid_header,
            request_id=request.id.encode(),
            upgrade=upgrade,
        )
        body = request.body
        length = body.length
        if length is None:
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            headers.append((b"transfer-encoding", b"chunked"))
        elif length > 0 or has_field(raw, b"content-length"):
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            headers.append((b"content-length", str(length).encode()))
        # The adapter skips its per-field checks when the fields are known valid. They are when
        # no user middleware ran (request.validated: parsed fields plus weft's own); otherwise
        # middleware may have rebuilt any of them: check them all at once, and refuse a
        # request whose fields cannot be sent before any connection is taken for it.
        if not request.validated and not fields_valid(headers):
            raise ValueError("a header field set by middleware is not valid HTTP (RFC 9110 §5)")
        return Outgoing(
            request.method.encode("ascii"),
            request.upstream_target.encode("latin-1"),
            headers,
            body,
            has_body=length is None or length > 0,
            fields_checked=True,
            upgrade=upgrade,
            client_watch=request.client_watch,
            arena=request.arena,
            duplex=request.http_version == "2",
        )

    def _releaser(
        self, idx: int, pool: EndpointPool, up: UpstreamConnection, end: GrpcEnd | None = None
    ) -> Callable[[bool], None]:
        """The `on_done` of one attempt: the endpoint's in-flight count ends, the connection
        goes back to the pool (or is closed), and a gRPC call's outcome is reported (`end`)."""
        counts = self.counts

        def done(reusable: bool) -> None:
            counts.add(idx, -1)
            if reusable:
                pool.release(up)
            else:
                pool.discard(up)
            if end is not None:
                end.ended(reusable)

        return done

    def _interim(self, request: Request) -> Callable[[int, HeaderList], object] | None:
        relay = request.interim
        if relay is None:
            return None
        via = self.via_response

        async def interim(status: int, headers: HeaderList) -> None:
            await relay(status, forward_response_headers(headers, via=via))

        return interim

    def _report(
        self,
        request: Request,
        idx: int,
        result: str | None,
        status: int,
        started: float,
        response: Response | None = None,
        *,
        observed: int | None = None,
    ) -> None:
        """Record one attempt's head-phase outcome: for the retry middleware always, for the
        observer unless the outcome of a gRPC call waits for its trailers (`GrpcEnd`).
        `observed`: the status the observer hears instead of `status` (an upstream's gRPC
        UNAVAILABLE counts as a 503; the retry middleware still sees the HTTP status)."""
        # What the retry middleware decides on (weft.retry_middleware): the attempt's result
        # word (None: not the endpoint's doing, never retried) and status.
        request.ctx["result"] = (result, status)
        obs = self.observer
        if result is not None and obs is not None:
            if observed is not None:
                result, status = outcome.result_of_status(observed), observed
            degraded = (
                response is not None
                and obs.degraded_header is not None
                and has_field(response.headers.raw, obs.degraded_header)
            )
            obs.report(
                idx,
                result,
                status,
                trio.current_time() - started,
                degraded,
                trial=request.ctx.get("trial") == idx,
            )

    async def _forward(self, request: Request) -> Response:
        idx = self._pick(request)
        if idx is None:
            wait = self.observer.breaker_retry_after() if self.observer is not None else 0
            if wait:
                raise UpstreamError(
                    "every usable endpoint's circuit breaker is open",
                    status=503,
                    reason="breaker_open",
                    retry_after=wait,
                )
            raise UpstreamError(
                "no endpoint available", status=503, reason="no_endpoint", retry_after=1
            )
        tried = request.ctx.get("tried")
        if tried is not None:
            tried.add(idx)
        if self.observer is not None and request.ctx.get("trial") == idx:
            try:
                return await self._attempt(request, idx)
            finally:
                # Reported (the trial decided) or not (the client left, the pool was full):
                # either way this process no longer holds the trial, unless a gRPC call's
                # outcome waits for its trailers: its `GrpcEnd` reports and frees it then.
                del request.ctx["trial"]
                if not request.ctx.pop("trial_pending", False):
                    self.observer.abandon(idx)
        return await self._attempt(request, idx)

    async def _attempt(self, request: Request, idx: int) -> Response:
        pool = self.pools[idx]
        ep = pool.endpoint
        request.ctx["endpoint"] = ep.authority
        route = request.route
        timeouts = route.timeouts if route is not None else self.config.timeouts
        deadline = request.ctx.get("deadline")
        if deadline is None:
            deadline = trio.current_time() + 1e9
        out = self._outgoing(request, ep.authority)
        retryable = not out.has_body and request.method in IDEMPOTENT
        interim = self._interim(request)
        started = trio.current_time()
        # A gRPC call's outcome is in its grpc-status, which may come only in the trailers.
        grpc_call = self.observer is not None and request.ctx.get("grpc", False)
        attempt = 0
        while True:
            end = GrpcEnd() if grpc_call else None
            self.counts.add(idx, 1)
            try:
                up, reused = await pool.acquire(fresh=attempt > 0)
            except UpstreamError as e:
                self.counts.add(idx, -1)
                self._report(request, idx, outcome.result_of(e.reason), 0, started)
                raise
            except BaseException:
                self.counts.add(idx, -1)
                raise
            try:
                response = await up.exchange(
                    out, timeouts, deadline, interim, self._releaser(idx, pool, up, end)
                )
            except UpstreamError as e:
                # The exchange freed the connection (closed) and ended the in-flight count.
                if (
                    reused
                    and retryable
                    and attempt == 0
                    and not up.response_started
                    and e.reason == "upstream_reset"
                ):
                    attempt += 1
                    log.debug("retrying %s on a fresh connection: %s", request.id, e.detail)
                    continue
                self._report(request, idx, outcome.result_of(e.reason), 0, started)
                raise
            break
        now = trio.current_time()
        request.ctx["upstream_time"] = now - started
        observed = None
        if end is not None and response.status == 200:
            code = grpc.status_of(response.headers.raw)  # a Trailers-Only response
            if code is None:
                # The status comes with the trailers: the observer hears of it then.
                request.ctx["result"] = (outcome.OK, 200)
                trial = request.ctx.get("trial") == idx
                if trial:
                    request.ctx["trial_pending"] = True
                end.arm(self.observer, idx, response, now - started, trial)  # type: ignore[arg-type]
                return self._finish(request, out, response)
            if code == grpc.UNAVAILABLE:
                observed = grpc.UNAVAILABLE_AS_HTTP
        self._report(
            request,
            idx,
            outcome.result_of_status(response.status),
            response.status,
            started,
            response,
            observed=observed,
        )
        return self._finish(request, out, response)

    def _finish(self, request: Request, out: Outgoing, response: Response) -> Response:
        """The response head as the client gets it (the header policy applied)."""
        if out.close_client:
            request.ctx["close"] = True
        if response.tunnel is not None:
            response.headers.raw = forward_response_headers(
                response.headers.raw, via=self.via_response, upgrade=True
            )
            return response
        headers = forward_response_headers(response.headers.raw, via=self.via_response)
        if not has_field(headers, self.rid_header):
            headers.append((self.rid_header, request.id.encode()))
        response.headers.raw = headers
        return response


class GrpcEnd:
    """Reports a gRPC call's outcome to the observer when its response body ends, where the
    trailers bring ``grpc-status``: UNAVAILABLE counts as an upstream 503 (`weft.grpc`), any
    other status, or a body cut short, as the head's 200 would have. The body may end before
    the forwarder has the response in hand (its end came with the head): `arm` then reports
    at once."""

    __slots__ = ("_args", "_clean")

    def __init__(self) -> None:
        self._args: tuple[Observer, int, Body, float, bool, bool] | None = None
        self._clean: bool | None = None

    def arm(
        self, observer: Observer, idx: int, response: Response, latency: float, trial: bool
    ) -> None:
        """The head came (`latency` seconds after the send); report once the body ends."""
        degraded = observer.degraded_header is not None and has_field(
            response.headers.raw, observer.degraded_header
        )
        self._args = (observer, idx, response.body, latency, degraded, trial)
        if self._clean is not None:
            self._report(self._clean)

    def ended(self, clean: bool) -> None:
        """The body ended (`clean`: with END_STREAM, its trailers in) or was abandoned."""
        if self._clean is None:
            self._clean = clean
            if self._args is not None:
                self._report(clean)

    def _report(self, clean: bool) -> None:
        args, self._args = self._args, None
        if args is None:
            return
        observer, idx, body, latency, degraded, trial = args
        code = grpc.status_of(body.trailers) if clean else None
        status = grpc.UNAVAILABLE_AS_HTTP if code == grpc.UNAVAILABLE else 200
        observer.report(
            idx, outcome.result_of_status(status), status, latency, degraded, trial=trial
        )
        if trial:
            observer.abandon(idx)  # (a no-op when the report ended the trial)
