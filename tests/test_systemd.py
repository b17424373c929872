"""weft.systemd against a real AF_UNIX datagram socket standing in for systemd.

Each test binds the socket systemd would own (a path in a short temporary directory, or a name
in the abstract namespace), builds a Notifier from an environment that points at it, and
asserts the exact datagrams that arrive. Every receive is bounded by a timeout.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from weft.systemd import MAX_DATAGRAM, STATUS_MAX, Notifier, listen_fds

RECV_TIMEOUT = 5.0  # seconds; a datagram that was sent is there at once


class Manager:
    """The service manager's end: a bound datagram socket and the NOTIFY_SOCKET naming it."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def recv(self) -> bytes:
        self.sock.settimeout(RECV_TIMEOUT)
        return self.sock.recv(65536)

    def nothing_more(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        return False


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    return sock


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Not tmp_path: an AF_UNIX path must fit in 108 bytes, pytest's directories can be longer.
    path = Path(tempfile.mkdtemp(prefix="sdnotify-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def manager(short_dir: Path) -> Iterator[Manager]:
    path = str(short_dir / "notify")
    sock = _bind(path)
    yield Manager(sock, path)
    sock.close()


@pytest.fixture
def abstract_manager() -> Iterator[Manager]:
    name = f"weft-test-sdnotify-{os.getpid()}-{time.monotonic_ns()}"
    sock = _bind("\0" + name)
    yield Manager(sock, "@" + name)
    sock.close()


@pytest.fixture
def notifier() -> Iterator[Callable[..., Notifier]]:
    """Factory ``notifier(**environ) -> Notifier``; every notifier is closed at teardown."""
    made: list[Notifier] = []

    def make(**environ: str) -> Notifier:
        n = Notifier.from_env(dict(environ))
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


# -- the messages --------------------------------------------------------------------------


def test_ready_is_one_datagram(manager: Manager, notifier: Callable[..., Notifier]) -> None:
    n = notifier(NOTIFY_SOCKET=manager.notify_socket)
    assert n.enabled
    assert n.ready() is True
    assert manager.recv() == b"READY=1"
    assert n.ready("4 workers, generation 1") is True
    assert manager.recv() == b"READY=1\nSTATUS=4 workers, generation 1"
    assert manager.nothing_more()


def test_each_method_sends_its_fields(manager: Manager, notifier: Callable[..., Notifier]) -> None:
    n = notifier(NOTIFY_SOCKET=manager.notify_socket, WATCHDOG_USEC="30000000")
    assert n.stopping() and manager.recv() == b"STOPPING=1"
    assert n.status("draining") and manager.recv() == b"STATUS=draining"
    assert n.watchdog() and manager.recv() == b"WATCHDOG=1"
    assert n.mainpid(4321) and manager.recv() == b"MAINPID=4321"
    assert n.notify("STATUS=x", "ERRNO=5") and manager.recv() == b"STATUS=x\nERRNO=5"
    assert manager.nothing_more()


def test_reloading_carries_monotonic_usec(
    manager: Manager, notifier: Callable[..., Notifier]
) -> None:
    n = notifier(NOTIFY_SOCKET=manager.notify_socket)
    before = time.monotonic_ns() // 1000
    assert n.reloading() is True
    after = time.monotonic_ns() // 1000
    first, second = manager.recv().split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    # time.monotonic_ns() is CLOCK_MONOTONIC on Linux: the same clock systemd compares with.
    assert before <= int(value) <= after


def test_abstract_socket(abstract_manager: Manager, notifier: Callable[..., Notifier]) -> None:
    n = notifier(NOTIFY_SOCKET=abstract_manager.notify_socket)
    assert n.address is not None and n.address.startswith("\0")
    assert n.ready("up") is True
    assert abstract_manager.recv() == b"READY=1\nSTATUS=up"


def test_status_is_kept_on_one_line(manager: Manager, notifier: Callable[..., Notifier]) -> None:
    # A config error is several lines; a newline must not start a field of its own.
    n = notifier(NOTIFY_SOCKET=manager.notify_socket)
    assert n.status("reload failed:\nREADY=1\n  routes[0]: bad\0\n") is True
    assert manager.recv() == b"STATUS=reload failed:; READY=1; routes[0]: bad"


def test_long_status_is_cut_to_fit_a_datagram(
    manager: Manager, notifier: Callable[..., Notifier]
) -> None:
    n = notifier(NOTIFY_SOCKET=manager.notify_socket)
    assert n.ready("é" * 5000) is True  # 10000 bytes of UTF-8
    data = manager.recv()
    assert len(data) < MAX_DATAGRAM
    status = data.split(b"\n")[1].removeprefix(b"STATUS=")
    assert len(status) <= STATUS_MAX
    assert status.decode() == "é" * (STATUS_MAX // 2)  # cut on a character boundary


def test_a_datagram_systemd_would_drop_is_not_sent(
    manager: Manager, notifier: Callable[..., Notifier]
) -> None:
    n = notifier(NOTIFY_SOCKET=manager.notify_socket)
    assert n.notify("X=" + "a" * MAX_DATAGRAM) is False
    assert manager.nothing_more()


# -- the watchdog --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "main"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(
    manager: Manager,
    notifier: Callable[..., Notifier],
    environ: dict[str, str],
    interval: float | None,
) -> None:
    n = notifier(NOTIFY_SOCKET=manager.notify_socket, **environ)
    assert n.watchdog_interval() == interval


def test_watchdog_of_another_pid_sends_nothing(
    manager: Manager, notifier: Callable[..., Notifier]
) -> None:
    # What a forked worker sees: the supervisor's WATCHDOG_PID.
    n = notifier(
        NOTIFY_SOCKET=manager.notify_socket,
        WATCHDOG_USEC="30000000",
        WATCHDOG_PID=str(os.getpid() + 1),
    )
    assert n.watchdog() is False
    assert manager.nothing_more()


def test_watchdog_without_a_manager_is_off(notifier: Callable[..., Notifier]) -> None:
    n = notifier(WATCHDOG_USEC="30000000")
    assert n.watchdog_interval() is None
    assert n.watchdog() is False


# -- no manager, a lost manager ------------------------------------------------------------


def test_without_notify_socket_everything_is_a_no_op(notifier: Callable[..., Notifier]) -> None:
    n = notifier()
    assert not n.enabled
    results = [
        n.ready(),
        n.ready("x"),
        n.reloading(),
        n.stopping(),
        n.status("x"),
        n.watchdog(),
        n.mainpid(1),
        n.notify("READY=1"),
    ]
    assert results == [False] * len(results)
    assert n.watchdog_interval() is None
    assert n._sock is None  # not even a socket was made


def test_relative_notify_socket_is_refused(
    notifier: Callable[..., Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="weft.systemd"):
        n = notifier(NOTIFY_SOCKET="notify")
    assert not n.enabled
    assert "neither a path nor @abstract" in caplog.text


def test_vanished_socket_returns_false_and_recovers(
    short_dir: Path, notifier: Callable[..., Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    # 1. systemd's socket is there, then goes away (systemd re-executing, say).
    path = str(short_dir / "notify")
    sock = _bind(path)
    n = notifier(NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
    assert n.ready() is True
    sock.close()
    os.unlink(path)
    # 2. Sends fail without raising; the first failure is a warning, the repeats are not.
    with caplog.at_level(logging.DEBUG, logger="weft.systemd"):
        assert n.watchdog() is False
        assert n.watchdog() is False
        assert n.status("still here") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "failed" in warnings[0].getMessage()
    # 3. A socket at the same path again: the kept socket reaches it, no reconnect needed.
    sock = _bind(path)
    try:
        assert n.watchdog() is True
        sock.settimeout(RECV_TIMEOUT)
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_a_full_manager_queue_does_not_block(
    manager: Manager, notifier: Callable[..., Notifier]
) -> None:
    # Nobody reads the manager's socket: sends must start failing, not wait for room.
    manager.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    n = notifier(NOTIFY_SOCKET=manager.notify_socket)
    start = time.monotonic()
    results = [n.status(f"ping {i}") for i in range(5000)]
    assert time.monotonic() - start < 5.0
    assert results[0] is True
    assert False in results


def test_close_turns_the_notifier_off(manager: Manager, notifier: Callable[..., Notifier]) -> None:
    n = notifier(NOTIFY_SOCKET=manager.notify_socket, WATCHDOG_USEC="30000000")
    assert n.ready() is True
    assert manager.recv() == b"READY=1"
    sock = n._sock
    assert sock is not None
    n.close()
    n.close()
    assert sock.fileno() == -1
    assert n.ready() is False and n.watchdog() is False
    assert n.watchdog_interval() is None
    assert manager.nothing_more()


def test_from_env_can_unset_the_variables(manager: Manager) -> None:
    environ = {
        "NOTIFY_SOCKET": manager.notify_socket,
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/usr/bin",
    }
    kept = dict(environ)
    Notifier.from_env(kept).close()
    assert kept == environ
    n = Notifier.from_env(environ, unset=True)
    try:
        assert environ == {"PATH": "/usr/bin"}
        assert n.watchdog_interval() == 15.0
        assert n.ready() is True
        assert manager.recv() == b"READY=1"
    finally:
        n.close()


# -- socket activation ---------------------------------------------------------------------


def test_listen_fds_for_this_process() -> None:
    environ = {
        "LISTEN_PID": str(os.getpid()),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "http:https",
        "PATH": "/usr/bin",
    }
    assert listen_fds(environ) == [3, 4]
    assert environ == {"PATH": "/usr/bin"}


def test_listen_fds_can_keep_the_variables() -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    assert listen_fds(environ, unset=False) == [3]
    assert environ == {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"LISTEN_FDS": "2"},
        {"LISTEN_PID": str(os.getpid())},
        {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"},  # meant for another process
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"},
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "-1"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "2"},
    ],
)
def test_listen_fds_not_for_us_is_empty_and_still_unset(environ: dict[str, str]) -> None:
    assert listen_fds(environ) == []
    assert environ == {}
