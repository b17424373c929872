"""The HTTP/1.1 request as the server side reads it: the head checks weft makes before h11, and
the request body pulled from the client connection.

Split from `weft.http.h1_server`, which owns the connection loop: these are the rules about the
bytes of one request, pure functions of the buffer and the limits except for the body, which
reads through its server. Why weft checks the head itself (h11 applies its size limit only to
heads that arrive in pieces, and repairs the framing evidence: it unfolds obs-fold lines and
merges repeated Content-Length values) is in `h1_server`'s docstring.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import h11

from weft.http.errors import ClientError, ClientGone
from weft.http.h1 import METHOD, TARGET_BAD, check_chunk_lines, fields
from weft.http.headers import new_request_id, valid_request_id
from weft.http.messages import Body, BodyTooLarge, Headers, Request
from weft.schema import Limits

if TYPE_CHECKING:
    from weft.http.h1_server import H1Server

_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# The common request line, accepted in one match: token method, origin-form target of
# visible ASCII without "#", HTTP/1.0 or 1.1 (what the rules below accept, minus CONNECT).
_PLAIN_REQUEST_LINE = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (/[\x21\x22\x24-\x7e]*) (HTTP/1\.[01])\r?"
)
# The framing fields, found in the raw head (see check_fields): each match is one field line.
_FRAMING_FIELD = re.compile(rb"\n(content-length|transfer-encoding)[ \t]*:([^\n]*)", re.I)
# A line that starts with whitespace: obs-fold (RFC 9112 §5.2), or whitespace before the first
# field (§2.2).
_OBS_FOLD = re.compile(rb"\n[ \t]")
_HOST = re.compile(rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?$")


class ClientTimeout(ClientError):
    """The client took too long to send its head or body (408). `what` names the timeout
    (``client_header_timeout``, ``client_body_timeout``); the client is told in words."""

    status = 408
    reason = "client_timeout"

    _SAID = {
        "client_header_timeout": "the request head did not arrive in time",
        "client_body_timeout": "the request body stopped arriving",
    }

    def __init__(self, what: str) -> None:
        super().__init__(self._SAID.get(what, "the request did not arrive in time"))


def head_length(buf: bytearray, lim: Limits) -> int:
    """Length of the complete head at the start of `buf`, -1 while incomplete. Empty lines
    before the request line are removed from `buf`. Raises ClientError when a limit is passed."""
    # RFC 9112 §2.2: ignore empty lines before the request line.
    if buf[:1] in (b"\r", b"\n"):
        n = 0
        while n < len(buf) and buf[n] in (13, 10):
            n += 1
        del buf[:n]
    end = buf.find(b"\r\n\r\n")
    if end >= 0:
        head_len = end + 4
    elif b"\n\n" in buf or b"\n\r\n" in buf:
        m = _HEAD_END.search(buf)
        head_len = m.end() if m else -1
    else:
        head_len = -1
    nl = buf.find(b"\n")
    line_len = nl if nl >= 0 else len(buf)
    if line_len > lim.max_request_line + 1:
        raise ClientError("request line too long", status=414, reason="uri_too_long")
    if head_len >= 0:
        if head_len > lim.max_header_bytes:
            raise ClientError("request head too large", status=431, reason="head_too_large")
        return head_len
    if len(buf) > lim.max_header_bytes:
        raise ClientError("request head too large", status=431, reason="head_too_large")
    return -1


def request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """(method, target, version) of a request line (without its LF). Raises ClientError with
    the status and reason of the first rule it breaks."""
    m = _PLAIN_REQUEST_LINE.fullmatch(line)
    if m is not None and m.group(1) != b"CONNECT":
        return m.group(1), m.group(2), m.group(3)
    # Anything else is checked rule by rule, to give each refusal its status and reason.
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) != 3:
        if len(parts) == 2 and METHOD.match(parts[0]):
            raise ClientError("HTTP/0.9 request line is not supported", reason="bad_request_line")
        raise ClientError("malformed request line", reason="bad_request_line")
    method, target, version = parts
    m = _VERSION.match(version)
    if not m:
        raise ClientError("malformed HTTP version", reason="bad_version")
    if method == b"PRI" and target == b"*" and version == b"HTTP/2.0":
        raise ClientError("HTTP/2 is not served on this port", status=505, reason="h2_preface")
    if m.group(1) != b"1" or m.group(2) not in (b"0", b"1"):
        raise ClientError("HTTP version not supported", status=505, reason="bad_version")
    if not METHOD.match(method):
        raise ClientError("malformed method", reason="bad_method")
    if not target or TARGET_BAD.search(target):
        raise ClientError("malformed request target", reason="bad_target")
    if method == b"CONNECT":
        raise ClientError("CONNECT is not supported", status=405, reason="connect")
    if target == b"*":
        if method != b"OPTIONS":
            raise ClientError("asterisk-form is only valid for OPTIONS", reason="bad_target")
    elif target[:1] != b"/" and not (target.startswith((b"http://", b"https://"))):
        raise ClientError("malformed request target", reason="bad_target")
    return method, target, version


def check_fields(buf: bytearray, start: int, end: int, version: bytes) -> None:
    """Refuse a head whose body length is ambiguous, before h11 parses it.

    `buf[start:end]` is the head from the newline that ends the request line. These checks run
    on the raw bytes because h11 repairs what they look for: it unfolds obs-fold lines and
    merges repeated or listed Content-Length values that agree, and an intermediary that did
    not would frame the same bytes differently (request smuggling). Raises ClientError (400:
    the connection is closed after it, since where this request ends is unknown).
    """
    if _OBS_FOLD.search(buf, start, end):
        # RFC 9112 §5.2 lets a server unfold or refuse: refuse, as nginx does.
        raise ClientError(
            "a header line starts with whitespace (obs-fold)", reason="ambiguous_framing"
        )
    found = _FRAMING_FIELD.findall(buf, start, end)
    if not found:
        return
    lengths = [v for k, v in found if len(k) == 14]  # "content-length"
    codings = [v for k, v in found if len(k) != 14]
    if lengths and codings:
        # RFC 9112 §6.1: MAY be refused; a proxy that passed both on would enable smuggling.
        raise ClientError("both Content-Length and Transfer-Encoding", reason="ambiguous_framing")
    if len(lengths) > 1 or (lengths and b"," in lengths[0]):
        # RFC 9112 §6.3 item 5 allows merging identical values; refuse them all, as nginx does.
        raise ClientError("more than one Content-Length", reason="ambiguous_framing")
    if codings:
        if version == b"HTTP/1.0":
            # RFC 9112 §6.1: an HTTP/1.0 recipient cannot tell where such a body ends.
            raise ClientError(
                "Transfer-Encoding in an HTTP/1.0 request", reason="ambiguous_framing"
            )
        if len(codings) > 1 or codings[0].strip(b" \t\r").lower() != b"chunked":
            # RFC 9112 §6.3 item 4: chunked must be the final coding, and applied once
            # (§7); weft frames no other coding (§6.1 allows 400 as well as 501 for them).
            raise ClientError(
                "Transfer-Encoding must be chunked, once and alone",
                reason="ambiguous_framing",
            )


def make_request(
srv: H1Server,
conn: h11.Connection,
    ev: h11.Request,
    method: bytes,
    target: bytes,
    version: bytes,
    start: float,
) -> Request:
    """The `Request` for the head h11 parsed (`ev`), after the checks h11 leaves out: the
    field count, one valid Host (or the authority of an absolute-form target, which replaces
    it), the request id. Raises ClientError."""
    headers = fields(ev.headers)
    if len(headers) > srv.limits.max_headers:
        raise ClientError("too many header fields", status=431, reason="too_many_headers")
    hosts = []
    has_te = False
    rid = b""
    length = 0
    rid_header = srv.rid_header
    for k, v in headers:
        if k == b"host":
            hosts.append(v)
        elif k == b"content-length":
            length = int(v)  # h11 checked the digits, check_fields that it is alone
        elif k == b"transfer-encoding":
            has_te = True  # "chunked", alone (check_fields)
        elif k == rid_header:
            rid = v
    if len(hosts) > 1:
        raise ClientError("more than one Host header", reason="bad_host")
    if hosts and not _HOST.match(hosts[0]):
        raise ClientError("malformed Host header", reason="bad_host")
    if not hosts and version == b"HTTP/1.1":
        raise ClientError("missing Host header", reason="bad_host")
    if target[:1] != b"/" and target != b"*":
        # absolute-form (RFC 9112 §3.2.2): the target's authority replaces Host.
        rest = target.split(b"://", 1)[1]
        authority, _, path = rest.partition(b"/")
        if not authority or not _HOST.match(authority) or b"@" in authority:
            raise ClientError("malformed absolute-form target", reason="bad_target")
        headers = [(k, v) for k, v in headers if k != b"host"]
        headers.insert(0, (b"host", authority))
        target = b"/" + path
    if has_te:
        length = None
    request_id = rid.decode("ascii") if valid_request_id(rid) else new_request_id()
    body = H1RequestBody(srv, conn, length)
    if length == 0:
        end = conn.next_event()  # no body: h11 has the EndOfMessage ready, take it now
        assert type(end) is h11.EndOfMessage, end
    interim = srv._send_interim if version == b"HTTP/1.1" else None
    req = Request(
        method.decode("ascii"),
        target.decode("latin-1"),
        Headers(headers),
        body,
        http_version=version[5:].decode(),
        client=srv.client,
        scheme="https" if srv.transport.tls else "http",
        request_id=request_id,
        start=start,
        interim=interim,
    )
    if srv.state.draining:
        req.ctx["close"] = True
    peer_id = srv.transport.peer_id
    if peer_id is not None:
        # The principal until [routes.jwt_svid] replaces it with the token's subject.
        req.ctx["peer_id"] = req.ctx["principal"] = peer_id
    return req


class H1RequestBody(Body):
    """The body of the request being served, pulled from the client connection on demand.

    A Content-Length body is read by h11 only as far as h11 already holds it (the bytes that
    came with the head). From the first moment h11 needs more (``NEED_DATA``: its buffer is
    empty), the rest is read **raw**: straight from the socket, at most the bytes still owed,
    so nothing past the body is ever read and the next request's bytes stay in the kernel.
    `receive_into` then puts them into the caller's pool buffer with no `bytes` per chunk. h11
    never sees those bytes, so its state stays in SEND_BODY: the server asks `done`, not h11,
    whether the body ended. A chunked body always goes through h11, which owns chunk parsing.
    """

    __slots__ = ("_conn", "_done", "_event", "_left", "_raw", "_srv", "limit", "received")

    def __init__(self, srv: H1Server, conn: h11.Connection, length: int | None) -> None:
        super().__init__()
        self._srv = srv
        self._conn = conn
        self.length = length
        self.limit: int | None = None
        self.received = 0
        self._done = length == 0
        self._raw = False  # reading past h11, `_left` bytes still owed
        self._left = length or 0
        self._event: object = None  # what `_event_or_raw` found for `_take`
        if length is None:
            check_chunk_lines(conn)  # sizes past 63 bits, malformed chunk-ext: h11 takes them
            # h11 measures an incomplete line (a chunk-size line, the trailer section) against
            # the limit it was made with, the head's own length: a chunk line or trailer longer
            # than a short head, split across reads, would fail. Trailers are bounded like a
            # head, chunk lines by check_chunk_lines. (h11 is pinned; the attribute is its own.)
            conn._max_incomplete_event_size = srv.limits.max_header_bytes

    @property
    def done(self) -> bool:
        return self._done

    @property
    def raw(self) -> bool:
        """Whether the rest of the body was read past h11 (whose state then stays SEND_BODY)."""
        return self._raw

    def prefetched(self) -> tuple[list[bytes], bool]:
        """What h11 holds already (the bytes that came with the head), without I/O; True when
        that is the whole body. A Content-Length body whose rest is not there goes raw."""
        if self._done:
            return [], True
        if self._raw or self._rest:
            return [], False
        chunks = []
        conn = self._conn
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise self._srv.malformed("request body", e, "bad_body") from None
            if ev is h11.NEED_DATA:
                if self.length is not None:
                    self._raw = True
                    self._left = self.length - self.received
                return chunks, False
            self._event = ev
            data = self._take()
            if data:
                chunks.append(data)
            if self._done:
                return chunks, True

    async def receive(self) -> bytes:
        if self._done:
            return b""
        if self._conn.client_is_waiting_for_100_continue:
            await self._send_continue()
        if self._raw or await self._event_or_raw():
            data = await self._srv.receive(self._srv.body_idle, "client_body_timeout", self._left)
            if not data:
                raise ClientGone("client closed while sending the body")
            self._count_raw(len(data))
            return data
        return self._take()

    async def receive_into(self, view: memoryview) -> int:
        if self._done:
            return 0
        if self._conn.client_is_waiting_for_100_continue:
            await self._send_continue()
        if self._raw or await self._event_or_raw():
            if self._left < len(view):
                view = view[: self._left]
            n = await self._srv.receive_into(view, self._srv.body_idle, "client_body_timeout")
            if not n:
                raise ClientGone("client closed while sending the body")
            self._count_raw(n)
            return n
        data = self._take()
        n = len(data)
        if n > len(view):  # h11 held more than the caller's buffer: keep the rest
            self._rest = memoryview(data)[len(view) :]
            n = len(view)
            view[:n] = memoryview(data)[:n]
            return n
        view[:n] = data
        return n

    async def _send_continue(self) -> None:
        """The client sent ``Expect: 100-continue`` and waits: the first read tells it to go
        on (h11 clears the flag when the 100 is sent, raw reads or not)."""
        await self._srv.send_bytes(
            self._conn.send(h11.InformationalResponse(status_code=100, headers=[]))
        )

    def _count_raw(self, n: int) -> None:
        self.received += n
        self._left -= n
        if self.limit is not None and self.received > self.limit:
            raise BodyTooLarge(self.limit)
        if not self._left:
            self._done = True

    async def _event_or_raw(self) -> bool:
        """Step h11 until it has an event for `_take` (False), or a Content-Length body needs
        bytes h11 does not hold: the reading goes raw (True)."""
        if self._rest:
            return False
        conn = self._conn
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise self._srv.malformed("request body", e, "bad_body") from None
            if ev is h11.NEED_DATA:
                if self.length is not None:
                    self._raw = True
                    self._left = self.length - self.received
                    return True
                data = await self._srv.receive(self._srv.body_idle, "client_body_timeout")
                if not data:
                    raise ClientGone("client closed while sending the body")
                conn.receive_data(data)
                continue
            self._event = ev
            return False

    def _take(self) -> bytes:
        """The data of the event `_event_or_raw` found (``b""`` and done at the end)."""
        if self._rest:
            rest, self._rest = self._rest, b""
            return bytes(rest)
        ev, self._event = self._event, None
        t = type(ev)
        if t is h11.Data:
            self.received += len(ev.data)
            if self.limit is not None and self.received > self.limit:
                raise BodyTooLarge(self.limit)
            if self.length is not None and self.received >= self.length:
                # h11 yields EndOfMessage next without I/O: take it now so the forwarder
                # knows the body is complete and can send it in one write.
                end = self._conn.next_event()
                if type(end) is h11.EndOfMessage:
                    self._done = True
            return bytes(ev.data)
        if t is h11.EndOfMessage:
            self.trailers = fields(ev.headers)
            self._done = True
            return b""
        raise self._srv.malformed("request body", f"unexpected {t.__name__}", "bad_body")
