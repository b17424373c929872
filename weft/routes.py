"""Route matching: which configured route serves a request.

Matching works like nginx's server_name + location, which operators already know:

1. **Host tier.** The request's host (port removed, lower case) selects one tier: routes with
   that exact host; else routes whose ``*.suffix`` matches (the longest suffix wins, any depth
   of subdomain, as nginx's leading wildcard); else routes without a host. Once a tier is
   chosen, routes of other tiers are not considered: a host has its own URL space.
2. **Longest path prefix** within the tier. Prefixes are plain string prefixes, as nginx's
   prefix locations and Envoy's ``prefix`` match.
3. **Method.** Among routes with that prefix, the one listing the method (or listing none). When
   the prefix matched but no route takes the method, the answer is 405 with ``Allow``.

Tables are built once per config; a match is a dict lookup plus a scan of the tier's prefixes
(longest first), which is short in practice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from weft.schema import Route

T = TypeVar("T")


class NoRoute(Exception):
    """No route matched: 404, or 405 with the methods `allow` lists."""

    def __init__(self, status: int, allow: Sequence[str] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.allow = sorted(allow)


class _Tier(Generic[T]):
    def __init__(self) -> None:
        self.entries: list[tuple[str, Route, T]] = []

    def add(self, route: Route, value: T) -> None:
        self.entries.append((route.path_prefix, route, value))
        # Longest prefix first; for equal prefixes, routes with a method list before catch-alls.
        self.entries.sort(key=lambda e: (-len(e[0]), e[1].methods is None))

    def match(self, path: str, method: str) -> tuple[Route, T]:
        allow: set[str] = set()
        matched_prefix: str | None = None
        for prefix, route, value in self.entries:
            if matched_prefix is not None and prefix != matched_prefix:
                break
            if not path.startswith(prefix):
                continue
            matched_prefix = prefix
            if route.methods is None or method in route.methods:
                return route, value
            allow |= route.methods
        if matched_prefix is None:
            raise NoRoute(404)
        raise NoRoute(405, allow)


class Router(Generic[T]):
    """Maps (host, path, method) to a route and the value built for it (its handler)."""

    def __init__(self, routes: Sequence[tuple[Route, T]]) -> None:
        self.exact: dict[str, _Tier[T]] = {}
        wildcard: dict[str, _Tier[T]] = {}
        self.any: _Tier[T] | None = None
        for route, value in routes:
            if route.host is None:
                if self.any is None:
                    self.any = _Tier()
                self.any.add(route, value)
            elif route.host.startswith("*."):
                wildcard.setdefault(route.host[1:], _Tier()).add(route, value)  # ".example.com"
            else:
                self.exact.setdefault(route.host, _Tier()).add(route, value)
        self.wildcard = sorted(wildcard.items(), key=lambda kv: -len(kv[0]))

    def match(self, host: str | None, path: str, method: str) -> tuple[Route, T]:
        """The route for a request. Raises NoRoute (404 or 405)."""
        tier = None
        if host:
            h = host.lower()
            if h.startswith("["):
                h = h[: h.find("]") + 1]
            else:
                h = h.partition(":")[0]
            h = h.rstrip(".")
            tier = self.exact.get(h)
            if tier is None:
                for suffix, t in self.wildcard:
                    if h.endswith(suffix) and len(h) > len(suffix):
                        tier = t
                        break
        if tier is None:
            tier = self.any
        if tier is None:
            raise NoRoute(404)
        return tier.match(path, method)
