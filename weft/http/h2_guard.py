"""Bounds on what one HTTP/2 client may make the server do: the abuse side of `h2_server`.

HTTP/2 lets a client make the server work without asking for anything: a PING, a SETTINGS
frame, an empty DATA frame, a stream opened and reset at once each cost a parse, an event and
often an answer, and none of them is bounded by ``max_concurrent_streams``. The `h2` library
parses and answers them correctly but counts nothing. This module holds the counting, as pure
logic over a clock (tests drive it with plain numbers), and the one bound that has to sit inside
the library's frame parser.

**Rates** (`FloodGuard`): one token bucket per kind of frame, per connection. A client past its
bucket gets GOAWAY ``ENHANCE_YOUR_CALM`` and the connection closes; the worker goes on serving
everyone else. The numbers, and whose they follow:

========================  =======  ========  =================================================
kind                      burst    per sec   why
========================  =======  ========  =================================================
stream resets             1000     33        nghttp2 1.57's rapid-reset defaults (CVE-2023-
                                             44487); counts the client's RST_STREAM and the
                                             streams weft itself refuses or resets for cause
PING                      1000     100       nghttp2 queues at most 1000 unanswered acks; gRPC
                                             BDP probes send about one per round trip
SETTINGS                  100      10        a client sends one, rarely a few (CVE-2019-9515)
empty DATA, no END_STREAM 100      10        Envoy closes at 1 consecutive (CVE-2019-9518);
                                             a bucket forgives the odd one a client library
                                             writes when a body source had nothing ready
PRIORITY                  1000     100       h2 keeps no priority tree, so each costs an
                                             event only (CVE-2019-9513); Envoy allows 100 per
                                             stream
========================  =======  ========  =================================================

**CONTINUATION** (`BoundedFrameBuffer`, CVE-2024-27316): h2 gathers a header block's
CONTINUATION frames in memory until END_HEADERS, and caps them at 64 frames, which with 16 KiB
frames is 1 MiB held per connection before anything is decoded. The bound here is on the
block's bytes while it arrives: past the advertised ``max_header_list_size`` it is a
connection error (ENHANCE_YOUR_CALM). An encoded block is never larger than the list it
decodes to (every field costs 32 bytes in the list's size, and a literal's length prefix
less), so no valid block is refused. The same class refuses a frame whose announced length
passes ``max_frame_size`` as soon as its 9-byte header is in, where h2 would first buffer the
whole frame (up to 16 MiB) and only then find it too long.

The other bounds live where the state is (`weft.http.h2_server`): a HPACK table-size bomb is
answered by capping the encoder's dynamic table at 4096 whatever the client allows, and by
h2's decoder limit on the decoded list size (a hard bound at twice the advertised size, so
that a client slightly over it gets a 431 on its stream, not a closed connection); a client
that stops reading is bounded by ``timeouts.client_send_idle`` on every write and every wait
for flow-control credit.
"""

from __future__ import annotations

from h2.exceptions import DenialOfServiceError, FrameTooLargeError
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import Frame, HeadersFrame

__all__ = ["BoundedFrameBuffer", "FloodGuard", "TokenBucket"]


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second; `take(now)` spends one if there is one."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = burst
        self.at = now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True


# (burst, rate per second) per kind; the table in the module docstring says why.
LIMITS: dict[str, tuple[float, float]] = {
    "reset": (1000, 33),
    "ping": (1000, 100),
    "settings": (100, 10),
    "empty_data": (100, 10),
    "priority": (1000, 100),
}


class FloodGuard:
    """The per-connection buckets of `LIMITS`. `allow(kind, now)` is False once the client
    went past that kind's bucket: the caller closes the connection with ENHANCE_YOUR_CALM
    and reports `tripped` (the kind) in its log line."""

    __slots__ = ("_buckets", "tripped")

    def __init__(self, now: float, limits: dict[str, tuple[float, float]] = LIMITS) -> None:
        self._buckets = {k: TokenBucket(b, r, now) for k, (b, r) in limits.items()}
        self.tripped: str | None = None

    def allow(self, kind: str, now: float) -> bool:
        if self._buckets[kind].take(now):
            return True
        self.tripped = kind
        return False


class BoundedFrameBuffer(FrameBuffer):
    """h2's frame buffer with two bounds it lacks (see the module docstring): a header block
    held while its CONTINUATION frames arrive is at most `max_block` bytes, and a frame
    announcing more than ``max_frame_size`` is refused from its header alone.

    It overrides two members of the pinned h2 (``__next__``, ``_update_header_buffer``);
    `tests/test_h2_guard.py` drives it through a real `h2.connection.H2Connection`, so a
    change of those internals fails there.
    """

    def __init__(self, max_block: int) -> None:
        super().__init__(server=True)
        self.max_block = max_block
        self._block = 0  # bytes of the header block being gathered

    def __next__(self) -> Frame:
        data = self._data
        if len(data) >= 9 and self.max_frame_size:
            length = int.from_bytes(data[:3], "big")
            if length > self.max_frame_size:
                raise FrameTooLargeError(
                    f"frame of {length} bytes announced, max {self.max_frame_size}"
                )
        return super().__next__()

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if f is not None and (
            self._headers_buffer or (isinstance(f, HeadersFrame) and "END_HEADERS" not in f.flags)
        ):
            self._block += len(f.data)
            if self._block > self.max_block:
                raise DenialOfServiceError(
                    f"header block over {self.max_block} bytes while still arriving"
                )
        out = super()._update_header_buffer(f)
        if not self._headers_buffer:
            self._block = 0
        return out
