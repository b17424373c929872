"""Socket reads and writes for the data path, without trio's stream layers.

trio's `SocketStream.send_all`/`receive_some` wrap every system call in a conflict detector, an
exception-translating context manager and, inside `trio.socket`, an async context manager
(`_try_sync`) that checkpoints before and after. Measured with py-spy on the 1 KiB proxy
benchmark, those wrappers cost about as much as the system calls themselves, four times per
proxied request. These two functions do the same job directly on the non-blocking stdlib socket:

* try the call first; on ``BlockingIOError`` wait for readiness with
  `trio.lowlevel.wait_readable`/`wait_writable` (a checkpoint) and retry;
* a read that succeeded at once still yields to the scheduler (`checkpoint`), so a connection
  whose data is always ready (a large streamed body) cannot starve the others, and cancellation
  and deadlines are still honoured on every read. A write that succeeded at once does not: each
  write in the data path follows a read, which already yielded.

Errors are the stdlib's `OSError`s (the callers turn them into `ClientGone`/`UpstreamError`).
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import math
import os
import select
import socket
from collections.abc import Callable

import trio
from trio.lowlevel import checkpoint, notify_closing, wait_readable, wait_writable

#: A read buffer shared by every task of this process (a worker runs one trio thread): a read
#: into it is copied out (into h11's buffer, a connection's head buffer) before the reading
#: task awaits anything, so it never holds bytes across a scheduler switch. It saves a
#: 64 KiB `bytes` object per read, which `sock.recv(65536)` allocates and then shrinks.
SCRATCH = memoryview(bytearray(64 * 1024))


async def recv(sock: socket.socket, size: int) -> bytes:
    """Read up to `size` bytes; ``b""`` at EOF. Raises OSError (e.g. a reset)."""
    try:
        data = sock.recv(size)
    except BlockingIOError:
        pass
    else:
        await checkpoint()
        return data
    while True:
        await wait_readable(sock)
        try:
            return sock.recv(size)
        except BlockingIOError:
            continue


def send_some(sock: socket.socket, data: bytes | memoryview) -> int:
    """One non-blocking write: how many bytes the kernel took (0 when its buffer is full).
    Raises OSError.

    Callers on the data path write with this first and await `send_all` only for a rest, so
    the common case (the kernel takes everything) costs no coroutine at all.
    """
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


async def send_all(
    sock: socket.socket, data: bytes | memoryview, timeout: float = math.inf
) -> None:
    """Write all of `data`, waiting while the socket buffer is full, at most `timeout` seconds
    without progress. Raises TimeoutError, or OSError from the socket.

    The common case (the kernel takes everything at once) enters no cancel scope and does not
    yield; only a write that has to wait pays for the timeout machinery.
    """
    sent = send_some(sock, data)
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while view:
        with trio.move_on_after(timeout) as scope:
            await wait_writable(sock)
        if scope.cancelled_caught:
            raise TimeoutError(f"no write progress in {timeout:g}s")
        view = view[send_some(sock, view) :]


async def accept(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    """Accept one connection: non-blocking, TCP_NODELAY set. Raises OSError (EMFILE, ...).

    Unlike `recv`, an immediate success does not yield: the accept loop takes a burst of
    queued connections in one go (it yields itself every few accepts), because a connection
    left in the backlog waits for a whole scheduler round per accept otherwise (measured: p99
    of 1 s for the first requests of 64 new connections under load).
    """
    try:
        conn, addr = listener.accept()
    except BlockingIOError:
        while True:
            await wait_readable(listener)
            try:
                conn, addr = listener.accept()
                break
            except BlockingIOError:
                continue
    conn.setblocking(False)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn, (addr[0], addr[1])


async def connect(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket with TCP_NODELAY; tries each resolved address.

    Raises OSError from the last address tried. Cancellation closes the half-open socket.
    """
    try:
        ipaddress.ip_address(host)
        infos = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
    except ValueError:
        resolved = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        infos = [(family, addr) for family, _, _, _, addr in resolved]
    last: OSError | None = None
    for family, addr in infos:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err == errno.EINPROGRESS:
                await wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            close(sock)
            last = e
        except BaseException:
            close(sock)
            raise
    assert last is not None
    raise last


def close(sock: socket.socket) -> None:
    """Close a socket trio may be waiting on (wakes such waiters with ClosedResourceError)."""
    if sock.fileno() != -1:
        notify_closing(sock)
        sock.close()


