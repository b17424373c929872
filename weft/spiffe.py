"""SPIFFE identity in a worker: the SVID and bundles the identity process published, the TLS
contexts made from them, and the checks of a peer's SVID around each handshake.

The pieces, and where each lives:

* the **Workload API** client (`weft.workload_api`, trio-native gRPC over the ``h2`` library:
  grpcio must never exist before a fork, and a thread bridging the ``spiffe`` package would
  live in a process that forks) runs in **one identity process per host**
  (`weft.identity_process`, `weft.identity.run_identity`), which publishes each change as
  files on tmpfs and a generation word in shared memory;
* **this module** is the workers' side: `WorkerIdentity` notices a new generation (one atomic
  load per handshake that needs the SVID), reads it, and rebuilds every SPIFFE context at once:
  new handshakes use the new SVID and bundles, connections already open keep theirs (an
  `ssl.SSLObject` holds its context). A generation that does not load (a key that does not fit
  its certificate) is refused with an error and the previous one goes on;
* the SPIFFE rules (`weft.svid`): a peer's leaf is checked, and its chain verified again against
  **the bundle of the leaf's own trust domain only**, right after the handshake and before any
  HTTP is read (`verify_client`, `verify_upstream`); the ID lands in `Transport.peer_id`.

**Never an expired certificate.** `usable` is false once the SVID's notAfter has passed (wall
clock, checked at each handshake), whatever was published: a SPIFFE listener then refuses new
handshakes (counted as ``no_identity``), a SPIFFE destination fails with a 502, and the worker's
row leaves READY (`weft.workers.child`) until a new SVID comes, so ``/readyz`` says 503 and
why. The identity process withdraws the SVID at expiry too; this check does not rely on it.

`WorkerIdentity` is also the `weft.spiffe_middleware.TrustSource` of ``[routes.jwt_svid]``:
the JWT bundles of the trusted domains, as published.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from weft.config_spiffe import FIRST_GRACE
from weft.http import tls
from weft.http.tls import TLSTransport
from weft.http.tls_errors import HandshakeFailed, UpstreamTLSError
from weft.http.transport import TCPTransport
from weft.identity import IdentitySettings, Published, iso_time, read_current
from weft.jwt_svid import JwtBundle, parse_jwt_bundle
from weft.schema import Config, ListenerTLS, SpiffeConfig, UpstreamTLS
from weft.spiffe_id import SpiffeId
from weft.svid import Bundles, SvidError, X509Svid, client_context, server_context
from weft.svid import verify_peer as _verify_peer
from weft.svid import verify_upstream as _verify_upstream
from weft.workload_api import EndpointError, parse_endpoint

__all__ = ["IdentityUnavailable", "WorkerIdentity", "identity_settings"]

log = logging.getLogger("weft.identity")

ENV_ENDPOINT = "SPIFFE_ENDPOINT_SOCKET"
FIRST_POLL = 0.05  # seconds between looks at the generation word while a worker boots
_MIN_VERSION = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def identity_settings(cfg: SpiffeConfig, env: Mapping[str, str] = os.environ) -> IdentitySettings:
    """The identity process's settings from ``[spiffe]`` (the endpoint from
    ``$SPIFFE_ENDPOINT_SOCKET`` when the file names none). Raises EndpointError saying what
    to set."""
    value = cfg.endpoint or env.get(ENV_ENDPOINT, "")
    if not value:
        raise EndpointError(
            f"[spiffe] endpoint is not set and ${ENV_ENDPOINT} is empty: set one of them to "
            'the SPIRE agent\'s socket, like "unix:///run/spire/agent.sock"'
        )
    return IdentitySettings(
        endpoint=parse_endpoint(value),
        svid=cfg.svid or "",
        trust_domains=tuple(cfg.trust_domains),
        first_fetch_timeout=cfg.first_fetch_timeout,
    )


def settings_for(config: Config) -> IdentitySettings | None:
    """`identity_settings` of the config's ``[spiffe]``; None without one."""
    return identity_settings(config.spiffe) if config.spiffe is not None else None


