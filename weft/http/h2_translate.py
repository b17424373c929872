"""HTTP/1.1 <-> HTTP/2 header translation for the upstream side (pure functions, no I/O).

The forwarder builds a request head as HTTP/1.1 fields (Host by the destination's host rule,
hop-by-hop fields out, Transfer-Encoding: chunked when the body length is unknown). An h2
upstream needs the same request as pseudo-header fields plus regular fields, and RFC 9113
§8.2.2 forbids the connection-specific ones. This module owns exactly that mapping, both ways:

* request: ``:method``, ``:scheme`` (``https`` when the destination has TLS, else ``http``),
  ``:authority`` from Host (then Host is dropped: §8.3.1 says a client SHOULD use
  ``:authority`` instead), ``:path`` from the target; Connection, Keep-Alive,
  Proxy-Connection, Transfer-Encoding, Upgrade and whatever Connection names are removed; TE
  is kept only as ``trailers`` (gRPC needs it; §8.2.2 allows no other value);
* response: ``:status`` out as an int, other pseudo fields dropped, the rest passed on.
  Framing goes the other way by itself: a response without Content-Length is relayed to an
  h1 client chunked (the h1 server does that for any body of unknown length), and DATA frames
  become its chunks;
* trailers: pseudo and connection-specific fields never travel in a trailing HEADERS frame.
"""

from __future__ import annotations

from weft.http.headers import connection_tokens
from weft.http.messages import HeaderList

# RFC 9113 §8.2.2: fields an h2 message must not carry (Host: replaced by :authority).
CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def request_headers(
    method: bytes, target: bytes, headers: HeaderList, scheme: bytes
) -> HeaderList:
    """The h2 header block for an h1-shaped request: pseudo fields first (§8.3), then the
    fields an h2 request may carry. ``:authority`` comes from the first Host field (omitted
    when there is none, which the forwarder never does)."""
    named = connection_tokens(headers) if any(k == b"connection" for k, _ in headers) else ()
    authority: bytes | None = None
    rest: HeaderList = []
    for k, v in headers:
        if k == b"host":
            if authority is None:
                authority = v
            continue
        if k in CONNECTION_SPECIFIC or k in named:
            continue
        if k == b"te":
            if b"trailers" in (t.strip().lower() for t in v.split(b",")):
                rest.append((b"te", b"trailers"))
            continue
        rest.append((k, v))
    out: HeaderList = [(b":method", method), (b":scheme", scheme)]
    if authority is not None:
        out.append((b":authority", authority))
    out.append((b":path", target))
    out.extend(rest)
    return out


def trailer_fields(trailers: HeaderList) -> HeaderList:
    """Request trailers as they may go in the trailing HEADERS frame: no pseudo fields, no
    connection-specific ones, nothing that frames the message (§8.1)."""
    return [
        (k, v)
        for k, v in trailers
        if not k.startswith(b":")
        and k not in CONNECTION_SPECIFIC
        and k not in (b"te", b"host", b"content-length")
    ]


def response_head(headers: list[tuple[bytes, bytes]]) -> tuple[int, HeaderList]:
    """``(status, fields)`` of an h2 response header block (the h2 library checked the block:
    one ``:status``, pseudo fields first, no connection-specific fields). Raises ValueError
    when ``:status`` is missing or not three digits."""
    status = None
    out: HeaderList = []
    for k, v in headers:
        if k.startswith(b":"):
            if k == b":status":
                status = v
            continue
        out.append((k, v))
    if status is None or len(status) != 3 or not status.isdigit():
        raise ValueError(f"bad :status {status!r}")
    return int(status), out