class PeerWatch:
    """Sockets whose peer may leave while nothing reads from them, checked every tick.

    A client whose request waits on an upstream is read by nobody, so its close would go
    unseen until the upstream answers. Instead its socket is registered here: `check` (run by
    `Timers.expire` every `Timers.TICK`) makes one ``poll(0)`` over the registered sockets for
    POLLRDHUP (the peer shut its side: closed, or half-closed as nginx also counts it), POLLHUP
    and POLLERR, and calls the callback of each that fired, once. Pipelined bytes do not fire
    it. Registering and unregistering are dict operations inside the poll object, no system
    call, so watching costs a request two of them and the worker one poll() per tick while
    anything is watched. Detection is up to a tick late.
    """

    _EVENTS = select.POLLRDHUP

    def __init__(self) -> None:
        self._poll = select.poll()
        self._callbacks: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, on_gone: Callable[[], None]) -> None:
        """Call `on_gone()` (once, from the tick) if the peer of `fd` leaves before `unwatch`."""
        self._poll.register(fd, self._EVENTS)
        self._callbacks[fd] = on_gone

    def unwatch(self, fd: int) -> None:
        """Stop watching `fd` (idempotent). Call it before the socket is closed."""
        if self._callbacks.pop(fd, None) is not None:
            self._poll.unregister(fd)

    def check(self) -> None:
        if not self._callbacks:
            return
        for fd, _events in self._poll.poll(0):
            on_gone = self._callbacks.pop(fd, None)
            if on_gone is not None:
                self._poll.unregister(fd)
                on_gone()

    def __len__(self) -> int:
        return len(self._callbacks)


class Timers:
    """Deadlines for socket waits, without a cancel scope per wait.

    Entering and leaving a trio cancel scope with a deadline costs about 17 µs here (measured
    on the benchmark machine), and the data path waits on a socket with a deadline twice per
    request. Instead, a waiting task arms an entry (deadline, socket) in a heap; `expire`, run
    every `TICK` by `run`, marks expired sockets closing with `trio.lowlevel.notify_closing`,
    which wakes their waiter with `trio.ClosedResourceError`. The waiter sees its entry fired
    and raises TimeoutError; the socket must then be closed, never waited on again. A disarmed
    entry stays in the heap until it would expire or the heap is compacted (when three
    quarters of it is dead), so arming and disarming are O(log n) and O(1).

    Deadlines fire up to `TICK` late: fine for timeouts of seconds, and the price of not
    having a scope per wait.
    """

    TICK = 0.1  # seconds

    def __init__(self) -> None:
        self._heap: list[list] = []
        self._seq = 0
        self._live = 0
        # Peers that may leave while nothing reads them: checked on the same tick.
        self.peers = PeerWatch()

    def arm(self, deadline: float, sock: socket.socket) -> list:
        entry = [deadline, self._seq, sock]
        self._seq += 1
        heapq.heappush(self._heap, entry)
        self._live += 1
        return entry

    def arm_call(self, deadline: float, fn: Callable[[], None]) -> list:
        """An entry that calls `fn` at `deadline` (up to `TICK` late) unless disarmed first:
        a timeout for a wait that is not on a socket (the pool's queue)."""
        return self.arm(deadline, fn)  # type: ignore[arg-type]

    def disarm(self, entry: list) -> None:
        if entry[2] is not None:
            entry[2] = None
            self._live -= 1
            heap = self._heap
            if len(heap) > 1024 and self._live < len(heap) // 4:
                self._heap = [e for e in heap if e[2] is not None]
                heapq.heapify(self._heap)

    def expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            sock = entry[2]
            if sock is not None:
                entry[2] = None
                self._live -= 1
                if callable(sock):
                    sock()  # an arm_call entry
                else:
                    notify_closing(sock)
        self.peers.check()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire deadlines every TICK, until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.TICK)
            self.expire(trio.current_time())


async def recv_until(
    sock: socket.socket, size: int, deadline: float, timers: Timers, *, try_first: bool = True
) -> bytes:
    """`recv` that raises TimeoutError when nothing arrived by `deadline` (see `Timers`).

    `try_first=False` waits for readiness before the first read: for a read that is nearly
    never ready at once (an upstream's answer right after its request was written: measured
    91 % EAGAIN under load), the failed call and its exception cost more than the rare extra
    scheduler round. After a TimeoutError the socket is marked closing: close it.
    """
    # Off the data path now (it reads into SCRATCH or pool buffers with `recv_into_until`):
    # the same wait, into a buffer of its own.
    buf = bytearray(size)
    n = await recv_into_until(sock, memoryview(buf), deadline, timers, try_first=try_first)
    return bytes(buf[:n])


async def recv_into_until(
    sock: socket.socket,
    view: memoryview,
    deadline: float,
    timers: Timers,
    *,
    try_first: bool = True,
) -> int:
    """`recv_until` into `view` (a pool buffer's, or `SCRATCH`): how many bytes came, 0 at EOF.

    The kernel copies straight into the buffer, and no `bytes` object is made per read. Same
    deadline and wake rules as `recv_until`, with one difference that matters for `SCRATCH`:
    the scheduler yield comes *before* a read that succeeds at once, so nothing awaits between
    the read and the return, and the caller can copy the bytes out of a buffer that other
    tasks of the worker read into too.
    """
    if try_first:
        await checkpoint()
        try:
            return sock.recv_into(view)
        except BlockingIOError:
            pass
    entry = timers.arm(deadline, sock)
    try:
        while True:
            try:
                await wait_readable(sock)
            except trio.ClosedResourceError:
                if entry[2] is None:
                    raise TimeoutError("nothing received by the deadline") from None
                raise
            try:
                return sock.recv_into(view)
            except BlockingIOError:
                continue
    finally:
        timers.disarm(entry)
