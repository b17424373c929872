"""`weft.http.h2_guard`: the flood buckets over a fake clock, and the frame buffer's bounds
driven through a real `h2` server connection (so a change of h2's internals fails here)."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest
from h2.exceptions import DenialOfServiceError, FrameTooLargeError
from hyperframe.frame import ContinuationFrame, HeadersFrame

from weft.http.h2_guard import BoundedFrameBuffer, FloodGuard, TokenBucket


def test_a_bucket_gives_its_burst_then_its_rate():
    b = TokenBucket(burst=3, rate=2, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.25) is False  # half a token
    assert b.take(0.5) is True  # one token after 0.5 s at 2/s
    assert b.take(100.0) and b.take(100.0) and b.take(100.0) and not b.take(100.0)


def test_the_guard_names_the_kind_that_tripped():
    g = FloodGuard(0.0, {"ping": (2, 1), "reset": (5, 1)})
    assert g.allow("ping", 0.0) and g.allow("ping", 0.0)
    assert g.allow("reset", 0.0)
    assert not g.allow("ping", 0.0)
    assert g.tripped == "ping"


def _server(max_block: int) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.incoming_buffer = BoundedFrameBuffer(max_block)
    conn.initiate_connection()
    conn.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    return conn


def _block() -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    return client.encoder.encode([(":method", "GET"), (":scheme", "http"),
                                  (":authority", "x"), (":path", "/")])


def test_a_header_block_within_the_bound_still_decodes_across_continuations():
    conn = _server(max_block=4096)
    block = _block()
    frames = HeadersFrame(1, data=block[:5]).serialize()
    frames += ContinuationFrame(1, data=block[5:], flags=["END_HEADERS"]).serialize()
    events = conn.receive_data(frames)
    assert any(type(e).__name__ == "RequestReceived" for e in events), events


def test_a_continuation_chain_past_the_bound_is_refused_before_its_end():
    conn = _server(max_block=4096)
    conn.receive_data(HeadersFrame(1, data=_block()).serialize())  # no END_HEADERS: held
    conn.receive_data(ContinuationFrame(1, data=b"a" * 3000).serialize())
    with pytest.raises(DenialOfServiceError, match="header block over 4096"):
        conn.receive_data(ContinuationFrame(1, data=b"a" * 3000).serialize())


def test_an_oversized_frame_is_refused_from_its_header_alone():
    conn = _server(max_block=4096)
    header = (1 << 20).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")  # 1 MiB DATA
    with pytest.raises(FrameTooLargeError):
        conn.receive_data(header + b"x" * 100)  # h2 alone would wait for the whole MiB
