"""``[routes.jwt_svid]`` and ``[[routes.authorize]]`` as built-in middleware.

`weft.jwt_svid` and `weft.authorize` decide; this module reads the request, asks, and answers:

* **jwt_svid** (outermost): the ``Authorization: Bearer`` token is validated against the JWT
  bundles of a `TrustSource` at the wall clock. Missing or invalid: **401** with
  ``WWW-Authenticate: Bearer`` (RFC 6750 §3; ``error="invalid_token"`` when a token was sent),
  the reason word ``jwt_<reason>`` (``jwt_expired``, ``jwt_bad_alg``, ...) in the access log,
  never the reason to the client. Valid: ``request.ctx["principal"]`` is the token's ``sub``.
  No bundles yet (the identity source has not answered): **503**, ``identity_unavailable``.
  Nothing a client sends makes a 500: `weft.jwt_svid.validate` raises only JwtSvidError.
* **authorize**: the principal is ``ctx["principal"]``, else ``ctx["peer_id"]``. The protocol
  adapters (`weft.http.h1_request`, `weft.http.h2_request`) copy `Transport.peer_id`, the
  client's X.509-SVID ID that the TLS layer verified after the handshake
  (`weft.svid.verify_peer`), into both keys, and jwt_svid replaces the principal with the
  token's subject. Refused: **403**, reason word ``forbidden`` or ``no_identity``. Admitted:
  ``ctx["principal"]`` is set. The access log, a ``metrics_principal`` route's metrics and a
  ``key = "principal"`` rate limit (which `weft.builtins.ORDER` runs after these) read it.

Where bundles come from is not this module's business: a `TrustSource` (the Workload API
client keeps one current) is taken from `BuiltinContext.identity`, or the worker's hooks'
``identity`` (`weft.spiffe.WorkerIdentity`); tests pass a fake.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from weft.authorize import decide
from weft.builtins import BuiltinContext, Middleware, Next, register
from weft.http.errors import error_response
from weft.http.messages import Request, Response
from weft.jwt_svid import JwtBundle, JwtSvidError, bearer_token, validate
from weft.schema import AuthorizeRule, JwtSvidPolicy, Route
from weft.svid import Bundles

__all__ = ["TrustSource", "make_authorize", "make_jwt_svid"]

log = logging.getLogger("weft.identity")


class TrustSource(Protocol):
    """The trust bundles of every trusted domain, current (rotations replace them)."""

    def x509_bundles(self) -> Bundles: ...

    def jwt_bundles(self) -> Mapping[str, JwtBundle]: ...


def make_jwt_svid(
    policy: JwtSvidPolicy,
    source: TrustSource | None,
    wall_clock: Callable[[], float] = time.time,
) -> Middleware:
    """The ``[routes.jwt_svid]`` middleware (module docstring)."""
    audience, algorithms = policy.audience, policy.algorithms

    async def jwt_svid(request: Request, nxt: Next) -> Response:
        try:
            bundles = source.jwt_bundles() if source is not None else None
        except Exception:  # the source's own failure: not the client's
            log.exception("request %s: JWT bundles unavailable", request.id)
            bundles = None
        if bundles is None:
            request.ctx["error"] = "identity_unavailable"
            return error_response(503, "identity not available yet", request.id, close=False)
        try:
            token = bearer_token(request.headers.get("authorization"))
            sid = validate(
                token, bundles, audience=audience, algorithms=algorithms, now=wall_clock()
            )
        except JwtSvidError as e:
            request.ctx["error"] = f"jwt_{e.reason}"
            log.info("request %s: JWT-SVID refused: %s", request.id, e)
            resp = error_response(401, "a valid JWT-SVID is required", request.id, close=False)
            challenge = "Bearer" if e.reason == "missing" else 'Bearer error="invalid_token"'
            resp.headers.add("www-authenticate", challenge)
            return resp
        request.ctx["principal"] = sid
        return await nxt(request)

    return jwt_svid


def make_authorize(rules: tuple[AuthorizeRule, ...]) -> Middleware:
    """The ``[[routes.authorize]]`` middleware (module docstring)."""

    async def authorize(request: Request, nxt: Next) -> Response:
        ctx = request.ctx
        principal = ctx.get("principal") or ctx.get("peer_id")
        d = decide(rules, principal)
        if not d.allowed:
            ctx["error"] = d.reason
            log.info("request %s: refused: %s", request.id, d.detail)
            return error_response(403, "not allowed", request.id, close=False)
        ctx["principal"] = principal
        return await nxt(request)

    return authorize


def _jwt_factory(route: Route, context: BuiltinContext) -> Middleware | None:
    if route.jwt_svid is None:
        return None
    source = context.identity
    if source is None and context.hooks is not None:
        source = context.hooks.identity
    return make_jwt_svid(route.jwt_svid, source)


def _authorize_factory(route: Route, context: BuiltinContext) -> Middleware | None:
    return make_authorize(route.authorize) if route.authorize else None


# Outermost, in weft.builtins.ORDER: the token gives the principal that authorize decides on.
register("jwt_svid", _jwt_factory)
register("authorize", _authorize_factory)
