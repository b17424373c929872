"""``[routes.upstream_jwt_svid]``: weft's own JWT-SVID, fetched when a route needs one, sent
upstream as ``Authorization: Bearer <token>``.

An upstream that authenticates callers by JWT-SVID (behind a hop that is not mTLS, or in
addition to it) wants a token whose ``aud`` names it. weft asks the Workload API for one
(``FetchJWTSVID``, `weft.workload_api.WorkloadAPIClient.fetch_jwt_svid`) the first time a route
with this table forwards a request, and keeps it per audience:

* **Refreshed at half its life** (what go-spiffe's and SPIRE's own clients do): a token is
  used until half the time from its fetch to its ``exp`` has passed, then fetched again, so an
  upstream never sees one close to expiry, and a slow agent has the other half to answer.
* **One fetch at a time per audience** in a worker: requests that arrive while a fetch is on
  wait for it (bounded by `FETCH_TIMEOUT`) instead of each calling the agent.
* **Per worker, unary, and from the worker itself**: the long-lived watches are the identity
  process's (one stream per host), but a ``FetchJWTSVID`` is one short call per audience per
  half-life per worker, and going through the identity process would need a request channel
  between processes for no gain. The ``exp`` is read from the token's claims without checking
  the signature: it is the agent's own token, over the local socket, and the upstream checks it.
* **Failure** (agent gone, refusing, no answer in time): the request is answered **503** with
  the reason ``identity_unavailable`` (never forwarded without its token) and the log says why;
  a token still within its life is used meanwhile, whatever the agent says.

The token replaces any ``Authorization`` the client sent (it would otherwise be forwarded
under weft's identity); ``header`` names another field when the upstream reads its token
elsewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
import trio

from weft.builtins import BuiltinContext, Middleware, Next, register
from weft.http.errors import error_response
from weft.http.messages import Request, Response
from weft.schema import Route, UpstreamJwtSvid
from weft.spiffe import settings_for
from weft.spiffe_wire import WireError
from weft.workload_api import GrpcError, WorkloadAPIClient

__all__ = ["JwtSvidSource", "make_upstream_jwt_svid"]

log = logging.getLogger("weft.identity")

FETCH_TIMEOUT = 5.0  # seconds for one FetchJWTSVID, waiters included


class JwtFetchError(Exception):
    """No token for an audience; the message says why (for the log)."""


@dataclass
class _Token:
    value: str
    refresh_at: float  # wall clock: half-way from fetch to exp
    expires: float


class JwtSvidSource:
    """weft's JWT-SVIDs by audience, fetched on demand (module docstring)."""

    def __init__(
        self,
        client: WorkloadAPIClient,
        spiffe_id: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.spiffe_id = spiffe_id  # "" : the agent's default SVID for weft
        self._clock = clock
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._locks: dict[tuple[str, ...], trio.Lock] = {}

    async def token(self, audience: tuple[str, ...]) -> str:
        """A JWT-SVID for `audience`, from the cache or fetched. Raises JwtFetchError."""
        held = self._tokens.get(audience)
        if held is not None and self._clock() < held.refresh_at:
            return held.value
        lock = self._locks.setdefault(audience, trio.Lock())
        with trio.move_on_after(FETCH_TIMEOUT):
            async with lock:
                held = self._tokens.get(audience)
                if held is not None and self._clock() < held.refresh_at:
                    return held.value  # fetched while this request waited
                try:
                    fresh = await self._fetch(audience)
                except JwtFetchError as e:
                    if held is not None and self._clock() < held.expires:
                        log.warning("spiffe: %s; the token in hand is used until it expires", e)
                        return held.value
                    raise
                self._tokens[audience] = fresh
                return fresh.value
        raise JwtFetchError(f"no JWT-SVID for {', '.join(audience)} within {FETCH_TIMEOUT:g}s")

    async def _fetch(self, audience: tuple[str, ...]) -> _Token:
        try:
            resp = await self.client.fetch_jwt_svid(audience, self.spiffe_id, timeout=FETCH_TIMEOUT)
        except (GrpcError, WireError, OSError) as e:
            raise JwtFetchError(f"FetchJWTSVID for {', '.join(audience)}: {e}") from None
        value = resp.svids[0].svid
        try:
            claims = jwt.decode(value, options={"verify_signature": False})
            expires = float(claims["exp"])
        except (jwt.PyJWTError, KeyError, TypeError, ValueError) as e:
            raise JwtFetchError(f"the agent's JWT-SVID has no readable exp: {e}") from None
        now = self._clock()
        if expires <= now:
            raise JwtFetchError("the agent's JWT-SVID is expired already")
        return _Token(value, now + (expires - now) / 2, expires)


def make_upstream_jwt_svid(policy: UpstreamJwtSvid, source: JwtSvidSource) -> Middleware:
    """The ``[routes.upstream_jwt_svid]`` middleware (module docstring)."""
    audience, header = policy.audience, policy.header

    async def upstream_jwt_svid(request: Request, nxt: Next) -> Response:
        try:
            token = await source.token(audience)
        except JwtFetchError as e:
            request.ctx["error"] = "identity_unavailable"
            log.warning("request %s: %s", request.id, e)
            return error_response(
                503, "weft's identity is not available", request.id, close=False, retry_after=1
            )
        request.headers.set(header, f"Bearer {token}" if header == "authorization" else token)
        return await nxt(request)

    return upstream_jwt_svid


_SOURCES: dict[int, JwtSvidSource] = {}  # per Config object: one cache for all its routes


def _factory(route: Route, context: BuiltinContext) -> Middleware | None:
    policy = route.upstream_jwt_svid
    if policy is None:
        return None
    config = context.config
    settings = settings_for(config)
    assert settings is not None  # the config check requires [spiffe]
    source = _SOURCES.get(id(config))
    if source is None:
        spiffe_id = settings.svid if settings.svid.startswith("spiffe://") else ""
        source = _SOURCES[id(config)] = JwtSvidSource(
            WorkloadAPIClient(settings.endpoint), spiffe_id
        )
    return make_upstream_jwt_svid(policy, source)


# After the rate limit (a refused request costs no token), before retries (which reuse it).
register("upstream_jwt_svid", _factory)