class IdentityUnavailable(Exception):
    """A worker could not get an SVID in time; `errors` is what the child prints."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errors = [message]


class WorkerIdentity:
    """The published identity as one worker holds it (module docstring)."""

    def __init__(
        self,
        config: Config,
        directory: Path,
        generation: Callable[[], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self._word = generation
        self._clock = clock
        self.generation = 0  # the one loaded (0: none yet)
        self.svid: X509Svid | None = None
        self.spiffe_id: SpiffeId | None = None
        self.expires = 0.0  # the SVID's notAfter (Unix time)
        self.bundles: dict[str, list[x509.Certificate]] = {}
        self.jwt: dict[str, JwtBundle] | None = None  # None: no JWT bundles published yet
        self.problem: str | None = "no identity published yet"
        # What the identity process itself reported (its manifest's "problem"): no SVID after
        # first_fetch_timeout, an expiry, an SVID selector that matches none.
        self.reported: str | None = None
        self.listeners = [
            lst.tls for lst in config.listeners if lst.tls is not None and lst.tls.spiffe
        ]
        self.upstreams = [
            d.tls for d in config.destinations.values() if d.tls is not None and d.tls.spiffe
        ]
        self._server: dict[int, ssl.SSLContext] = {}  # id(ListenerTLS) -> context
        self._client: dict[int, ssl.SSLContext] = {}  # id(UpstreamTLS) -> context

    # -- following the identity process ---------------------------------------------------------

    def refresh(self) -> None:
        """Load the published generation if it is not the one held (one atomic load when it
        is)."""
        if self._word() != self.generation:
            self._load()

    def _load(self) -> None:
        try:
            published = read_current(self.directory)
        except (OSError, ValueError, KeyError) as e:
            log.error("spiffe: cannot read %s: %s", self.directory, e)
            return
        if published is None:
            return
        try:
            self._take(published)
        except (OSError, ValueError, ssl.SSLError) as e:
            self.generation = published.generation  # not again until the next one
            log.error(
                "spiffe: generation %d refused (%s); keeping the SVID held (%s)",
                published.generation,
                e,
                self.spiffe_id,
            )

    def _take(self, pub: Published) -> None:
        svid = None
        if pub.chain is not None and pub.key is not None:
            chain = x509.load_pem_x509_certificates(pub.chain.read_bytes())
            key = serialization.load_pem_private_key(pub.key.read_bytes(), password=None)
            svid = X509Svid(tuple(chain), key)  # type: ignore[arg-type]
        bundles = {
            td: x509.load_pem_x509_certificates(path.read_bytes())
            for td, path in pub.bundles.items()
        }
        jwt: dict[str, JwtBundle] | None = None
        if pub.manifest.get("jwt_bundles"):
            jwt = {}
            for td, jwks in pub.jwt_bundles.items():
                try:
                    jwt[td] = parse_jwt_bundle(jwks)
                except ValueError as e:
                    log.error("spiffe: the JWT bundle of %s is refused: %s", td, e)
        server: dict[int, ssl.SSLContext] = {}
        client: dict[int, ssl.SSLContext] = {}
        if svid is not None:
            for lt in self.listeners:
                server[id(lt)] = self._server_context(lt, svid, bundles)
            for ut in self.upstreams:
                client[id(ut)] = client_context(svid, bundles, alpn=ut.alpn)
        # Everything loaded: switch at once.
        old = self.spiffe_id
        self.svid = svid
        self.spiffe_id = svid.id if svid is not None else None
        self.expires = svid.chain[0].not_valid_after_utc.timestamp() if svid else 0.0
        self.bundles, self.jwt = bundles, jwt
        self._server, self._client = server, client
        self.generation = pub.generation
        self.reported = pub.manifest.get("problem")
        self.problem = self.reported or (None if svid else "no X.509-SVID yet")
        if svid is not None and (old != self.spiffe_id or log.isEnabledFor(logging.DEBUG)):
            log.info(
                "spiffe: generation %d: SVID %s until %s, bundles of %s",
                pub.generation,
                self.spiffe_id,
                iso_time(self.expires),
                ", ".join(sorted(bundles)) or "no trust domain",
            )

    @staticmethod
    def _server_context(lt: ListenerTLS, svid: X509Svid, bundles: Bundles) -> ssl.SSLContext:
        return server_context(
            svid,
            bundles,
            client_auth=lt.client_auth,
            alpn=lt.alpn,
            min_version=_MIN_VERSION.get(lt.min_version, ssl.TLSVersion.TLSv1_2),
        )

    @property
    def usable(self) -> bool:
        """An SVID, not expired."""
        return self.svid is not None and self.expires > self._clock()

    def why_unusable(self) -> str:
        if self.svid is not None and self.expires <= self._clock():
            return f"the X.509-SVID {self.spiffe_id} expired at {iso_time(self.expires)}"
        return self.problem or "no X.509-SVID"

    async def wait_first(self, timeout: float) -> None:
        """Until an SVID is usable (a worker's boot). Raises IdentityUnavailable with the
        identity process's reason once it reported one (it gives up on the first SVID after
        the same `timeout`), or after `timeout` and `FIRST_GRACE` without any word from it."""
        with trio.move_on_after(timeout + FIRST_GRACE):
            while True:
                self.refresh()
                if self.usable:
                    return
                if self.reported and self.svid is None:
                    # The identity process gave up on it (a generation with only JWT bundles,
                    # published before the SVID came, is no reason to stop waiting).
                    break
                await trio.sleep(FIRST_POLL)
        raise IdentityUnavailable(
            f"spiffe: no usable X.509-SVID within first_fetch_timeout ({timeout:g}s): "
            f"{self.why_unusable()}"
        )

    # -- contexts and checks --------------------------------------------------------------------

    def server_context(self, lt: ListenerTLS) -> ssl.SSLContext | None:
        """The context for a new handshake on a SPIFFE listener; None without a usable SVID."""
        self.refresh()
        if not self.usable:
            return None
        return self._server.get(id(lt))

    def client_context(self, ut: UpstreamTLS) -> ssl.SSLContext | None:
        """The context for a new connection to a SPIFFE destination; None without a usable
        SVID."""
        self.refresh()
        if not self.usable:
            return None
        return self._client.get(id(ut))

    def verify_client(self, chain: Sequence[bytes]) -> SpiffeId | None:
        """A client's SVID after the handshake (None: it sent none, with client_auth
        "optional"). Raises SvidError."""
        return _verify_peer(chain, self.bundles, _now(self._clock))

    def verify_upstream(self, chain: Sequence[bytes], ut: UpstreamTLS) -> SpiffeId:
        """An upstream's SVID after the handshake, and one of its ``expect_ids``. Raises
        SvidError."""
        return _verify_upstream(chain, self.bundles, ut.expect_ids, _now(self._clock))

    # -- TrustSource ------------------------------------------------------------------------------

    def x509_bundles(self) -> Bundles:
        self.refresh()
        return self.bundles

    def jwt_bundles(self) -> Mapping[str, JwtBundle] | None:  # type: ignore[override]
        self.refresh()
        return self.jwt


def _now(clock: Callable[[], float]) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(clock(), datetime.UTC)


# -- the worker's use ---------------------------------------------------------------------------

FOLLOW_INTERVAL = 1.0  # seconds between a worker's looks at its SVID's expiry and generation


async def accept(
    identity: WorkerIdentity | None, sock: socket.socket, lt: ListenerTLS, timeout: float
) -> TLSTransport:
    """The server side of a connection to a SPIFFE listener: the handshake with the current
    SVID, then the client's SVID verified in its own trust domain (`verify_client`), before any
    HTTP is read; its ID becomes `Transport.peer_id`. Raises HandshakeFailed (the socket is
    closed): ``no_identity`` without a usable SVID, ``svid_<reason>`` for a refused client
    SVID, or the handshake's own reason."""
    context = identity.server_context(lt) if identity is not None else None
    if identity is None or context is None:
        sock.close()
        why = identity.why_unusable() if identity is not None else "no identity process"
        raise HandshakeFailed("no_identity", why)
    transport = await tls.accept(sock, context, timeout)
    if lt.client_auth != "none":
        try:
            transport.peer_id = identity.verify_client(transport.peer_chain())
        except SvidError as e:
            transport.close()
            raise HandshakeFailed(f"svid_{e.reason}", e.detail) from None
    return transport


