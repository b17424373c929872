"""systemd glue: the sd_notify(3) and sd_listen_fds(3) protocols, without libsystemd.

Only the supervisor talks to systemd (the unit says ``NotifyAccess=main``): READY=1 once every
worker is ready, RELOADING=1 ... READY=1 around a reload, STOPPING=1 when it starts to drain,
STATUS= lines for ``systemctl status``, and WATCHDOG=1 pings from its loop.

The rules this module keeps:

* A notification is one AF_UNIX datagram of newline-separated ``KEY=VALUE`` fields, sent to
  ``$NOTIFY_SOCKET``: a file system path, or ``@name`` for a name in the abstract namespace.
* Nothing here raises because systemd cannot be reached. A failed send is logged and
  ``notify`` returns False: a proxy must not die because its manager's socket went away.
* Sends never block: the socket is non-blocking, so a full systemd queue drops the message
  (logged) instead of stalling the supervisor's loop and, with it, reaping and the watchdog.
* The socket is opened once and kept, and every send names the address (``sendto``, not
  ``connect``): when systemd re-creates its socket at the same path (``systemctl
  daemon-reexec``), the next notification gets through without reconnecting.
* Outside systemd (no ``$NOTIFY_SOCKET``) every method is a cheap no-op returning False or
  None, so callers never ask "are we under systemd?".

``listen_fds`` reads the socket-activation variables (``LISTEN_PID``, ``LISTEN_FDS``) for a
supervisor that may later take its listeners from a ``.socket`` unit.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("weft.systemd")

# The first fd systemd passes with socket activation (sd_listen_fds(3): SD_LISTEN_FDS_START).
SD_LISTEN_FDS_START = 3

# systemd (252 included) reads a notification into a PIPE_BUF buffer (src/basic/constants.h,
# NOTIFY_BUFFER_MAX) and drops a longer one whole, so a datagram must stay below 4096 bytes.
MAX_DATAGRAM = 4096
# STATUS= text is cut to this many bytes (UTF-8), leaving room for the other fields.
STATUS_MAX = 2048


def _monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC= with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(text: str) -> str:
    """`text` as a STATUS= value: one line (a newline would start a new field), no NUL, cut to
    fit."""
    text = text.replace("\0", "")
    line = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    data = line.encode()
    if len(data) > STATUS_MAX:
        line = data[:STATUS_MAX].decode(errors="ignore")
    return line


class Notifier:
    """Sends sd_notify(3) messages to the service manager; a no-op without one.

    Build it with `Notifier.from_env()`. `address` is None (no-op), a path, or an abstract
    address starting with NUL. `watchdog_usec` is the watchdog timeout this process must
    ping within, or None when the watchdog is off or meant for another process.

    The datagram socket is created on the first send and kept for the next ones; `close()`
    releases it and turns every later call into a no-op (a forked worker calls it on its
    copy, which it must not use).
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address else None
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_env(
        cls, environ: MutableMapping[str, str] = os.environ, unset: bool = False
    ) -> Notifier:
        """The notifier `environ` describes (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``,
        ``WATCHDOG_PID``).

        The watchdog is on when ``WATCHDOG_USEC`` is a positive integer and ``WATCHDOG_PID`` is
        absent or this process's pid (systemd sets it to the main pid, so a child that inherited
        the variables does not ping for the unit). A value that does not parse is logged and
        treated as absent. With `unset`, the three variables are removed from `environ`, so
        processes started later do not inherit them (sd_notify(3)'s ``unset_environment``).
        """
        raw = environ.get("NOTIFY_SOCKET", "")
        watchdog = _watchdog_usec(environ)
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                environ.pop(name, None)
        address: str | None
        if not raw:
            address = None
        elif raw.startswith("@"):
            address = "\0" + raw[1:]
        elif raw.startswith("/"):
            address = raw
        else:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract: not notifying", raw)
            address = None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to notify."""
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send `fields` (``"KEY=VALUE"`` strings) as one datagram; return whether it was sent.

        Never raises for a socket error (logged: a warning for the first failure in a row,
        debug for the repeats, so a vanished manager does not flood the log every ping).
        """
        if self.address is None:
            return False
        assert fields and all("=" in f and "\n" not in f and "\0" not in f for f in fields)
        data = "\n".join(fields).encode()
        if len(data) >= MAX_DATAGRAM:
            log.warning("sd_notify message of %d bytes is too long for systemd: dropped", len(data))
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as e:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "sd_notify to %r failed: %s", self._printable_address(), e)
            self._failing = True
            return False
        if self._failing:
            log.info("sd_notify to %r works again", self._printable_address())
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up or reload finished: READY=1 (and STATUS=`status`)."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", "STATUS=" + _one_line(status))

    def reloading(self) -> bool:
        """A reload begins: RELOADING=1 with the MONOTONIC_USEC= systemd 253+ requires (a
        RELOADING=1 without it is ignored there); systemd 252 ignores the extra field."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}")

    def stopping(self) -> bool:
        """Shutdown begins: STOPPING=1."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """STATUS=`text` (made one line and cut to STATUS_MAX bytes), for ``systemctl status``."""
        return self.notify("STATUS=" + _one_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1, only when the watchdog is on for this process (else nothing is sent)."""
        if self.watchdog_usec is None:
            return False
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half the timeout, as sd_watchdog_enabled(3) recommends), or
        None when there is nothing to ping."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def mainpid(self, pid: int) -> bool:
        """MAINPID=`pid`: the unit's main process is now `pid` (e.g. after a re-exec)."""
        return self.notify(f"MAINPID={pid}")

    def fileno(self) -> int | None:
        """The notification socket's fd, if open (a forked worker closes it)."""
        return self._sock.fileno() if self._sock is not None else None

    def close(self) -> None:
        """Close the socket; every later call is a no-op. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.address = None
        self.watchdog_usec = None

    def _printable_address(self) -> str:
        assert self.address is not None
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    raw = environ.get("WATCHDOG_USEC")
    if raw is None:
        return None
    try:
        usec = int(raw)
        pid = int(environ.get("WATCHDOG_PID", os.getpid()))
    except ValueError:
        log.warning(
            "WATCHDOG_USEC=%r / WATCHDOG_PID=%r do not parse: watchdog off",
            raw,
            environ.get("WATCHDOG_PID"),
        )
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec


def listen_fds(environ: MutableMapping[str, str] = os.environ, unset: bool = True) -> list[int]:
    """The file descriptors systemd passed by socket activation: ``[3, 4, ...]``, or ``[]``.

    They are ours only when ``LISTEN_PID`` is this process's pid (a child that inherited the
    variables gets ``[]``). With `unset` (the default), ``LISTEN_PID``, ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` are removed from `environ` whatever they said, as sd_listen_fds(3) does,
    so no later child mistakes them for its own.

    The fds are returned as systemd passed them (inheritable, no FD_CLOEXEC) and are not
    checked: the caller wraps each in ``socket.socket(fileno=fd)`` and owns it from then on.
    """
    raw_pid, raw_fds = environ.get("LISTEN_PID"), environ.get("LISTEN_FDS")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(name, None)
    if raw_pid is None or raw_fds is None:
        return []
    try:
        pid, count = int(raw_pid), int(raw_fds)
    except ValueError:
        log.warning("LISTEN_PID=%r / LISTEN_FDS=%r do not parse: ignored", raw_pid, raw_fds)
        return []
    if pid != os.getpid() or count <= 0:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
