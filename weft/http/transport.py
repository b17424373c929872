"""Byte streams under the protocol adapters: one `Transport` per client or upstream connection.

Every I/O site of the data path (the h1 server and client, the WebSocket tunnel, the pool's
idle check, connect and accept) works on a `Transport` instead of a raw socket, so that TLS can
be put under the same adapters later without touching them. What a transport owns:

* the socket, non-blocking, and its close (which wakes any task waiting on it);
* reads and writes with weft's fast path kept: a read or write is tried at once and awaits
  readiness only when the kernel says EAGAIN, a write that completes inline is not a coroutine
  at all (`send_some`), and deadlines come from the worker's `Timers` heap, not a cancel scope
  per wait (see `weft.http.io`);
* what the connection says about itself: `alpn` (the negotiated protocol, None in cleartext),
  `tls`, `peer_certificate`, so a dispatcher can pick an adapter and a middleware can see the
  peer's identity.

`TCPTransport` is the plain TCP stream of today. A TLS transport (the TLS issue) keeps the same
methods over a non-blocking `ssl.SSLObject` with `ssl.MemoryBIO` pairs: `handshake()` drives the
handshake with a deadline, then `recv` decrypts what `sock.recv` brings and `send_some` writes
what the SSL object produced. Adapters must therefore never touch `sock` for data, only for
readiness-free bookkeeping (`Timers`, `fileno`).

Errors are the stdlib's: `OSError` for a broken connection, `TimeoutError` for a deadline,
`trio.ClosedResourceError` when another task closed the transport.
"""

from __future__ import annotations

import math
import select
import socket

from trio.lowlevel import notify_closing, wait_readable

from weft.http.io import (
    Timers,
    close,
    connect,
    recv,
    recv_into_until,
    recv_until,
    send_all,
    send_some,
)


class Transport:
    """The interface the adapters use; `TCPTransport` is the only kind until TLS lands."""

    __slots__ = ()

    #: the protocol ALPN negotiated ("h2", "http/1.1"), None without TLS
    alpn: str | None = None
    tls = False
    #: the peer's SPIFFE ID (a weft.spiffe_id.SpiffeId) once its X.509-SVID was verified after
    #: the handshake (weft.svid.verify_peer); None otherwise. Adapters copy it into each
    #: request's ctx["peer_id"].
    peer_id = None

    @property
    def peer_certificate(self) -> bytes | None:
        """The peer's leaf certificate (DER) when TLS verified one; None otherwise."""
        return None


class TCPTransport(Transport):
    """A plain TCP connection on a non-blocking socket.

    `sock` stays reachable for the worker's `Timers` (which arm a deadline per socket) and for
    the few socket options the owner sets; reads and writes go through the methods.
    """

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_now(self, size: int) -> bytes | None:
        """One read without waiting: the bytes, ``b""`` at EOF, None when nothing is there.
        Raises OSError (a reset)."""
        try:
            return self.sock.recv(size)
        except BlockingIOError:
            return None

    def recv_into_now(self, view: memoryview) -> int | None:
        """`recv_now` into `view`: the byte count, 0 at EOF, None when nothing is there."""
        try:
            return self.sock.recv_into(view)
        except BlockingIOError:
            return None

    async def recv(self, size: int) -> bytes:
        """Read up to `size` bytes; ``b""`` at EOF. Raises OSError."""
        return await recv(self.sock, size)

    async def recv_until(
        self, size: int, deadline: float, timers: Timers, *, try_first: bool = True
    ) -> bytes:
        """`recv` with a deadline from `timers`: TimeoutError when nothing came by then (the
        transport is then marked closing: close it)."""
        return await recv_until(self.sock, size, deadline, timers, try_first=try_first)

    async def recv_into(
        self, view: memoryview, deadline: float, timers: Timers, *, try_first: bool = True
    ) -> int:
        """`recv_until` into `view` (a pool buffer's): the byte count, 0 at EOF. Same errors."""
        return await recv_into_until(self.sock, view, deadline, timers, try_first=try_first)

    def send_parts(self, parts: list[bytes | memoryview]) -> int:
        """One non-blocking gathered write (``sendmsg``, writev): how much the kernel took of
        the parts, in order. The head and a body chunk go out together without being joined
        into a new object. Raises OSError."""
        try:
            return self.sock.sendmsg(parts)
        except BlockingIOError:
            return 0

    def send_some(self, data: bytes | memoryview) -> int:
        """One non-blocking write; how much the kernel took. Raises OSError."""
        return send_some(self.sock, data)

    async def send_all(self, data: bytes | memoryview, timeout: float = math.inf) -> None:
        """Write everything, at most `timeout` seconds without progress (TimeoutError)."""
        await send_all(self.sock, data, timeout)

    async def wait_readable(self) -> None:
        """Wait until a read would not block (data, EOF or an error)."""
        await wait_readable(self.sock)

    def readable_now(self) -> bool:
        """Whether a read would not block (data, EOF or an error are waiting): one select().

        The pool asks this of an idle upstream connection: anything readable on a connection
        nobody sent a request on is a close, a reset, or bytes that belong to no request.
        """
        try:
            readable, _, _ = select.select([self.sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def peek(self, size: int) -> bytes | None:
        """Bytes waiting to be read, left in place: ``b""`` at EOF, None when nothing is
        there or the connection broke."""
        try:
            return self.sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return None

    def peer_closed(self) -> bool:
        """Whether the peer closed or reset its side, checked without consuming data (a
        MSG_PEEK read). Only meaningful once the socket is readable."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def shutdown_write(self) -> None:
        """Send FIN: the peer reads EOF after what was written. Raises OSError."""
        self.sock.shutdown(socket.SHUT_WR)

    def wake(self) -> None:
        """Wake a task waiting on this transport (it gets trio.ClosedResourceError) and leave
        the transport open: a drain uses it to make an idle connection re-arm its wait."""
        notify_closing(self.sock)

    def close(self) -> None:
        """Close now (idempotent); a task waiting on the socket gets ClosedResourceError."""
        close(self.sock)

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1


async def open_tcp(host: str, port: int) -> TCPTransport:
    """A connected TCP transport to `host:port` (TCP_NODELAY; each resolved address tried).
    Raises OSError from the last address; cancellation closes the half-open socket."""
    return TCPTransport(await connect(host, port))