async def connect(
    identity: WorkerIdentity | None, tcp: TCPTransport, ut: UpstreamTLS, server_name: str
) -> TLSTransport:
    """TLS to a SPIFFE destination: weft's SVID presented, the upstream's SVID verified in its
    own trust domain and found among ``expect_ids``. Raises UpstreamTLSError (502, the reason
    named; `tcp` closed)."""
    context = identity.client_context(ut) if identity is not None else None
    if identity is None or context is None:
        tcp.close()
        why = identity.why_unusable() if identity is not None else "no identity process"
        raise UpstreamTLSError(
            f"TLS to {server_name}: weft has no usable SVID to present ({why})",
            "weft has no usable SPIFFE identity to present to the upstream",
        )
    transport = await tls.connect(tcp, context, server_name)
    try:
        transport.peer_id = identity.verify_upstream(transport.peer_chain(), ut)
    except SvidError as e:
        transport.close()
        raise UpstreamTLSError(
            f"TLS to {server_name}: the upstream's SVID was refused: {e}",
            f"the upstream's SPIFFE identity was refused: {e.reason}",
        ) from None
    return transport


async def follow(identity: WorkerIdentity, usable: Callable[[bool], None]) -> None:
    """Keep up with the identity process between handshakes, and report the SVID's usability
    when it changes (the worker's row: READY or NOT_READY), logging why it is lost."""
    was = identity.usable
    while True:
        await trio.sleep(FOLLOW_INTERVAL)
        identity.refresh()
        now = identity.usable
        if now != was:
            if now:
                log.warning("spiffe: X.509-SVID %s usable again: ready", identity.spiffe_id)
            else:
                log.error("spiffe: %s: not ready, TLS refused", identity.why_unusable())
            usable(now)
            was = now
