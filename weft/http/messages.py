"""Version-agnostic HTTP messages: the Request and Response that middleware sees.

Protocol adapters (h1 today, h2 later) turn bytes into these objects and back; everything between
(routing, middleware, the forwarder) works only with them. That is why bodies are abstract
streams rather than bytes: the h1 server gives a `Body` that pulls from the client socket, the
upstream client gives one that pulls from the upstream socket, and the proxy hands one to the
other without ever holding a whole body.

Rules of a `Body`:

* `receive()` returns the next chunk, and ``b""`` exactly once at the end (and forever after).
* `trailers` is meaningful after the end (a list of lowercase-name/value pairs, often empty).
* `aclose()` abandons the rest; the adapter then decides whether its connection can be reused
  (usually not). Whoever ends up owning a body calls `aclose()` in a ``finally``.
* `prefetched()` hands out chunks that are already in memory without I/O, so a writer can put
  the head and the first chunks into one write. It is an optimisation only.

Headers are lists of ``(name, value)`` byte pairs with lowercase names, as h11 gives them, wrapped
in `Headers` for convenient access from user middleware (which may pass `str`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from weft.http.errors import ClientError

HeaderList = list[tuple[bytes, bytes]]


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("latin-1")


class Headers:
    """An ordered multi-map of header fields; names are stored lowercase."""

    __slots__ = ("raw",)

    def __init__(self, raw: Iterable[tuple[bytes, bytes]] | None = None) -> None:
        self.raw: HeaderList = list(raw) if raw is not None else []

    def get(self, name: str | bytes, default: str | None = None) -> str | None:
        """The first value of `name`, decoded as latin-1, or `default`."""
        n = _b(name).lower()
        for k, v in self.raw:
            if k == n:
                return v.decode("latin-1")
        return default

    def get_all(self, name: str | bytes) -> list[str]:
        n = _b(name).lower()
        return [v.decode("latin-1") for k, v in self.raw if k == n]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, (str, bytes)):
            return False
        n = _b(name).lower()
        return any(k == n for k, _ in self.raw)

    def set(self, name: str | bytes, value: str | bytes) -> None:
        """Replace every field called `name` by one with `value`."""
        n = _b(name).lower()
        self.raw = [(k, v) for k, v in self.raw if k != n]
        self.raw.append((n, _b(value)))

    def add(self, name: str | bytes, value: str | bytes) -> None:
        self.raw.append((_b(name).lower(), _b(value)))

    def remove(self, name: str | bytes) -> None:
        n = _b(name).lower()
        self.raw = [(k, v) for k, v in self.raw if k != n]

    def items(self) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.items())

    def __len__(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"


class Body:
    """A streaming body; this base class is the empty body. Subclasses override `receive`
    (see the module docstring for the rules)."""

    #: total length when known up front (Content-Length), else None
    length: int | None = None
    #: most bytes the consumer accepts (set by the router from the route); None = no limit
    limit: int | None = None

    def __init__(self) -> None:
        self.trailers: HeaderList = []

    #: what the default `receive_into` took from `receive` and did not fit yet
    _rest: bytes | memoryview = b""

    async def receive(self) -> bytes:
        return b""

    async def receive_into(self, view: memoryview) -> int:
        """Put the next bytes into `view` (a leased pool buffer's); how many, 0 exactly once
        at the end, like `receive`'s ``b""``.

        What the relays call: the protocol adapters override it to read from their socket
        straight into `view`, with no `bytes` object per chunk. This default copies from
        `receive` and keeps what did not fit for the next call. A body is read either with
        `receive` or with this, not both.
        """
        rest = self._rest
        if not rest:
            rest = await self.receive()
            if not rest:
                return 0
        n = min(len(view), len(rest))
        view[:n] = memoryview(rest)[:n] if n < len(rest) else rest
        self._rest = memoryview(rest)[n:] if n < len(rest) else b""
        return n

    def prefetched(self) -> tuple[list[bytes], bool]:
        """Chunks available without I/O, and whether they complete the body. The chunks may
        be memoryviews into the request's arena (a replay body): valid until it is released."""
        return [], type(self) is Body

    async def aclose(self) -> None:
        """Abandon the rest of the body."""

    async def read(self, limit: int | None = None) -> bytes:
        """Read the whole body into memory (for middleware that needs it). Raises
        `BodyTooLarge` past `limit` bytes."""
        parts = []
        total = 0
        while chunk := await self.receive():
            total += len(chunk)
            if limit is not None and total > limit:
                raise BodyTooLarge(limit)
            parts.append(chunk)
        return b"".join(parts)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.receive():
            yield chunk


class BytesBody(Body):
    """A body already in memory (error pages, bodies built by middleware)."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes = b"") -> None:
        super().__init__()
        self._data: bytes | None = data
        self.length = len(data)

    async def receive(self) -> bytes:
        data, self._data = self._data, None
        return data or b""

    def prefetched(self) -> tuple[list[bytes], bool]:
        data, self._data = self._data, None
        return ([data] if data else []), True


class BodyTooLarge(ClientError):
    """A request body grew past its route's limit (the client gets 413, then a close)."""

    status = 413
    reason = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


class Request:
    """One HTTP request as middleware sees it.

    `method` is upper case text, `path` the decoded-as-latin-1 path of the target (after any
    route rewrite, this is what the upstream receives), `query` the part after ``?`` (without
    it, "" when absent). `ctx` is a free dict for middleware to share values along the chain.
    """

    __slots__ = (
        "arena",
        "body",
        "client",
        "client_watch",
        "ctx",
        "headers",
        "http_version",
        "id",
        "interim",
        "method",
        "path",
        "query",
        "route",
        "scheme",
        "start",
        "target",
        "validated",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: Body,
        *,
        http_version: str = "1.1",
        client: tuple[str, int] = ("", 0),
        scheme: str = "http",
        request_id: str = "",
        start: float = 0.0,
        interim: Callable[[int, HeaderList], Any] | None = None,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.http_version = http_version
        self.client = client
        self.scheme = scheme
        self.id = request_id
        self.start = start
        self.route: Any = None
        self.ctx: dict[str, Any] = {}
        # Sends a 1xx response to the client (None when the client cannot take one).
        self.interim = interim
        # True when no user code runs between the adapter and the forwarder, in either
        # direction (the App sets it for a route without user middleware): the header fields
        # are then those a parser validated plus values weft made from validated config, and
        # the forwarder and the adapter build their h11 events without re-checking each field.
        # Middleware may rewrite any field, so for its routes every field is checked again.
        self.validated = False
        # Set by the adapter (a `weft.http.upstream.ClientWatch`): the upstream side watches
        # the client through it while a response is awaited; None when the adapter cannot tell.
        self.client_watch: Any = None
        # Set by the adapter: the request's `weft.arena_pool.Arena`, through which everything
        # on its path leases pool buffers; the adapter releases it when the exchange ends.
        # None for a request made outside an adapter (tests): no pool then.
        self.arena: Any = None

    @property
    def upstream_target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} id={self.id}>"


class Response:
    """One HTTP response. `tunnel` is set only for a 101 that switches protocols.

    `bytes_out` is what the protocol adapter wrote of the body to the client (the access log's
    and the metrics' figure), for relayed responses and weft's own alike. `local` is set on
    the answers weft makes itself (`weft.http.errors.error_response`): the sentence the client
    is told, which an adapter may put another way (a gRPC status, `weft.grpc.local_reply`).
    """

    __slots__ = ("body", "bytes_out", "headers", "local", "reason", "status", "tunnel")

    def __init__(
        self,
        status: int,
        headers: Headers | None = None,
        body: Body | None = None,
        *,
        reason: bytes = b"",
        tunnel: Any = None,
    ) -> None:
        self.status = status
        self.headers = headers if headers is not None else Headers()
        self.body = body if body is not None else BytesBody(b"")
        self.reason = reason
        self.tunnel = tunnel
        self.bytes_out = 0
        self.local: str | None = None

    @classmethod
    def text(cls, status: int, text: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
        data = text.encode("utf-8")
        h = Headers([(b"content-type", b"text/plain; charset=utf-8")])
        for k, v in headers:
            h.add(k, v)
        h.set(b"content-length", str(len(data)).encode())
        return cls(status, h, BytesBody(data))

    def __repr__(self) -> str:
        return f"<Response {self.status}>"
