"""Listening sockets, built by hand because weft needs SO_REUSEPORT.

trio's `open_tcp_listeners` does not set SO_REUSEPORT, and weft's process model needs one socket
per worker slot on the same address (the supervisor keeps them so a replacement worker inherits
its slot's queue: closing a reuseport socket resets the connections queued on it). So the socket
is made here with the plain socket module and handed to trio as a `SocketListener`.

Two host settings decide how far those sockets carry, and the supervisor asks here at start:

* `ensure_fd_limit`: every connection a worker serves is a descriptor, and a proxied one two
  (the client's and the upstream's). A worker over its RLIMIT_NOFILE fails accept() and
  connect() with EMFILE, which looks like a network fault. As nginx's
  ``worker_rlimit_nofile``, the soft limit is raised to the hard one when it is short (the
  workers inherit it); if even the hard limit is short, one warning says what to change.
* `tcp_migrate_note`: when TTOU closes a slot's socket, connections still in the handshake
  on it are reset unless ``net.ipv4.tcp_migrate_req`` is 1. Only TTOU closes a socket while
  others stay (a reload keeps them all), so the note is for the first TTOU, not every start.
"""

from __future__ import annotations

import logging
import resource
import socket
from collections.abc import Iterable
from pathlib import Path

from weft.schema import Listener

Address = tuple[str, int]


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


class SlotSockets:
    """The supervisor's listening sockets: one per (worker slot, listener address).

    Kept for the supervisor's life so that every worker of a slot, replacements and new
    generations included, serves the same socket (and the connections queued on it). A socket
    is closed only when its slot or its listener is removed, or at exit.
    """

    def __init__(self) -> None:
        self._socks: dict[tuple[int, Address], socket.socket] = {}

    def bind_slot(self, slot: int, listeners: Iterable[Listener]) -> list[socket.socket]:
        """Bind what `slot` lacks of `listeners`; return the new sockets. On OSError (the
        address in its message) none of this call's sockets stays."""
        new = []
        try:
            for lst in listeners:
                key = (slot, (lst.address, lst.port))
                if key not in self._socks:
                    self._socks[key] = sock = bind_listener(lst)
                    new.append(sock)
        except OSError:
            for sock in new:
                self.close(sock)
            raise
        return new

    def of_slot(self, slot: int, listeners: Iterable[Listener]) -> list[socket.socket]:
        """`slot`'s sockets for `listeners`, in address order (what its worker serves)."""
        keys = {(lst.address, lst.port) for lst in listeners}
        return [self._socks[(slot, k)] for k in sorted(keys)]

    def filenos(self, but: Iterable[socket.socket] = ()) -> list[int]:
        """Every socket's descriptor except those of `but` (what a child must close)."""
        keep = {id(s) for s in but}
        return [s.fileno() for s in self._socks.values() if id(s) not in keep]

    def close(self, sock: socket.socket) -> None:
        for key, s in list(self._socks.items()):
            if s is sock:
                del self._socks[key]
        sock.close()

    def close_slot(self, slot: int) -> None:
        for key in [k for k in self._socks if k[0] == slot]:
            self._socks.pop(key).close()

    def keep_only(self, listeners: Iterable[Listener]) -> None:
        """Close the sockets of every listener address not among `listeners`."""
        keep = {(lst.address, lst.port) for lst in listeners}
        for key in [k for k in self._socks if k[1] not in keep]:
            self._socks.pop(key).close()

    def close_all(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()


log = logging.getLogger("weft.supervisor")

# Descriptors a worker holds besides its connections: listeners, the liveness and trio's
# wake-up pipes, epoll, shared-memory and metrics files, the log. Generous: a short count only
# moves the warning's threshold.
FD_RESERVE = 64
TCP_MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def fds_needed(max_connections: int) -> int:
    """Descriptors a worker needs for `max_connections` proxied connections at once."""
    return 2 * max_connections + FD_RESERVE


def ensure_fd_limit(max_connections: int) -> int:
    """Make RLIMIT_NOFILE (soft) enough for `max_connections`, as far as the hard limit lets.

    Raises the soft limit to the hard one when it is short, and logs what it did (info); if
    the limit is still short, logs one warning naming the setting, the limit and the fix.
    Returns the soft limit now in force (children forked later inherit it).
    """
    needed = fds_needed(max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = needed if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as e:
            log.info("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, e)
        else:
            log.info(
                "raised RLIMIT_NOFILE (soft) from %d to %d, the hard limit, for "
                "limits.max_connections = %d",
                soft,
                target,
                max_connections,
            )
            soft = target
    if soft < needed:
        log.warning(
            "limits.max_connections = %d needs about %d file descriptors per worker (client "
            "and upstream socket per connection), but RLIMIT_NOFILE is %d (hard %s): "
            "connections beyond it fail with EMFILE; raise LimitNOFILE= in the unit "
            "(systemctl edit weft) or ulimit -n, or lower limits.max_connections",
            max_connections,
            needed,
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
        )
    return soft


def tcp_migrate_note() -> str | None:
    """What to say when a slot's socket is closed (TTOU) with ``tcp_migrate_req`` off, else
    None (on, or a kernel without it)."""
    try:
        value = TCP_MIGRATE_REQ.read_text().strip()
    except OSError:
        return None
    if value != "0":
        return None
    return (
        "net.ipv4.tcp_migrate_req is 0: connections still in the handshake on a removed "
        "slot's socket are reset when it closes; set it to 1 (sysctl) to have the kernel "
        "migrate them to the other workers' sockets"
    )
