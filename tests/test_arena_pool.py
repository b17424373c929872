"""`weft.arena_pool`: leases, the one-call release, backpressure, replay bodies; and the raw
Content-Length relay of `weft.http.h1_client` on a socket pair, reading into pool buffers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import h11
import pytest
import trio

from weft.arena_pool import RELAY_SIZE, ArenaPool, BuffersExhausted, ReplayBody, keep_body
from weft.bufpool import MIN_MEMORY, BufferPool, private_pool
from weft.http.errors import UpstreamError
from weft.http.h1 import take_body_start
from weft.http.h1_client import H1Upstream
from weft.http.io import Timers
from weft.http.messages import Body, BytesBody
from weft.http.transport import TCPTransport
from weft.http.upstream import Outgoing
from weft.schema import Endpoint, Timeouts


def in_use(pool: BufferPool) -> int:
    return sum(used for used, _ in pool.stats().values())


@pytest.fixture
def pool() -> Iterator[BufferPool]:
    p = private_pool(MIN_MEMORY)  # one buffer of every class
    yield p
    p.close()


class Chunks(Body):
    """A body that hands out the given chunks, then the end (chunked framing)."""

    def __init__(self, chunks: list[bytes], length: int | None = None) -> None:
        super().__init__()
        self._chunks = list(chunks)
        self.length = length

    async def receive(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


# -- arenas --------------------------------------------------------------------------------------


def test_one_release_gives_back_every_lease_and_keeps_the_head(pool):
    arenas = ArenaPool(pool)
    arena = arenas.acquire()
    arena.head += b"GET / HTTP/1.1\r\n"
    leases = [arena.lease(size) for size in (100, 1000, 4000, 16000, 65536)]
    assert all(b is not None for b in leases)
    assert in_use(pool) == 5 and arena.leased == 5
    assert arena.release() == 5
    assert in_use(pool) == 0 and arena.leased == 0
    assert arena.head == b"GET / HTTP/1.1\r\n"  # connection scratch: pipelined bytes live here
    assert arena.release() == 0  # idempotent
    arenas.give_back(arena)
    assert arenas.acquire() is arena and arena.head == b""


def test_a_lease_never_falls_back_to_another_class(pool):
    arena = ArenaPool(pool).acquire()
    assert arena.lease(RELAY_SIZE) is not None
    assert arena.lease(RELAY_SIZE) is None  # the one 64 KiB buffer is taken: no allocation
    assert in_use(pool) == 1
    arena.release()


async def test_lease_wait_waits_for_a_release_and_notes_it(pool, autojump_clock):
    holder, waiter = ArenaPool(pool).acquire(), ArenaPool(pool).acquire()
    waiter.ctx = ctx = {}
    assert holder.lease(RELAY_SIZE) is not None

    async def free_later() -> None:
        await trio.sleep(2.0)
        holder.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(free_later)
        start = trio.current_time()
        buf = await waiter.lease_wait(RELAY_SIZE, 10.0)
        assert 2.0 <= trio.current_time() - start < 3.0
    assert buf.held and ctx == {"buffer_waits": 1}
    waiter.release()
    assert in_use(pool) == 0


async def test_lease_wait_gives_up_after_its_timeout_with_a_503(pool, autojump_clock):
    holder, waiter = ArenaPool(pool).acquire(), ArenaPool(pool).acquire()
    waiter.ctx = ctx = {}
    holder.lease(RELAY_SIZE)
    with pytest.raises(BuffersExhausted) as info:
        await waiter.lease_wait(RELAY_SIZE, 5.0)
    assert info.value.status == 503 and info.value.reason == "buffers_exhausted"
    assert info.value.retry_after == 1
    assert ctx == {"buffer_waits": 1, "buffer_exhausted": True}
    assert waiter.leased == 0
    holder.release()


async def test_a_cancelled_wait_holds_nothing(pool, autojump_clock):
    holder, waiter = ArenaPool(pool).acquire(), ArenaPool(pool).acquire()
    holder.lease(RELAY_SIZE)
    with trio.move_on_after(1.0):
        await waiter.lease_wait(RELAY_SIZE, 10.0)
    assert waiter.leased == 0
    holder.release()
    assert in_use(pool) == 0


# -- replay bodies -------------------------------------------------------------------------------


async def test_a_small_body_is_kept_in_the_smallest_class_that_holds_it(pool):
    arena = ArenaPool(pool).acquire()
    replay, read = await keep_body(arena, BytesBody(b"x" * 100), 64 * 1024, 1.0)
    assert read == [] and isinstance(replay, ReplayBody)
    assert pool.stats()[256] == (1, 1) and in_use(pool) == 1
    views, complete = replay.prefetched()
    assert complete and b"".join(views) == b"x" * 100 and replay.length == 100
    again = replay.again()
    assert await again.receive() == b"x" * 100 and await again.receive() == b""
    arena.release()
    assert in_use(pool) == 0


async def test_a_large_body_takes_whole_relay_buffers_and_a_small_one_for_its_tail():
    big = private_pool(4 << 20)
    arena = ArenaPool(big).acquire()
    data = bytes(range(256)) * 800  # 204800 bytes: three 64 KiB buffers and 8192 more
    replay, _ = await keep_body(arena, BytesBody(data), 1 << 20, 1.0)
    assert replay is not None
    views, _ = replay.prefetched()
    assert [len(v) for v in views] == [65536, 65536, 65536, 8192]
    assert b"".join(views) == data
    assert {size: used for size, (used, _) in big.stats().items() if used} == {
        65536: 3, 16384: 1}
    arena.release()
    big.close()


async def test_a_chunked_body_keeps_its_framing_and_trailers(pool):
    arena = ArenaPool(pool).acquire()
    body = Chunks([b"a" * 3000, b"b" * 3000])
    body.trailers = [(b"x-sum", b"1")]
    replay, _ = await keep_body(arena, body, 64 * 1024, 1.0)
    assert replay is not None and replay.length is None
    assert replay.trailers == [(b"x-sum", b"1")]
    views, _ = replay.prefetched()
    assert b"".join(views) == b"a" * 3000 + b"b" * 3000
    assert [len(v) for v in views] == [4096, 1904]  # 4 KiB first, then a 64 KiB buffer
    arena.release()
    assert in_use(pool) == 0


async def test_a_body_over_the_limit_is_not_replayable_and_keeps_what_was_read(pool):
    arena = ArenaPool(pool).acquire()
    replay, read = await keep_body(arena, Chunks([b"a" * 5000, b"b" * 5000]), 8000, 1.0)
    assert replay is None
    assert b"".join(read) == b"a" * 4096 + b"a" * 904 + b"b" * 5000
    arena.release()
    replay, read = await keep_body(arena, Chunks([b"a"], length=9000), 8000, 1.0)
    assert replay is None and read == [] and in_use(pool) == 0  # not even read


# -- the raw relay of a Content-Length response --------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[tuple[H1Upstream, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5.0)
    yield H1Upstream(TCPTransport(ours), Endpoint("127.0.0.1", 1), Timers()), theirs
    ours.close()
    theirs.close()


def get() -> Outgoing:
    return Outgoing(b"GET", b"/", [(b"host", b"t")], BytesBody(b""), has_body=False,
                    fields_checked=True)


async def relay(up: H1Upstream, pool: BufferPool, done: list[bool]) -> bytes:
    response = await up.exchange(get(), Timeouts(), trio.current_time() + 5.0, None, done.append)
    chunks, complete = response.body.prefetched()
    out = b"".join(chunks)
    if not complete:
        arena = ArenaPool(pool).acquire()
        try:
            view = (await arena.lease_wait(RELAY_SIZE, 1.0)).view
            while n := await response.body.receive_into(view):
                out += view[:n]
        finally:
            arena.release()
    return out


def send_soon(nursery: trio.Nursery, peer: socket.socket, data: bytes) -> None:
    """Write `data` from a thread: more than a socket pair's buffer holds."""
    nursery.start_soon(trio.to_thread.run_sync, peer.sendall, data)


