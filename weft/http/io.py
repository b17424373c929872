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
import ipaddress
import math
import os
import socket

import trio
from trio.lowlevel import checkpoint, notify_closing, wait_readable, wait_writable


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


async def send_all(sock: socket.socket, data: bytes, timeout: float = math.inf) -> None:
    """Write all of `data`, waiting while the socket buffer is full, at most `timeout` seconds
    without progress. Raises TimeoutError, or OSError from the socket.

    The common case (the kernel takes everything at once) enters no cancel scope and does not
    yield; only a write that has to wait pays for the timeout machinery.
    """
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while view:
        with trio.move_on_after(timeout) as scope:
            await wait_writable(sock)
        if scope.cancelled_caught:
            raise TimeoutError(f"no write progress in {timeout:g}s")
        try:
            sent = sock.send(view)
        except BlockingIOError:
            continue
        view = view[sent:]


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
