"""Listening sockets, built by hand because weft needs SO_REUSEPORT.

trio's `open_tcp_listeners` does not set SO_REUSEPORT, and weft's process model needs one socket
per worker slot on the same address (the supervisor keeps them so a replacement worker inherits
its slot's queue: closing a reuseport socket resets the connections queued on it). So the socket
is made here with the plain socket module and handed to trio as a `SocketListener`.
"""

from __future__ import annotations

import socket

from weft.schema import Listener


def bind_listener(listener: Listener, *, reuseport: bool = True) -> socket.socket:
    """A bound, listening, non-inheritable TCP socket. Raises OSError with the address in it."""
    family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listener.address, listener.port))
        sock.listen(listener.backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(
            e.errno, f"cannot listen on {listener.address}:{listener.port}: {e.strerror}"
        ) from None
    return sock
