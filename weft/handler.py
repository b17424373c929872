"""The middleware core: what a handler is, how a route's chain is built, and the app on top.

A handler takes a Request and returns a Response::

    ALLOW = b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"

Next = Callable[[Request], Awaitable[Response]]
    Middleware = Callable[[Request, Next], Awaitable[Response]]

    async def add_header(request, next):
        response = await next(request)
        response.headers.set("x-served-by", "weft")
        return response

A route's chain is its middleware in config order, outermost first, with the destination's
`Forwarder` as the innermost handler. User middleware comes from an import path in the config
(``"package.module:factory"``); the factory is called once per worker with the entry's config
table and returns the middleware. Loading happens when the config is checked, so a missing
module is a config error (`weft check` reports it), not a 500 at the first request.

`App` is what the protocol adapters call: it matches the route, applies the route's body limit,
the path rewrite and the ``request_total`` deadline (the forwarder enforces it on each of its
waits; a cancel scope around the chain bounds user middleware too), runs the chain, and turns
an exception that escapes user middleware into a logged 500 for that request alone. Client
errors (`ClientError`: body too large, client too slow) pass through, because the adapter must
also close the connection for them.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

import weft.jwt_fetch  # (registers upstream_jwt_svid)
import weft.rate_limit_middleware
import weft.retry_middleware  # (registers the retry built-in)
import weft.spiffe_middleware  # noqa: F401  (registers jwt_svid and authorize, outermost)
from weft import grpc
from weft.builtins import BuiltinContext, BuiltinFactory, builtin_chain
from weft.connection import UpstreamPools
from weft.forward import Forwarder
from weft.http.errors import ClientError, error_response
from weft.http.messages import BodyTooLarge, BytesBody, Headers, Request, Response
from weft.routes import NoRoute, Router
from weft.schema import Config, ConfigError, MiddlewareSpec, Route

if TYPE_CHECKING:
    from weft.workers.worker import Hooks

log = logging.getLogger("weft.handler")

ALLOW = b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"  # what OPTIONS * is answered with

Next = Callable[[Request], Awaitable[Response]]
Middleware = Callable[[Request, Next], Awaitable[Response]]


def load_middleware(spec: MiddlewareSpec) -> Middleware:
    """Import ``module:factory`` and call the factory with its config. Raises ValueError."""
    module_name, _, attr = spec.use.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of user code is a config error
        raise ValueError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    try:
        mw = factory(dict(spec.config))
    except Exception as e:
        raise ValueError(f"{spec.use}({spec.config!r}) failed: {type(e).__name__}: {e}") from None
    if not callable(mw):
        raise ValueError(f"{spec.use} returned {type(mw).__name__}, not a middleware callable")
    return mw


def load_all_middleware(config: Config) -> dict[str, list[Middleware]]:
    """Every route's middleware, by route name. Raises ConfigError naming the key path."""
    errors = []
    out: dict[str, list[Middleware]] = {}
    for i, route in enumerate(config.routes):
        mws = []
        for j, spec in enumerate(route.middleware):
            try:
                mws.append(load_middleware(spec))
            except ValueError as e:
                errors.append(f"{config.source}: routes[{i}].middleware[{j}]: {e}")
        out[route.name] = mws
    if errors:
        raise ConfigError(errors)
    return out


def chain(middlewares: list[Middleware], terminal: Next) -> Next:
    """Compose middleware around `terminal`; the first in the list runs first."""
    handler = terminal
    for mw in reversed(middlewares):
        handler = _bind(mw, handler)
    return handler


def _bind(mw: Middleware, nxt: Next) -> Next:
    # A plain function that returns `mw`'s coroutine, not a coroutine function awaiting it:
    # one coroutine object and frame fewer per middleware per request (about 1 µs each).
    def handler(request: Request) -> Awaitable[Response]:
        return mw(request, nxt)

    handler.__qualname__ = getattr(mw, "__qualname__", "middleware")
    return handler


