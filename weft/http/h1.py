"""HTTP/1.1 helpers shared by the server side (`h1_server`) and the client side (`h1_client`).

Both sides let h11 do the framing; what they share is how weft talks to h11 cheaply: one
immutable end-of-message event, the header list taken from h11's own storage, and the check
that lets a request line skip h11's per-field validation. And one check h11 leaves out:
`check_chunk_lines` makes h11's chunked reader refuse chunk sizes past 63 bits, malformed
chunk extensions and chunk-size lines over 4 KiB (h11 takes any size of up to 20 hex digits,
and anything after ``;``).
"""

from __future__ import annotations

import re

import h11
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer

READ_SIZE = 64 * 1024  # one receive; matches the pool buffer size class of 64 KiB

METHOD = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# What a request target may contain: RFC 3986 characters, no fragment (RFC 9112 §3.2).
TARGET_BAD = re.compile(rb"[^\x21-\x7e]|#")

# h11 events are immutable: the end of a message without trailers is made once (making one
# runs h11's header normalisation over an empty list, twice per proxied request otherwise).
END = h11.EndOfMessage()


def take_body_start(conn: h11.Connection, length: int) -> bytearray | None:
    """The start of a Content-Length body that h11 holds (read with the head), taken out of
    h11's receive buffer without a copy; None (nothing taken) when the buffer holds more than
    `length` bytes (bytes past the body: h11 keeps them, and the connection's reuse check sees
    them). h11 then holds nothing, and the caller reads the rest of the body raw.

    h11 would hand these bytes out as a Data event, which copies them from its buffer, and
    for a 64 KiB response that is the largest allocation of the exchange. This reaches into
    the pinned h11 (0.16.0): its ReceiveBuffer keeps unparsed bytes in ``_data`` and search
    positions that must restart at 0 (`tests/test_arena_pool.py` checks it stays so).
    """
    buf = conn._receive_buffer
    data = buf._data
    if len(data) > length:
        return None
    buf._data = bytearray()
    buf._next_line_search = 0
    buf._multiple_lines_search = 0
    return data


def data_bytes(conn: h11.Connection, chunk: bytes | memoryview) -> bytes | memoryview:
    """What to write for one chunk of a body on `conn`: the chunk itself when the framing adds
    nothing (Content-Length, HTTP/1.0), so a relay writes from its pool buffer without a copy
    (h11's `send` would join it into new bytes); else the chunk framed (chunked)."""
    parts = conn.send_with_data_passthrough(h11.Data(data=chunk))
    return parts[0] if len(parts) == 1 else b"".join(parts)


# RFC 9112 §7.1 and §7.1.1 (with RFC 9110 §5.6: token, quoted-string, BWS): one chunk-size
# line without its CRLF. h11 itself refuses BWS before the first ";", and allows OWS at the end.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]+)(?:[ \t]*;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb"|"
    + _QUOTED
    + rb"))?)*[ \t]*"
)
# Past this a chunk size is no length anything downstream can hold (a signed 64-bit offset,
# what nginx and most upstreams count in); h11 takes up to 20 hex digits, 80 bits.
MAX_CHUNK_SIZE = 2**63 - 1
# The longest chunk-size line, extensions included (Go's net/http limit; RFC 9112 §7.1.1 asks
# for one). Real extensions are short (S3's chunk-signature: 81 bytes); the bound also caps the
# regex above at about a millisecond per line.
MAX_CHUNK_LINE = 4096


class _CheckedChunkedReader:
    """h11's reader of a chunked body, with each chunk-size line checked before h11 reads it.

    h11 (pinned) calls its reader with its receive buffer for every event; at a chunk boundary
    the next line is a chunk-size line, which this checks and then leaves to h11 to parse. A
    line that fails raises RemoteProtocolError, which h11 passes on from `next_event` as its
    own (the peer's state becomes ERROR).
    """

    __slots__ = ("_inner",)

    def __init__(self, inner: ChunkedReader) -> None:
        self._inner = inner

    def __call__(self, buf: ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        r = self._inner
        if r._bytes_in_chunk == 0 and not r._reading_trailer:
            data = buf._data
            start = len(r._bytes_to_discard)  # the CRLF after the previous chunk (h11 checks it)
            end = data.find(b"\r\n", start, start + MAX_CHUNK_LINE + 2)
            if end < 0 and len(data) >= start + MAX_CHUNK_LINE + 2:
                raise h11.RemoteProtocolError(f"chunk-size line over {MAX_CHUNK_LINE} bytes")
            if end >= 0:
                m = _CHUNK_LINE.fullmatch(data, start, end)
                if m is None:
                    raise h11.RemoteProtocolError(
                        f"malformed chunk-size line {bytes(data[start:end][:80])!r}"
                    )
                size = m.group(1)
                if int(size, 16) > MAX_CHUNK_SIZE:
                    raise h11.RemoteProtocolError(f"chunk size 0x{size[:40].decode()} too large")
        return r(buf)

    def read_eof(self) -> h11.EndOfMessage:
        return self._inner.read_eof()


def check_chunk_lines(conn: h11.Connection) -> None:
    """Have `conn` check the chunk-size lines of the chunked body it is about to read.

    Call it right after the head event of a chunked message (h11 has just made the body's
    reader; it makes a new one for the next message).
    """
    reader = conn._reader
    assert isinstance(reader, ChunkedReader), reader
    conn._reader = _CheckedChunkedReader(reader)


def end_of_message(trailers: list[tuple[bytes, bytes]]) -> h11.EndOfMessage:
    return h11.EndOfMessage(headers=trailers) if trailers else END


def fields(headers: h11._headers.Headers) -> list[tuple[bytes, bytes]]:
    """(lowercase name, value) pairs of an h11 event's headers.

    Iterating h11's Headers goes through `collections.abc.Sequence.__iter__` (an indexing loop
    in Python, 1-2 % of the per-request CPU); its item list gives the same pairs directly.
    h11 is pinned, so its layout is known.
    """
    return [(name, value) for _, name, value in headers._full_items]


def valid_request_line(method: bytes, target: bytes) -> bool:
    """Whether a method and target can be written as a request line unchecked."""
    return (
        METHOD.fullmatch(method) is not None
        and bool(target)
        and TARGET_BAD.search(target) is None
    )
