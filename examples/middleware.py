"""Worked example of user middleware for weft.

A middleware is ``async def mw(request, next) -> Response``. weft builds it by calling a factory
named in the config with that entry's table (minus ``use``), once per worker::

    [[routes]]
    path_prefix = "/"
    destination = "web"
    middleware = [
        { use = "examples.middleware:add_response_header", header = "x-served-by", value = "weft" },
        { use = "examples.middleware:require_header", header = "x-api-key", status = 401 },
    ]

Run weft from the repository root (``python -m weft run -c ...`` puts the current directory on
``sys.path``) or install your module like any package. An exception escaping a middleware
becomes a logged 500 for that request only.
"""

from __future__ import annotations

from typing import Any

from weft.handler import Middleware, Next
from weft.http.messages import Request, Response


def add_response_header(config: dict[str, Any]) -> Middleware:
    """Set one header on every response (after the upstream answered)."""
    name = str(config.get("header", "x-served-by"))
    value = str(config.get("value", "weft"))

    async def middleware(request: Request, next: Next) -> Response:
        response = await next(request)
        response.headers.set(name, value)
        return response

    return middleware


def require_header(config: dict[str, Any]) -> Middleware:
    """Refuse requests without a header, before any upstream is contacted."""
    name = str(config["header"])
    status = int(config.get("status", 401))

    async def middleware(request: Request, next: Next) -> Response:
        if name not in request.headers:
            return Response.text(status, f"missing {name}\n")
        return await next(request)

    return middleware
