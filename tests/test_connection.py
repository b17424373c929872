"""Unit tests for weft.connection: upstream pools against real loopback servers.

Each test runs small HTTP/1.1 servers on 127.0.0.1 inside its own trio run. A connection is
made reusable the only way the pool accepts: a real request/response exchange over it, so h11
is DONE on both sides. Tests about waiting and timeouts run on trio's autojump clock, so a
"5 second" queue timeout takes no real time and its length is asserted exactly.
"""

from __future__ import annotations

import socket
from functools import partial

import h11
import pytest
import trio
import trio.testing

from weft.connection import PoolFull, UpstreamPools
from weft.http.errors import UpstreamError
from weft.http.h1_client import H1Upstream
from weft.http.io import Timers
from weft.http.messages import BytesBody
from weft.http.upstream import Outgoing
from weft.schema import Destination, Endpoint, PoolConfig, Timeouts

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


class Upstream:
    """A loopback server answering every request head with an empty 200, counting what it saw."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0  # connections opened to it
        self.requests = 0
        self.gone = 0  # connections the pool closed (EOF or reset seen)
        self.streams: set[trio.SocketStream] = set()
        self._changed = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.streams.add(stream)
        buf = b""
        try:
            while data := await stream.receive_some(65536):
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    self.requests += 1
                    await stream.send_all(OK)
            self.gone += 1
        except trio.BrokenResourceError:
            self.gone += 1
        except trio.ClosedResourceError:
            pass  # we closed it ourselves (close_all)
        finally:
            self.streams.discard(stream)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_gone(self, n: int, timeout: float = 5.0) -> None:
        """Wait until the pool has closed `n` connections to this server."""
        with trio.fail_after(timeout):
            while self.gone < n:
                await self._changed.wait()

    async def close_all(self) -> None:
        """The upstream closes its side of every connection (as on its own keep-alive timeout)."""
        for stream in list(self.streams):
            await stream.aclose()


async def exchange(conn: H1Upstream) -> None:
    """One GET over `conn`, read to the end: afterwards the connection is reusable (the test
    gives it back to the pool itself)."""
    out = Outgoing(
        b"GET", b"/", [(b"host", b"upstream")], BytesBody(b""), has_body=False,
        fields_checked=True,
    )  # fmt: skip
    done: list[bool] = []
    response = await conn.exchange(out, Timeouts(), trio.current_time() + 5.0, None, done.append)
    assert response.status == 200
    while await response.body.receive():
        pass
    assert done == [True]


def destination(name: str, *ports: int, **pool: object) -> Destination:
    return Destination(
        name, tuple(Endpoint("127.0.0.1", p) for p in ports), pool=PoolConfig(**pool)
    )


@pytest.fixture
async def upstreams(nursery):
    """``await upstreams(n)``: n fresh loopback servers."""

    async def start(n: int = 1) -> list[Upstream]:
        out = []
        for _ in range(n):
            up = Upstream()
            listeners = await nursery.start(partial(trio.serve_tcp, up.handle, 0, host="127.0.0.1"))
            up.port = listeners[0].socket.getsockname()[1]
            out.append(up)
        return out

    return start


@pytest.fixture
async def make_pools(nursery):
    """``await make_pools(*destinations, max_total=...)``: pools with their background task
    running; closed at the end of the test."""
    made: list[UpstreamPools] = []

    async def make(
        *dests: Destination, max_total: int = 100, connect_timeout: float = 5.0
    ) -> UpstreamPools:
        pools = UpstreamPools(dests, max_total, connect_timeout)
        await nursery.start(pools.run)
        made.append(pools)
        return pools

    yield make
    for pools in made:
        await pools.aclose()


async def one_pool(upstreams, make_pools, **pool: object):
    (up,) = await upstreams(1)
    pools = await make_pools(destination("web", up.port, **pool))
    return up, pools, pools.by_destination["web"][0]


# -- reuse ---------------------------------------------------------------------------------------


async def test_a_connection_released_after_a_clean_exchange_is_reused(upstreams, make_pools):
    up, pools, pool = await one_pool(upstreams, make_pools)

    # 1. The first request opens a connection.
    conn, reused = await pool.acquire()
    assert reused is False
    await exchange(conn)
    pool.release(conn)
    assert (pool.open, len(pool.idle), pools.idle_count) == (1, 1, 1)

    # 2. The second gets the same connection back, and it really carries a second request.
    again, reused = await pool.acquire()
    assert again is conn
    assert reused is True
    await exchange(again)
    pool.release(again)

    # 3. The upstream saw one connection with two requests.
    assert (up.accepted, up.requests, pool.created) == (1, 2, 1)
    assert pools.stats() == {
        "web": [
            {
                "endpoint": f"127.0.0.1:{up.port}",
                "open": 1,
                "idle": 1,
                "waiting": 0,
                "created": 1,
                "stray_responses": 0,
            }
        ]
    }


async def test_the_most_recently_released_connection_is_reused_first(upstreams, make_pools):
    _, _, pool = await one_pool(upstreams, make_pools)
    a, _ = await pool.acquire()
    b, _ = await pool.acquire()
    await exchange(a)
    await exchange(b)

    pool.release(a)
    pool.release(b)

    # LIFO: the warmest socket first; the oldest ones are left to age out.
    assert (await pool.acquire())[0] is b
    assert (await pool.acquire())[0] is a
    pool.discard(a)
    pool.discard(b)


async def test_a_fresh_acquire_opens_a_new_connection_even_with_idle_ones(upstreams, make_pools):
    _, _, pool = await one_pool(upstreams, make_pools)
    conn, _ = await pool.acquire()
    await exchange(conn)
    pool.release(conn)

    fresh, reused = await pool.acquire(fresh=True)

    assert fresh is not conn
    assert reused is False
    assert (pool.open, len(pool.idle), pool.created) == (2, 1, 2)
    pool.discard(fresh)


async def test_a_connection_the_upstream_closed_while_idle_is_replaced(upstreams, make_pools):
    up, _, pool = await one_pool(upstreams, make_pools)
    conn, _ = await pool.acquire()
    await exchange(conn)
    pool.release(conn)

    # 1. The upstream closes the idle connection (its own keep-alive timeout).
    await up.close_all()
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(conn.transport.sock)  # its FIN has arrived
    assert conn.closed_while_idle()

    # 2. The next request does not get the dead socket: a new one is opened.
    replacement, reused = await pool.acquire()
    assert replacement is not conn
    assert reused is False
    await trio.testing.wait_all_tasks_blocked()  # let the test server's accept loop run
    assert (pool.open, len(pool.idle), pool.created, up.accepted) == (1, 0, 2, 2)
    await exchange(replacement)
    pool.release(replacement)


# -- release and discard -------------------------------------------------------------------------


async def test_a_connection_without_a_finished_exchange_is_closed_on_release(upstreams, make_pools):
    up, pools, pool = await one_pool(upstreams, make_pools)
    conn, _ = await pool.acquire()

    # The request went out but its response was never read: the connection is in doubt.
    c = conn.conn
    data = c.send(h11.Request(method="GET", target="/", headers=[("host", "u")]))
    conn.transport.send_some(data + c.send(h11.EndOfMessage()))
    pool.release(conn)

    assert (pool.open, len(pool.idle), pools.total) == (0, 0, 0)
    await up.wait_gone(1)  # the closer task closed the socket
    fresh, reused = await pool.acquire()
    assert fresh is not conn and reused is False
    pool.discard(fresh)


async def test_discard_closes_the_connection_and_frees_its_slot(upstreams, make_pools):
    up, pools, pool = await one_pool(upstreams, make_pools)
    conn, _ = await pool.acquire()
    await exchange(conn)

    pool.discard(conn)

    assert (pool.open, len(pool.idle), pools.total, pools.idle_count) == (0, 0, 0, 0)
    await up.wait_gone(1)


async def test_a_connection_is_retired_after_max_requests(upstreams, make_pools):
    up, _, pool = await one_pool(upstreams, make_pools, max_requests=2)

    for _ in range(5):
        conn, _ = await pool.acquire()
        await exchange(conn)
        pool.release(conn)

    # Requests 1-2 on the first connection, 3-4 on the second, 5 on the third.
    assert (up.requests, up.accepted, pool.created) == (5, 3, 3)
    await up.wait_gone(2)


async def test_max_requests_zero_means_unlimited(upstreams, make_pools):
    up, _, pool = await one_pool(upstreams, make_pools, max_requests=0)
    for _ in range(20):
        conn, _ = await pool.acquire()
        await exchange(conn)
        pool.release(conn)
    assert (up.requests, up.accepted) == (20, 1)


async def test_idle_connections_beyond_max_idle_are_closed_by_the_sweep_oldest_first(
    upstreams, make_pools, autojump_clock
):
    up, pools, pool = await one_pool(upstreams, make_pools, max_idle_per_endpoint=1)
    a, _ = await pool.acquire()
    b, _ = await pool.acquire()
    await exchange(a)
    await exchange(b)

    # 1. Both go idle: a burst of releases keeps its connections for the next burst.
    pool.release(a)
    pool.release(b)
    assert list(pool.idle) == [a, b]

    # 2. The next sweep closes the oldest one past the cap.
    await trio.sleep(1.5)
    assert list(pool.idle) == [b]
    assert (pool.open, pools.total, pools.idle_count) == (1, 1, 1)
    await up.wait_gone(1)


async def test_idle_connections_are_swept_after_idle_timeout(upstreams, make_pools, autojump_clock):
    up, pools, pool = await one_pool(upstreams, make_pools, idle_timeout=3.0)
    old, _ = await pool.acquire()
    young, _ = await pool.acquire()
    await exchange(old)
    await exchange(young)

    # 1. `old` goes idle now, `young` two seconds later.
    pool.release(old)
    await trio.sleep(2)
    pool.release(young)

    # 2. After 3s (+ one sweep interval) only the connection idle for longer is gone.
    await trio.sleep(2.5)
    assert list(pool.idle) == [young]
    await up.wait_gone(1)

    # 3. Two seconds on, the other one is swept too.
    await trio.sleep(2)
    assert list(pool.idle) == []
    assert (pool.open, pools.total, pools.idle_count) == (0, 0, 0)
    await up.wait_gone(2)


# -- caps and the wait queue ---------------------------------------------------------------------


async def test_at_max_per_endpoint_a_request_waits_for_a_released_connection(upstreams, make_pools):
    up, pools, pool = await one_pool(upstreams, make_pools, max_per_endpoint=2)
    a, _ = await pool.acquire()
    b, _ = await pool.acquire()
    got = []

    async def third() -> None:
        got.append(await pool.acquire())

    async with trio.open_nursery() as nursery:
        # 1. A third request finds both connections busy and waits.
        nursery.start_soon(third)
        await trio.testing.wait_all_tasks_blocked()
        assert (pool.open, pool.waiting, pools.waiting, got) == (2, 1, 1, [])

        # 2. The first connection finishes its exchange and is handed to the waiter.
        await exchange(a)
        pool.release(a)

    assert got == [(a, True)]
    assert (pool.waiting, pool.created, up.accepted) == (0, 2, 2)
    pool.discard(a)
    pool.discard(b)


async def test_waiters_are_served_first_come_first_served(upstreams, make_pools):
    up, _, pool = await one_pool(upstreams, make_pools, max_per_endpoint=1)
    busy, _ = await pool.acquire()
    await exchange(busy)
    served = []

    async def request(name: str) -> None:
        conn, reused = await pool.acquire()
        served.append((name, reused))
        await exchange(conn)
        pool.release(conn)

    async with trio.open_nursery() as nursery:
        for name in ("first", "second", "third"):
            nursery.start_soon(request, name)
            await trio.testing.wait_all_tasks_blocked()  # each is queued before the next
        assert pool.waiting == 3
        pool.release(busy)

    assert served == [("first", True), ("second", True), ("third", True)]
    assert (up.accepted, up.requests) == (1, 4)


async def test_a_discarded_connection_lets_a_waiter_open_a_new_one(upstreams, make_pools):
    _, _, pool = await one_pool(upstreams, make_pools, max_per_endpoint=1)
    broken, _ = await pool.acquire()
    got = []

    async def waiter() -> None:
        got.append(await pool.acquire())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        pool.discard(broken)

    ((conn, reused),) = got
    assert conn is not broken
    assert reused is False
    assert (pool.open, pool.created) == (1, 2)
    pool.discard(conn)


async def test_waiting_longer_than_queue_timeout_is_pool_full(
    upstreams, make_pools, autojump_clock
):
    _, pools, pool = await one_pool(upstreams, make_pools, max_per_endpoint=1, queue_timeout=5.0)
    busy, _ = await pool.acquire()

    start = trio.current_time()
    with pytest.raises(PoolFull) as info:
        await pool.acquire()

    # 1. queue_timeout later (on the worker timers' next tick), a 503 the client is told to
    #    retry.
    assert 5.0 <= trio.current_time() - start <= 5.0 + Timers.TICK + 1e-6
    assert (info.value.status, info.value.reason, info.value.retry_after) == (503, "pool_full", 1)
    assert "no connection within 5s" in info.value.detail
    # 2. The waiter left the queue.
    assert (pool.waiting, pools.waiting, len(pool.waiters)) == (0, 0, 0)
    pool.discard(busy)


async def test_a_full_queue_is_pool_full_at_once(upstreams, make_pools, autojump_clock):
    _, _, pool = await one_pool(
        upstreams, make_pools, max_per_endpoint=1, queue_size=1, queue_timeout=5.0
    )
    busy, _ = await pool.acquire()
    got = []

    async def queued() -> None:
        got.append(await pool.acquire())

    async with trio.open_nursery() as nursery:
        # 1. One request waits: the queue (size 1) is now full.
        nursery.start_soon(queued)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.waiting == 1

        # 2. The next one is refused without waiting at all.
        start = trio.current_time()
        with pytest.raises(PoolFull, match="1 requests already wait"):
            await pool.acquire()
        assert trio.current_time() == start

        # 3. The queued request is still served when a slot frees.
        pool.discard(busy)

    ((conn, reused),) = got
    assert reused is False
    pool.discard(conn)


async def test_queue_size_zero_never_waits(upstreams, make_pools):
    _, _, pool = await one_pool(upstreams, make_pools, max_per_endpoint=1, queue_size=0)
    busy, _ = await pool.acquire()
    with pytest.raises(PoolFull):
        await pool.acquire()
    pool.discard(busy)


async def test_worker_cap_closes_an_idle_connection_of_another_endpoint(upstreams, make_pools):
    up_a, up_b = await upstreams(2)
    pools = await make_pools(destination("a", up_a.port), destination("b", up_b.port), max_total=1)
    (pool_a,), (pool_b,) = pools.by_destination["a"], pools.by_destination["b"]

    # 1. Endpoint a holds the worker's only connection, idle.
    conn_a, _ = await pool_a.acquire()
    await exchange(conn_a)
    pool_a.release(conn_a)
    assert (pools.total, pools.idle_count) == (1, 1)

    # 2. A request to b does not wait: a's idle connection is closed to make room.
    conn_b, reused = await pool_b.acquire()
    assert reused is False
    assert (pool_a.open, len(pool_a.idle), pool_b.open) == (0, 0, 1)
    assert (pools.total, pools.idle_count) == (1, 0)
    await up_a.wait_gone(1)
    pool_b.discard(conn_b)


async def test_worker_cap_closes_the_oldest_idle_connection(upstreams, make_pools, autojump_clock):
    ups = await upstreams(3)
    pools = await make_pools(
        *(destination(name, up.port) for name, up in zip("abc", ups, strict=True)), max_total=2
    )
    pool_a, pool_b, pool_c = (pools.by_destination[n][0] for n in "abc")
    conn_a, _ = await pool_a.acquire()
    conn_b, _ = await pool_b.acquire()
    await exchange(conn_a)
    await exchange(conn_b)
    pool_b.release(conn_b)
    await trio.sleep(1)
    pool_a.release(conn_a)  # a is the more recently idle one

    conn_c, _ = await pool_c.acquire()

    assert (len(pool_a.idle), len(pool_b.idle)) == (1, 0)
    pool_c.discard(conn_c)


async def test_worker_cap_with_nothing_idle_waits_for_another_endpoint_to_free_one(
    upstreams, make_pools
):
    up_a, up_b = await upstreams(2)
    pools = await make_pools(destination("a", up_a.port), destination("b", up_b.port), max_total=1)
    (pool_a,), (pool_b,) = pools.by_destination["a"], pools.by_destination["b"]
    conn_a, _ = await pool_a.acquire()
    got = []

    async def request_to_b() -> None:
        got.append(await pool_b.acquire())

    async with trio.open_nursery() as nursery:
        # 1. The worker's only connection is busy on a: the request to b waits.
        nursery.start_soon(request_to_b)
        await trio.testing.wait_all_tasks_blocked()
        assert (pool_b.waiting, got) == (1, [])

        # 2. a's exchange ends; its connection goes idle, which wakes b's waiter, which closes
        #    it to make room.
        await exchange(conn_a)
        pool_a.release(conn_a)

    ((conn_b, reused),) = got
    assert reused is False
    assert (pool_a.open, pool_b.open, pools.total) == (0, 1, 1)
    await up_a.wait_gone(1)
    pool_b.discard(conn_b)


# -- opening fails -------------------------------------------------------------------------------


async def test_a_refused_connect_is_502_and_leaves_no_count_behind(make_pools):
    with socket.socket() as s:  # a port that was just free: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pools = await make_pools(destination("web", port))
    pool = pools.by_destination["web"][0]

    with pytest.raises(UpstreamError) as info:
        await pool.acquire()

    assert (info.value.status, info.value.reason) == (502, "connect_error")
    assert f"127.0.0.1:{port}" in info.value.detail
    assert (pool.open, pool.created, pools.total) == (0, 0, 0)


async def test_a_connect_that_hangs_is_504_after_connect_timeout(make_pools, autojump_clock):
    # A listener that never accepts and has a full backlog: the kernel drops further SYNs,
    # so connect() hangs as it would to a black-holed host.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    try:
        pools = await make_pools(destination("web", port), connect_timeout=3.0)
        pool = pools.by_destination["web"][0]
        start = trio.current_time()

        with pytest.raises(UpstreamError) as info:
            await pool.acquire()

        assert (info.value.status, info.value.reason) == (504, "connect_timeout")
        assert trio.current_time() - start == pytest.approx(3.0)
        assert (pool.open, pools.total) == (0, 0)
    finally:
        for s in fillers:
            s.close()
        listener.close()


# -- closing -------------------------------------------------------------------------------------


async def test_aclose_closes_idle_now_busy_on_release_and_turns_waiters_away(upstreams, make_pools):
    up, pools, pool = await one_pool(upstreams, make_pools, max_per_endpoint=2)
    idle, _ = await pool.acquire()
    busy, _ = await pool.acquire()
    await exchange(idle)
    await exchange(busy)
    outcomes = []

    async def waiter() -> None:
        try:
            await pool.acquire()  # both connections are out: this one waits
        except UpstreamError as e:
            outcomes.append((e.status, e.reason))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.waiting == 1
        pool.release(idle)  # handed to nobody yet: the waiter runs only after this task yields
        assert len(pool.idle) == 1

        # 1. Drain: the idle connection closes at once, the waiter is told the worker stops.
        await pools.aclose()

    assert outcomes == [(503, "draining")]
    assert (len(pool.idle), pool.open) == (0, 1)
    await up.wait_gone(1)

    # 2. New requests are turned away the same way.
    with pytest.raises(UpstreamError) as info:
        await pool.acquire()
    assert (info.value.status, info.value.reason) == (503, "draining")

    # 3. The busy connection finishes cleanly but is closed, not kept.
    pool.release(busy)
    assert (len(pool.idle), pool.open, pools.total) == (0, 0, 0)
    await up.wait_gone(2)


# -- fresh connections at the endpoint cap -------------------------------------------------------


async def test_a_fresh_acquire_at_the_cap_closes_an_idle_connection_instead_of_waiting(
    upstreams, make_pools, autojump_clock
):
    # The forwarder asks for a fresh connection to retry a request whose reused connection was
    # dead. When the endpoint's cap is taken by idle connections, one of them must make room:
    # waiting cannot help, since the idle ones are never handed to a fresh request.
    _, _, pool = await one_pool(upstreams, make_pools, max_per_endpoint=1, queue_timeout=5.0)
    idle, _ = await pool.acquire()
    await exchange(idle)
    pool.release(idle)
    start = trio.current_time()

    conn, reused = await pool.acquire(fresh=True)

    assert trio.current_time() == start
    assert conn is not idle and reused is False
    assert (pool.open, len(pool.idle)) == (1, 0)
    pool.discard(conn)


async def test_a_waiter_wanting_a_fresh_connection_does_not_starve_the_queue(
    upstreams, make_pools, autojump_clock
):
    _, _, pool = await one_pool(upstreams, make_pools, max_per_endpoint=1, queue_timeout=5.0)
    busy, _ = await pool.acquire()
    await exchange(busy)
    outcomes = {}

    async def request(name: str, fresh: bool) -> None:
        start = trio.current_time()
        try:
            conn, _ = await pool.acquire(fresh=fresh)
        except PoolFull:
            outcomes[name] = "pool full"
            return
        outcomes[name] = trio.current_time() - start
        await exchange(conn)
        pool.release(conn)

    async with trio.open_nursery() as nursery:
        # 1. A retry (fresh) queues first, an ordinary request second.
        nursery.start_soon(request, "retry", True)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, "ordinary", False)
        await trio.testing.wait_all_tasks_blocked()

        # 2. The busy connection comes back, idle and healthy.
        pool.release(busy)

    # 3. Both are served at once; neither waits out queue_timeout beside an idle connection.
    assert outcomes == {"retry": 0.0, "ordinary": 0.0}, outcomes