async def test_a_content_length_body_is_read_raw_to_its_last_byte(upstream, pool):
    up, peer = upstream
    body = bytes(range(256)) * 1000  # 256000 bytes: the head's read holds only part of it
    done: list[bool] = []
    # The next response is sent at once behind the first: a raw read that went one byte past
    # the first body would eat it.
    async with trio.open_nursery() as nursery:
        send_soon(nursery, peer, b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
                  + body + b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntwo")
        assert await relay(up, pool, done) == body
    assert done == [True] and up.raw_done and up.reusable()
    assert up.conn.their_state.__name__ == "SEND_BODY"  # h11 never saw the raw bytes
    up.recycle()
    assert not up.raw_done
    assert await relay(up, pool, done) == b"two"
    assert done == [True, True]
    assert in_use(pool) == 0


async def test_the_raw_read_without_a_buffer_gives_bytes(upstream):
    up, peer = upstream
    body = b"z" * 200_000
    done: list[bool] = []
    async with trio.open_nursery() as nursery:
        send_soon(nursery, peer, b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
                  + body)
        response = await up.exchange(
            get(), Timeouts(), trio.current_time() + 5.0, None, done.append
        )
        assert await response.body.read() == body
    assert done == [True] and up.reusable()


async def test_an_upstream_that_closes_mid_body_fails_the_relay(upstream, pool):
    up, peer = upstream
    done: list[bool] = []

    def send_and_close() -> None:
        peer.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 500000\r\n\r\n" + b"a" * 100_000)
        peer.shutdown(socket.SHUT_WR)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, send_and_close)
        with pytest.raises(UpstreamError) as info:
            await relay(up, pool, done)
    assert info.value.reason == "upstream_reset"
    assert done == [False] and not up.reusable()
    assert in_use(pool) == 0


# -- the pinned h11's buffer, as take_body_start uses it -------------------------------------


def client_conn_with(data: bytes) -> h11.Connection:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "t")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    assert type(conn.next_event()) is h11.Response
    return conn


def test_the_body_start_is_taken_from_h11_uncopied_and_h11_then_needs_data():
    conn = client_conn_with(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
    held = conn._receive_buffer._data
    start = take_body_start(conn, 10)
    assert start is held and start == b"hello"  # the very buffer h11 had, not a copy
    assert conn.next_event() is h11.NEED_DATA and conn.trailing_data == (b"", False)


def test_bytes_past_the_body_stay_with_h11():
    conn = client_conn_with(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\n")
    assert take_body_start(conn, 2) is None
    assert conn.next_event() == h11.Data(data=b"hi")
