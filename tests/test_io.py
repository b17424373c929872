"""`weft.http.io.PeerWatch`: the tick-driven check for clients that leave while nobody reads
them, on real socket pairs (no sleeping: the kernel has the FIN by the time close returns); and
`Timers`' call entries (the pool queue's timeout)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from weft.http.io import PeerWatch, Timers


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_peer_that_closes_fires_its_callback_once(pair):
    ours, theirs = pair
    watch, fired = PeerWatch(), []
    watch.watch(ours.fileno(), lambda: fired.append(1))
    watch.check()
    assert fired == []
    theirs.close()
    watch.check()
    watch.check()
    assert fired == [1]
    assert len(watch) == 0


def test_a_half_close_fires_and_pipelined_bytes_do_not(pair):
    ours, theirs = pair
    watch, fired = PeerWatch(), []
    watch.watch(ours.fileno(), lambda: fired.append(1))
    theirs.sendall(b"GET /next HTTP/1.1\r\n\r\n")  # a pipelined request: the client is there
    watch.check()
    assert fired == []
    theirs.shutdown(socket.SHUT_WR)  # it sent all it will: nginx counts this as gone too
    watch.check()
    assert fired == [1]


def test_an_unwatched_socket_never_fires(pair):
    ours, theirs = pair
    watch, fired = PeerWatch(), []
    watch.watch(ours.fileno(), lambda: fired.append(1))
    watch.unwatch(ours.fileno())
    watch.unwatch(ours.fileno())  # idempotent
    theirs.close()
    watch.check()
    assert fired == []


def test_a_timer_call_fires_once_at_its_deadline_and_a_disarmed_one_never():
    timers = Timers()
    fired: list[str] = []
    timers.arm_call(1.0, lambda: fired.append("a"))
    b = timers.arm_call(1.0, lambda: fired.append("b"))
    timers.disarm(b)
    timers.expire(0.5)
    assert fired == []
    timers.expire(1.0)
    timers.expire(2.0)
    assert fired == ["a"]
