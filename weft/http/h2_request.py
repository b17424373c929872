"""The request of one HTTP/2 stream: its head checked and turned into a neutral `Request`
(`build_request`), its body fed from the stream's DATA (`H2RequestBody`).

Why the request is checked here although h2 validated the block (pseudo-headers, connection
fields, ``te``, Host against ``:authority``): h2 accepts any bytes HPACK can carry, and the
request goes on to an HTTP/1.1 upstream. A value with CR or LF, a method that is not a token,
a path with spaces would be a request smuggled into that upstream (the h2-to-h1 downgrade
attacks), so every field is held to RFC 9110's grammar as h11 holds it (`fields_valid`), and the
``[limits]`` of an h1 head apply per stream: ``max_request_line`` to ``:path`` (414),
``max_headers`` and ``max_header_bytes`` (431, the header list counted as RFC 7541 counts it).
Split ``cookie`` fields are joined with ``"; "`` (RFC 9113 §8.2.3), as an h1 upstream expects one.

The body's flow control (credit given back as the upstream side takes the bytes) is the
stream's (`weft.http.h2_stream`); this module only takes from the stream's queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from weft.http.errors import ClientError
from weft.http.h1 import METHOD, TARGET_BAD
from weft.http.h1_request import _HOST
from weft.http.headers import fields_valid, new_request_id, valid_request_id
from weft.http.messages import Body, BodyTooLarge, HeaderList, Headers, Request

if TYPE_CHECKING:
    from weft.http.h2_server import H2Server
    from weft.http.h2_stream import H2Stream


class H2RequestBody(Body):
    """The request body of one stream, fed by the connection's reader (`H2Stream.on_data`) and
    taken by the upstream side; credit goes back to the client as it is taken."""

    def __init__(self, stream: H2Stream, length: int | None) -> None:
        super().__init__()
        self._stream = stream
        self.length = length
        self.received = 0

    def _count(self, n: int) -> None:
        self.received += n
        if self.limit is not None and self.received > self.limit:
            raise BodyTooLarge(self.limit)

    def prefetched(self) -> tuple[list[bytes], bool]:
        stream = self._stream
        chunks = stream.take_all()
        for c in chunks:
            self._count(len(c))
        return chunks, stream.ended and not stream.chunks

    async def receive(self) -> bytes:
        stream = self._stream
        if not stream.chunks:
            if stream.ended:
                return b""
            await stream.wait_data()
            if not stream.chunks:
                return b""
        data = stream.take_one()
        self._count(len(data))
        return data

    async def receive_into(self, view: memoryview) -> int:
        stream = self._stream
        if not stream.chunks:
            if stream.ended:
                return 0
            await stream.wait_data()
            if not stream.chunks:
                return 0
        n = stream.take_into(view)
        self._count(n)
        return n


# The request fields build_request treats apart (besides the configured request id header).
_SPECIAL = frozenset((b"host", b"cookie", b"content-length", b"expect"))


def build_request(srv: H2Server, stream: H2Stream) -> Request:
    """The `Request` for a stream's header block. Raises ClientError (its status and reason)
    for what an h1 head would be refused for (see the module docstring)."""
    lim = srv.limits
    method = path = authority = b""
    host = None
    headers: HeaderList = []
    cookies: list[bytes] = []
    size = 0
    length: int | None = None
    rid = b""
    rid_header = srv.rid_header
    for k, v in stream.head:
        size += len(k) + len(v) + 32
        if k[:1] == b":":
            if k == b":method":
                method = v
            elif k == b":path":
                path = v
            elif k == b":authority":
                authority = v
            continue  # :scheme is the listener's to say
        if k in _SPECIAL or k == rid_header:  # one set lookup for the ordinary field
            if k == b"host":
                host = v
                continue
            if k == b"cookie":
                cookies.append(v)
                continue
            if k == b"content-length":
                if length is not None or not v.isdigit():
                    raise ClientError("malformed Content-Length", reason="bad_request")
                length = int(v)
            elif k == b"expect":
                stream.expect_continue = v.lower() == b"100-continue"
            elif k == rid_header:
                rid = v
        headers.append((k, v))
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if len(headers) > lim.max_headers:
        raise ClientError("too many header fields", status=431, reason="too_many_headers")
    if size > lim.max_header_bytes:
        raise ClientError("request head too large", status=431, reason="head_too_large")
    if len(path) > lim.max_request_line:
        raise ClientError("request target too long", status=414, reason="uri_too_long")
    if not METHOD.match(method):
        raise ClientError("malformed method", reason="bad_method")
    if method == b"CONNECT":
        raise ClientError("CONNECT is not supported", status=405, reason="connect")
    if not path or TARGET_BAD.search(path):
        raise ClientError("malformed request target", reason="bad_target")
    if path == b"*":
        if method != b"OPTIONS":
            raise ClientError("asterisk-form is only valid for OPTIONS", reason="bad_target")
    elif path[:1] != b"/":
        raise ClientError("malformed request target", reason="bad_target")
    authority = authority or host or b""
    if not authority or not _HOST.match(authority) or b"@" in authority:
        raise ClientError("missing or malformed :authority", reason="bad_host")
    headers.insert(0, (b"host", authority))
    if not fields_valid(headers):
        # A CR, LF or NUL in a value would be a second request to an h1 upstream.
        raise ClientError("malformed header field", reason="bad_request")
    if stream.ended and length is None and not stream.trailers:
        # The whole body came before the request was built: it goes on with its length.
        length = sum(map(len, stream.chunks))
    body = stream.body = H2RequestBody(stream, length)
    body.trailers = stream.trailers
    request = Request(
        method.decode("ascii"),
        path.decode("latin-1"),
        Headers(headers),
        body,
        http_version="2",
        client=srv.client,
        scheme="https" if srv.transport.tls else "http",
        request_id=rid.decode("ascii") if valid_request_id(rid) else new_request_id(),
        start=trio.current_time(),
        interim=lambda status, fields: srv.send_interim(stream, status, fields),
    )
    request.client_watch = stream
    peer_id = srv.transport.peer_id
    if peer_id is not None:
        # The principal until [routes.jwt_svid] replaces it with the token's subject.
        request.ctx["peer_id"] = request.ctx["principal"] = peer_id
    return request
