"""The config of the HTTP/2 server: ``[limits.h2]``.

`weft.config` hands the table here (from inside ``[limits]``); this module owns its keys, their
ranges and the reasons a user reads when one is wrong. What the values do is
`weft.http.h2_server`'s: they go out in the server's SETTINGS frame, and bound what one
connection may hold.

* ``max_concurrent_streams`` (default 128, nginx's ``http2_max_concurrent_streams``): streams a
  client may have open at once on one connection.
* ``max_header_list_size`` (default: ``[limits]`` ``max_header_bytes``): the largest header
  list a client may send, counted as RFC 7541 §4.1 counts it (name + value + 32 per field).
* ``initial_window_size`` (default 65535, RFC 9113's own): the flow-control window of each
  stream's request body. A stream's body waits in memory only up to its window (credit is
  given back as the upstream takes the bytes), so one connection holds at most
  ``max_concurrent_streams x initial_window_size`` of request bodies: 8 MiB by default, what
  nginx's 64k ``http2_body_preread_size`` with 128 streams allows too.
"""

from __future__ import annotations

from typing import Any

from weft import confread as cr
from weft.schema import H2Limits

__all__ = ["read_h2_limits"]

_KEYS = tuple(H2Limits.__dataclass_fields__)
# RFC 9113 §6.5.2: a window above 2^31-1 is a FLOW_CONTROL_ERROR.
MAX_WINDOW = 2**31 - 1
# Below this an upload costs a round trip per kilobyte (each WINDOW_UPDATE waits for the
# upstream to take the previous window).
MIN_WINDOW = 1024


def read_h2_limits(r: cr.Reader, raw: Any, path: str, max_header_bytes: int) -> H2Limits:
    """``[limits.h2]`` (`raw` None: absent); `max_header_bytes` is the default header list size."""
    if raw is None:
        return H2Limits(max_header_list_size=max_header_bytes)
    t = r.table(raw, path)
    if t is None:
        return H2Limits(max_header_list_size=max_header_bytes)
    d = H2Limits()
    h2 = H2Limits(
        max_concurrent_streams=r.take(
            t,
            "max_concurrent_streams",
            path,
            lambda v: cr.integer(v, lo=1, hi=100_000),
            d.max_concurrent_streams,
        ),
        max_header_list_size=r.take(
            t,
            "max_header_list_size",
            path,
            lambda v: cr.size(v, lo=256, hi=1 << 24),
            max_header_bytes,
        ),
        initial_window_size=r.take(
            t,
            "initial_window_size",
            path,
            lambda v: cr.size(v, lo=MIN_WINDOW, hi=MAX_WINDOW),
            d.initial_window_size,
        ),
    )
    r.unknown(t, path, _KEYS)
    return h2
