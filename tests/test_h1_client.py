"""`weft.http.h1_client.H1Upstream` on a socket pair: the client watch's effect on one
connection across exchanges (the e2e tests in test_hostile_upstream.py cover the rest)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from weft.http.errors import ClientGone
from weft.http.h1_client import H1Upstream
from weft.http.io import Timers
from weft.http.messages import BytesBody
from weft.http.transport import TCPTransport
from weft.http.upstream import Outgoing
from weft.schema import Endpoint, Timeouts


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class Watch:
    """A ClientWatch a test fires by hand."""

    def __init__(self) -> None:
        self.on_gone = None

    def watch_gone(self, on_gone) -> None:
        self.on_gone = on_gone

    def unwatch_gone(self) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[tuple[H1Upstream, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5.0)
    yield H1Upstream(TCPTransport(ours), Endpoint("127.0.0.1", 1), Timers()), theirs
    ours.close()
    theirs.close()


def get(watch: Watch) -> Outgoing:
    return Outgoing(b"GET", b"/", [(b"host", b"t")], BytesBody(b""), has_body=False,
                    fields_checked=True, client_watch=watch)


async def exchange(up: H1Upstream, out: Outgoing, done: list[bool]) -> bytes:
    response = await up.exchange(out, Timeouts(), trio.current_time() + 5.0, None, done.append)
    return await response.body.read()


async def test_a_watch_that_fires_after_the_head_came_does_not_fail_the_next_exchange(upstream):
    up, peer = upstream
    watch, done = Watch(), []
    peer.sendall(ok(b"one"))  # the answer is there before weft even asks
    assert await exchange(up, get(watch), done) == b"one"
    watch.on_gone()  # the client left just as its answer came: too late to matter
    assert done == [True]
    up.recycle()  # what the pool does when it takes the connection back
    peer.sendall(ok(b"two"))
    assert await exchange(up, get(Watch()), done) == b"two"


async def test_a_watch_that_fires_while_the_head_is_awaited_ends_in_client_gone(upstream):
    up, _peer = upstream
    watch, done = Watch(), []

    async def leave() -> None:
        await trio.sleep(0.05)
        assert watch.on_gone is not None, "the exchange is not watching its client"
        watch.on_gone()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leave)
        with pytest.raises(ClientGone):
            await exchange(up, get(watch), done)
    assert done == [False]  # never reused
