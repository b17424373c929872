"""The per-request arena is released on every path, judged by the pool itself.

An in-process worker (`weft.workers.worker.Worker`, its buffer pool private to this process)
serves a client on a socket pair, in front of an upstream made of trio tasks on a loopback
listener, so that the test can do what a real process cannot show from outside: cancel a
request mid-transfer. After each path (success, an upstream that fails mid-body, a client that
leaves mid-download or mid-upload, a cancellation) the pool's buffers in use are back to 0.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio
from support.config import simple_config, table

from weft import config
from weft.bufpool import BufferPool
from weft.workers.worker import Worker

BIG = 8 * 1024 * 1024  # more than any socket buffers hold: the relay is mid-transfer


def in_use(pool: BufferPool) -> int:
    return sum(used for used, _ in pool.stats().values())


async def read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


Handler = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def big_body(stream: trio.SocketStream, head: bytes) -> None:
    """A Content-Length download of BIG bytes."""
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)
    block = b"x" * 65536
    for _ in range(BIG // len(block)):
        await stream.send_all(block)


async def half_then_close(stream: trio.SocketStream, head: bytes) -> None:
    """Promises BIG bytes, sends 1 MiB, closes."""
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)
    await stream.send_all(b"y" * (1 << 20))


async def sink(stream: trio.SocketStream, head: bytes) -> None:
    """Reads a request body to its end (by Content-Length), answers 200."""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    got = len(head.partition(b"\r\n\r\n")[2])
    while got < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        got += len(chunk)
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[tuple[int, list[Handler]]]:
    """A loopback listener whose connections are answered by the handler in `handlers[0]`."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    handlers: list[Handler] = [big_body]

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                head = await read_head(stream)
                await handlers[0](stream, head)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    nursery.start_soon(trio.serve_listeners, serve, listeners)
    yield port, handlers


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    """Workers made by `make_worker`; their client sockets and upstream pools closed after."""
    made: list[Worker] = []
    yield made
    for worker in made:
        for client in getattr(worker, "test_clients", []):
            client.sock.close()
        await worker.pools.aclose()


def make_worker(workers: list[Worker], tmp_path: Path, port: int, extra: str = "") -> Worker:
    path = tmp_path / "weft.toml"
    path.write_text(
        simple_config(1, [f"127.0.0.1:{port}"]) + table("[buffers]", {"memory": "1MiB"}) + extra
    )
    worker = Worker(config.load(path), None)
    worker.test_clients = []  # type: ignore[attr-defined]
    workers.append(worker)
    return worker


class Client:
    """The client end of a socket pair whose other end the worker serves."""

    def __init__(self, worker: Worker, nursery: trio.Nursery) -> None:
        theirs, ours = socket.socketpair()
        theirs.setblocking(False)
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.sock = trio.socket.from_stdlib_socket(ours)

        async def serve() -> None:
            with self.scope:
                await worker.handle(theirs, ("127.0.0.1", 1))
            self.done.set()

        worker.connections.acquire_nowait()  # what the accept loop takes for `handle`
        nursery.start_soon(serve)
        worker.test_clients.append(self)  # type: ignore[attr-defined]

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    async def read(self, n: int) -> bytes:
        """At least `n` bytes, or what came before EOF."""
        got = b""
        while len(got) < n:
            chunk = await self.sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (polling shared words: no event to wait on)
            await trio.sleep(0.01)


async def test_a_whole_download_gives_its_buffer_back(upstream, workers, nursery, tmp_path):
    port, _ = upstream
    worker = make_worker(workers, tmp_path, port)
    pool = worker.state.arenas.pool
    client = Client(worker, nursery)
    await client.send(b"GET /big HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    got = await client.read(BIG + 10_000)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"x" * 100)
    assert len(got.partition(b"\r\n\r\n")[2]) == BIG
    await until(client.done.is_set, "the connection to end")
    assert in_use(pool) == 0


async def test_a_cancelled_request_gives_its_buffer_back(upstream, workers, nursery, tmp_path):
    port, _ = upstream
    worker = make_worker(workers, tmp_path, port)
    pool = worker.state.arenas.pool
    client = Client(worker, nursery)
    await client.send(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
    await client.read(1 << 20)  # mid-transfer: the relay holds its buffer, blocked on us
    assert pool.stats()[65536][0] == 1
    client.scope.cancel()  # what a drain's deadline does to the requests still running
    await until(client.done.is_set, "the cancelled connection to end")
    assert in_use(pool) == 0


async def test_a_client_that_leaves_mid_download_gives_its_buffer_back(
    upstream, workers, nursery, tmp_path
):
    port, _ = upstream
    worker = make_worker(workers, tmp_path, port)
    pool = worker.state.arenas.pool
    client = Client(worker, nursery)
    await client.send(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
    await client.read(1 << 20)
    assert pool.stats()[65536][0] == 1
    client.sock.close()
    await until(client.done.is_set, "the abandoned connection to end")
    assert in_use(pool) == 0


async def test_an_upstream_that_fails_mid_body_gives_the_buffer_back(
    upstream, workers, nursery, tmp_path
):
    port, handlers = upstream
    handlers[0] = half_then_close
    worker = make_worker(workers, tmp_path, port)
    pool = worker.state.arenas.pool
    client = Client(worker, nursery)
    await client.send(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
    got = await client.read(BIG)  # the client sees the connection close, short of BIG
    assert got.startswith(b"HTTP/1.1 200 ") and len(got) < BIG
    await until(client.done.is_set, "the connection to end")
    assert in_use(pool) == 0


async def test_a_client_that_leaves_mid_upload_gives_the_replay_buffers_back(
    upstream, workers, nursery, tmp_path
):
    port, handlers = upstream
    handlers[0] = sink
    # A retried route keeps bodies up to 512 KiB for replay, in pool buffers.
    retry = table("[routes.retry]", {"buffer_body": "512KiB"})
    worker = make_worker(workers, tmp_path, port, retry)
    pool = worker.state.arenas.pool
    client = Client(worker, nursery)
    await client.send(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 400000\r\n\r\n")
    await client.send(b"z" * 200_000)
    await until(lambda: pool.stats()[65536][0] >= 3, "the replay buffers to fill")
    client.sock.close()
    await until(client.done.is_set, "the abandoned connection to end")
    assert in_use(pool) == 0


async def test_an_upload_relayed_through_a_buffer_keeps_the_connection(
    upstream, workers, nursery, tmp_path
):
    port, handlers = upstream
    handlers[0] = sink
    worker = make_worker(workers, tmp_path, port)
    pool = worker.state.arenas.pool
    client = Client(worker, nursery)
    body = b"u" * 3_000_000
    # The body is read raw past h11 (Content-Length) into the relay buffer; the request
    # pipelined right behind it must still be read as the next request, not as body.
    async with trio.open_nursery() as inner:
        inner.start_soon(
            client.send,
            b"PUT /a HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body)
            + body
            + b"GET /b HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        )
        got = b""
        while got.count(b"HTTP/1.1 200 ") < 2:
            chunk = await client.sock.recv(65536)
            assert chunk, got
            got += chunk
    assert got.count(b"\r\n\r\nok") == 2
    assert in_use(pool) == 0
    client.sock.close()
    await until(client.done.is_set, "the connection to end")