class App:
    """Routes a request and runs its chain; the adapters' single entry point.

    A route's chain is its built-in middleware (`weft.builtins`, outermost), then its user
    middleware, then the destination's forwarder. `hooks` gives the forwarders and built-ins
    the worker's shared state (None: this process's own, as in tests).
    """

    def __init__(
        self,
        config: Config,
        pools: UpstreamPools,
        middleware: dict[str, list[Middleware]] | None = None,
        *,
        hooks: Hooks | None = None,
        builtins: list[tuple[str, BuiltinFactory]] | None = None,
    ) -> None:
        self.config = config
        forwarders = {
            name: Forwarder(
                dest,
                pools.by_destination[name],
                config,
                hooks.inflight_for(dest) if hooks is not None else None,
                position=hooks.wrr_position_for(dest) if hooks is not None else None,
                observer=hooks.observer_for(dest) if hooks is not None else None,
            )
            for name, dest in config.destinations.items()
        }
        self.forwarders = forwarders
        mws = middleware if middleware is not None else load_all_middleware(config)
        # Routes whose chain has user middleware: only those need a cancel scope for
        # request_total, and only their fields are checked again (see __call__).
        self.with_middleware = {name for name, m in mws.items() if m}
        context = BuiltinContext(config, hooks)
        entries: list[tuple[Route, Next]] = []
        for route in config.routes:
            chain_mws = builtin_chain(route, context, builtins) + mws.get(route.name, [])
            entries.append((route, chain(chain_mws, forwarders[route.destination])))
        self.router: Router[Next] = Router(entries)
        # Called once a request is matched to its route (metrics count it in flight from here).
        self.on_route: Callable[[Request], None] | None = None

    async def __call__(self, request: Request) -> Response:
        if request.target == "*":
            # OPTIONS * asks about the server itself (RFC 9110 §9.3.7): the proxy answers it.
            return Response(
                200, Headers([(b"allow", ALLOW), (b"content-length", b"0")]), BytesBody(b"")
            )
        try:
            route, handler = self.router.match(
                request.headers.get("host"), request.path, request.method
            )
        except NoRoute as e:
            request.ctx["error"] = "no_route"
            extra = [("allow", ", ".join(e.allow))] if e.allow else []
            resp = error_response(e.status, "no route", request.id, close=False)
            for k, v in extra:
                resp.headers.add(k, v)
            return resp
        request.route = route
        if self.on_route is not None:
            self.on_route(request)
        body = request.body
        body.limit = route.max_body_bytes
        if body.length is not None and body.length > route.max_body_bytes:
            raise BodyTooLarge(route.max_body_bytes)
        if route.strip_prefix or route.rewrite_prefix is not None:
            rest = request.path[len(route.path_prefix) :]
            if route.rewrite_prefix is not None:
                request.path = route.rewrite_prefix + rest
            else:
                request.path = "/" + rest.lstrip("/") if not rest.startswith("/") else rest
        total = route.timeouts.request_total
        deadline = request.start + total if total > 0 else float("inf")
        if request.http_version == "2" and grpc.is_grpc(request.headers.raw):
            # gRPC needs HTTP/2; the call's own deadline caps the route's (weft.grpc).
            request.ctx["grpc"] = True
            timeout = grpc.timeout_of(request.headers.raw)
            if timeout is not None and request.start + timeout < deadline:
                deadline = request.start + timeout
                request.ctx["deadline_source"] = "grpc-timeout"
        request.ctx["deadline"] = deadline
        plain = route.name not in self.with_middleware
        request.validated = plain
        try:
            if deadline == float("inf") or plain:
                # The forwarder enforces the deadline on each of its own waits; a cancel scope
                # (17 µs here) is needed only to bound user middleware.
                return await handler(request)
            with trio.CancelScope(deadline=deadline) as scope:
                return await handler(request)
        except ClientError:
            raise
        except Exception:
            log.exception("request %s on route %s: middleware failed", request.id, route.name)
            request.ctx["error"] = "middleware_error"
            return error_response(500, "internal error", request.id, close=False)
        assert scope.cancelled_caught
        request.ctx["error"] = "request_timeout"
        reason = (
            grpc.DEADLINE_REASON
            if request.ctx.get("deadline_source") == "grpc-timeout"
            else "request_total exceeded"
        )
        return error_response(504, reason, request.id, close=False)
