"""Built-in middleware: weft's own per-route features, configured by route keys.

Retries, rate limits, authorisation and JWT-SVID checks (the coming issues) are middleware in
the same `(request, next) -> Response` shape as user middleware, but they are weft's: they are
configured by route keys rather than import paths, and they are built once per worker with
access to what user middleware never gets, the worker's shared-memory tables and a clock. This
module is the seam they plug into:

* `BUILTINS` is the registry, in the order the chain runs them, outermost first (the request
  path of ARCHITECTURE.md: authorize / jwt_svid -> rate_limit -> retry). Each entry is a
  factory ``(route, context) -> Middleware | None``: None when the route does not configure
  that feature, so a route pays only for what it uses.
* `BuiltinContext` is what a factory may use: the config, the worker's `Hooks` (shared tables
  by the ``*_for`` factory methods, as `inflight_for` is), and the clock. Unit tests pass a
  fake clock and plain in-process tables.

Built-ins run outside user middleware and are kept apart from it: a route with only built-ins
still counts as a route without user middleware, so its requests keep the `validated` fast path
(weft's own code does not rewrite header fields unchecked).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from weft.http.messages import Request, Response
    from weft.schema import Config, Route
    from weft.workers.worker import Hooks

Next = Callable[["Request"], Awaitable["Response"]]
Middleware = Callable[["Request", Next], Awaitable["Response"]]


@dataclass(frozen=True, slots=True)
class BuiltinContext:
    """What a built-in middleware factory is given, once per worker."""

    config: Config
    hooks: Hooks | None = None  # None: no supervisor (tests, one in-process worker)
    clock: Callable[[], float] = trio.current_time
    # The SPIFFE trust bundles (a weft.spiffe_middleware.TrustSource); None: the hooks' own.
    identity: Any = None


BuiltinFactory = Callable[["Route", BuiltinContext], "Middleware | None"]

#: (name, factory), outermost first. The resilience, rate-limit and identity issues add theirs.
BUILTINS: list[tuple[str, BuiltinFactory]] = []

#: The chain's order, outermost first (ARCHITECTURE.md's request path): the token gives the
#: principal that authorize decides on and a rate limit may key on; retries are innermost.
#: `register` keeps BUILTINS in this order whatever order the modules are imported in.
ORDER = ("jwt_svid", "authorize", "rate_limit", "upstream_jwt_svid", "retry")


def register(name: str, factory: BuiltinFactory) -> None:
    """Add a built-in to BUILTINS at its place in ORDER (once: registering again replaces)."""
    assert name in ORDER, name
    BUILTINS[:] = [(n, f) for n, f in BUILTINS if n != name]
    rank = ORDER.index(name)
    at = next((i for i, (n, _) in enumerate(BUILTINS) if ORDER.index(n) > rank), len(BUILTINS))
    BUILTINS.insert(at, (name, factory))


def builtin_chain(
    route: Route, context: BuiltinContext, registry: list[tuple[str, BuiltinFactory]] | None = None
) -> list[Middleware]:
    """The built-in middleware `route` configures, outermost first."""
    out = []
    for _name, factory in BUILTINS if registry is None else registry:
        mw = factory(route, context)
        if mw is not None:
            out.append(mw)
    return out
