"""The h2 upstream client (`weft.http.h2_conn`, `weft.http.h2_client`) against a peer made of
the h2 library on the other end of a socket pair, in one trio run: what goes out frame by frame,
and what each upstream event does to the streams.

The peer is an h2 *server* connection that the test drives by hand (`Peer`): it reads what weft
sent and answers with exactly the frames a story needs (a GOAWAY in the middle, a reset, a
window that stays shut). Every wait is bounded by `fail_after`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hyperframe.frame
import pytest
import trio
from trio.lowlevel import wait_readable

from weft.http import h2_conn
from weft.http.errors import UpstreamError
from weft.http.h2_client import H2Upstream, take_slot
from weft.http.h2_conn import STREAM_WINDOW, H2Connection
from weft.http.messages import Body, BytesBody
from weft.http.transport import TCPTransport
from weft.http.upstream import Outgoing
from weft.schema import Endpoint, Timeouts

EP = Endpoint("127.0.0.1", 9)
WAIT = 5  # seconds any one step may take


class Peer:
    """The upstream: an h2 server connection on one end of a socket pair."""

    def __init__(self, sock: socket.socket, *, max_streams: int = 100) -> None:
        self.sock = sock
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
        self.requests: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.window_updates = 0

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    async def read(self) -> list[h2.events.Event]:
        """One read of what weft sent (waits for it), applied and recorded."""
        await wait_readable(self.sock)
        data = self.sock.recv(1 << 20)
        if not data:
            return []
        events = self.h2.receive_data(data)
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.requests[ev.stream_id] = ev.headers
            elif isinstance(ev, h2.events.DataReceived):
                self.bodies[ev.stream_id] = self.bodies.get(ev.stream_id, b"") + ev.data
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.resets[ev.stream_id] = ev.error_code
            elif isinstance(ev, h2.events.WindowUpdated):
                self.window_updates += 1
        self.flush()
        return events

    async def read_until(self, done: Callable[[], object]) -> None:
        with trio.fail_after(WAIT):
            while not done():
                await self.read()

    def respond(
        self,
        sid: int,
        body: bytes = b"",
        *,
        end: bool = True,
        trailers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.h2.send_headers(
            sid, [(b":status", b"200")], end_stream=not body and end and not trailers
        )
        for at in range(0, len(body), 16_384):  # the default SETTINGS_MAX_FRAME_SIZE
            last = at + 16_384 >= len(body)
            self.h2.send_data(sid, body[at : at + 16_384], end_stream=last and end and not trailers)
        if trailers:
            self.h2.send_headers(sid, trailers, end_stream=True)
        self.flush()

    def goaway(self, last_stream_id: int) -> None:
        """A graceful GOAWAY, written by hand: the library's own `close_connection` would close
        its side, and the story needs it to answer the streams below `last_stream_id` after."""
        self.flush()
        frame = hyperframe.frame.GoAwayFrame(0, last_stream_id=last_stream_id, error_code=0)
        self.sock.sendall(frame.serialize())


SOCKETS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while SOCKETS:
        SOCKETS.pop().close()


async def _pair(nursery: trio.Nursery, **peer: int) -> tuple[H2Connection, Peer]:
    """An opened H2Connection (handshake done, task running) and its peer."""
    a, b = socket.socketpair()
    SOCKETS.extend((a, b))
    a.setblocking(False)
    b.setblocking(False)
    p = Peer(b, **peer)
    conn = H2Connection(TCPTransport(a), EP, tls=False, max_streams=100)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            n.start_soon(conn.handshake)
            await p.read()  # weft's preface and SETTINGS; the peer's go out in return
    conn.nursery = nursery  # as the pool sets it: a streamed request body is pumped there
    nursery.start_soon(conn.run)
    return conn, p


def _get(path: bytes = b"/x", body: Body | None = None, *, method: bytes = b"GET") -> Outgoing:
    return Outgoing(
        method,
        path,
        [(b"host", b"api.test"), (b"connection", b"keep-alive"), (b"te", b"trailers")],
        body if body is not None else Body(),
        has_body=body is not None,
        fields_checked=True,
    )


class Source:
    """The pool's part in an unprocessed stream: moves the slot to the next connection."""

    def __init__(self, conns: list[H2Connection]) -> None:
        self.conns = conns
        self.moves = 0

    async def move(self, slot: H2Upstream) -> None:
        slot.conn.finish(slot)
        self.moves += 1
        self.conns[self.moves].move_slot(slot)


class Streamed(Body):
    """A request body still arriving from the client (not in memory: not replayable)."""

    def __init__(self, *chunks: bytes) -> None:
        super().__init__()
        self.chunks = list(chunks)

    async def receive(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def prefetched(self) -> tuple[list[bytes], bool]:
        return [], False


def _noop(_clean: bool) -> None:
    pass


async def test_a_get_is_translated_and_its_window_reopens_only_as_the_body_is_taken(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection window this small makes the library acknowledge 40,000 bytes at once (it
    # sends WINDOW_UPDATE once half the window is used), so the test can see when it does.
    monkeypatch.setattr(h2_conn, "CONNECTION_WINDOW", 65_536)
    conn, peer = await _pair(nursery)
    slot = take_slot(conn, None)
    done: list[bool] = []
    result: list = []

    async def go() -> None:
        result.append(
            await slot.exchange(_get(), Timeouts(), trio.current_time() + 30, None, done.append)
        )

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            n.start_soon(go)
            await peer.read_until(lambda: 1 in peer.ended)
            peer.respond(1, b"a" * 40_000, trailers=[(b"grpc-status", b"0")])
    head = dict(peer.requests[1])
    # 1. The h1 head became h2: pseudo-headers from the method, target and Host; the
    #    connection-specific field is gone and TE: trailers is kept.
    assert head[b":method"] == b"GET" and head[b":path"] == b"/x"
    assert head[b":authority"] == b"api.test" and head[b":scheme"] == b"http"
    assert b"host" not in head and b"connection" not in head and head[b"te"] == b"trailers"
    response = result[0]
    assert response.status == 200
    # 2. Nothing was acknowledged yet: the 40,000 bytes wait on the stream, unread.
    updates = peer.window_updates
    with trio.move_on_after(0.2):
        await peer.read()
    assert peer.window_updates == updates
    # 3. Taking the body gives the window back, and the trailers come with its end.
    got = b""
    with trio.fail_after(WAIT):
        while chunk := await response.body.receive():
            got += chunk
        await peer.read_until(lambda: peer.window_updates > updates)
    assert got == b"a" * 40_000 and response.body.trailers == [(b"grpc-status", b"0")]
    assert done == [True]
    conn.finish(slot)
    assert conn.active == 0 and not conn.streams


async def test_streams_above_a_goaway_are_sent_again_on_another_connection(
    nursery: trio.Nursery,
) -> None:
    conn, peer = await _pair(nursery)
    conn2, peer2 = await _pair(nursery)
    source = Source([conn, conn2])
    slots = [take_slot(conn, source) for _ in range(2)]
    results: dict[int, int] = {}

    async def go(i: int) -> None:
        body = BytesBody(b"p" * 10)  # in memory: safe to send again, whatever the method
        r = await slots[i].exchange(
            _get(body=body, method=b"POST"), Timeouts(), trio.current_time() + 30, None, _noop
        )
        results[i] = r.status
        await r.body.receive()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            n.start_soon(go, 0)
            n.start_soon(go, 1)
            await peer.read_until(lambda: {1, 3} <= peer.ended)
            # 1. The upstream processes stream 1 only, and says so.
            peer.goaway(1)
            peer.respond(1)
            # 2. Stream 3 was not processed: it goes out again on the other connection.
            await peer2.read_until(lambda: 1 in peer2.ended)
            assert peer2.bodies[1] == b"p" * 10
            peer2.respond(1)
    assert results == {0: 200, 1: 200} and source.moves == 1
    # 3. The first connection takes no new stream.
    assert conn.goaway and not conn.has_room()


async def test_a_refused_stream_is_sent_again(nursery: trio.Nursery) -> None:
    conn, peer = await _pair(nursery)
    conn2, peer2 = await _pair(nursery)
    source = Source([conn, conn2])
    slot = take_slot(conn, source)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            result: list = []

            async def go() -> None:
                result.append(
                    await slot.exchange(_get(), Timeouts(), trio.current_time() + 30, None, _noop)
                )

            n.start_soon(go)
            await peer.read_until(lambda: 1 in peer.requests)
            peer.h2.reset_stream(1, h2.errors.ErrorCodes.REFUSED_STREAM)
            peer.flush()
            await peer2.read_until(lambda: 1 in peer2.requests)
            peer2.respond(1, b"ok")
    assert result[0].status == 200 and source.moves == 1
    assert conn.has_room()  # a refused stream is no reason to leave the connection


async def test_an_unprocessed_stream_whose_body_was_streamed_is_a_502_that_says_so(
    nursery: trio.Nursery,
) -> None:
    conn, peer = await _pair(nursery)
    conn2, _peer2 = await _pair(nursery)
    slot = take_slot(conn, Source([conn, conn2]))
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            errors: list[UpstreamError] = []

            async def go() -> None:
                try:
                    await slot.exchange(
                        _get(body=Streamed(b"abc", b"def"), method=b"PUT"),
                        Timeouts(),
                        trio.current_time() + 30,
                        None,
                        _noop,
                    )
                except UpstreamError as e:
                    errors.append(e)

            n.start_soon(go)
            await peer.read_until(lambda: 1 in peer.ended)
            peer.h2.reset_stream(1, h2.errors.ErrorCodes.REFUSED_STREAM)
            peer.flush()
    assert errors[0].status == 502 and errors[0].reason == "upstream_reset"
    assert "cannot be sent again" in errors[0].detail


async def test_a_graceful_goaway_lets_the_streams_at_or_below_its_last_id_finish(
    nursery: trio.Nursery,
) -> None:
    conn, peer = await _pair(nursery)
    slot = take_slot(conn, None)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            result: list = []

            async def go() -> None:
                result.append(
                    await slot.exchange(_get(), Timeouts(), trio.current_time() + 30, None, _noop)
                )

            n.start_soon(go)
            await peer.read_until(lambda: 1 in peer.requests)
            peer.goaway(1)
            peer.respond(1, b"still here")
        assert await result[0].body.receive() == b"still here"
        assert await result[0].body.receive() == b""


async def test_a_stream_reset_mid_body_fails_the_body(nursery: trio.Nursery) -> None:
    conn, peer = await _pair(nursery)
    slot = take_slot(conn, None)
    done: list[bool] = []
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            result: list = []

            async def go() -> None:
                result.append(
                    await slot.exchange(
                        _get(), Timeouts(), trio.current_time() + 30, None, done.append
                    )
                )

            n.start_soon(go)
            await peer.read_until(lambda: 1 in peer.requests)
            peer.respond(1, b"part", end=False)
        body = result[0].body
        assert await body.receive() == b"part"
        peer.h2.reset_stream(1, h2.errors.ErrorCodes.INTERNAL_ERROR)
        peer.flush()
        with pytest.raises(UpstreamError) as e:
            await body.receive()
    assert e.value.reason == "upstream_reset" and "INTERNAL_ERROR" in e.value.detail
    assert done == [False]


async def test_a_slot_given_back_early_resets_its_stream_and_returns_the_unread_window(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h2_conn, "CONNECTION_WINDOW", 65_536)  # as in the first test
    conn, peer = await _pair(nursery)
    slot = take_slot(conn, None)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            result: list = []

            async def go() -> None:
                result.append(
                    await slot.exchange(_get(), Timeouts(), trio.current_time() + 30, None, _noop)
                )

            n.start_soon(go)
            await peer.read_until(lambda: 1 in peer.requests)
            peer.respond(1, b"z" * 40_000, end=False)
        while not slot.chunks:  # the DATA is on the stream, unread
            await slot.wait(trio.current_time() + WAIT)
        window = peer.h2.outbound_flow_control_window
        # 1. The client went away: the slot is given back with its body unread.
        await result[0].body.aclose()
        conn.finish(slot)
        # 2. The stream is cancelled and its unread bytes go back to the connection window.
        await peer.read_until(lambda: 1 in peer.resets and peer.window_updates)
    assert peer.resets[1] == h2.errors.ErrorCodes.CANCEL
    assert peer.h2.outbound_flow_control_window == window + 40_000
    assert conn.active == 0 and conn.has_room()


async def test_a_request_body_waits_for_the_window_and_times_out_when_it_stays_shut(
    nursery: trio.Nursery,
) -> None:
    conn, peer = await _pair(nursery)
    slot = take_slot(conn, None)
    # The peer's stream windows start at 65,535 and it never acknowledges what it gets.
    peer.h2.acknowledge_received_data = lambda *_a, **_k: None  # type: ignore[method-assign]
    timeouts = Timeouts(upstream_send_idle=0.3)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            errors: list[UpstreamError] = []

            async def go() -> None:
                try:
                    await slot.exchange(
                        _get(body=BytesBody(b"q" * 100_000), method=b"POST"),
                        timeouts,
                        trio.current_time() + 30,
                        None,
                        _noop,
                    )
                except UpstreamError as e:
                    errors.append(e)

            n.start_soon(go)
            while not errors:
                with trio.move_on_after(0.1):
                    await peer.read()
    assert len(peer.bodies[1]) == 65_535  # exactly the window, not a byte more
    assert errors[0].status == 504 and errors[0].reason == "upstream_send_timeout"


async def test_the_connection_closing_fails_every_stream_on_it(nursery: trio.Nursery) -> None:
    conn, peer = await _pair(nursery)
    slots = [take_slot(conn, None) for _ in range(3)]
    errors: list[UpstreamError] = []

    async def go(slot: H2Upstream) -> None:
        try:
            await slot.exchange(_get(), Timeouts(), trio.current_time() + 30, None, _noop)
        except UpstreamError as e:
            errors.append(e)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            for s in slots:
                n.start_soon(go, s)
            await peer.read_until(lambda: len(peer.requests) == 3)
            peer.sock.close()
    assert [e.reason for e in errors] == ["upstream_reset"] * 3
    assert conn.dead is not None and not conn.has_room()


async def test_the_upstreams_stream_limit_lowers_weft_s(nursery: trio.Nursery) -> None:
    conn, _peer = await _pair(nursery, max_streams=2)
    assert conn.capacity() == 2
    take_slot(conn, None)
    take_slot(conn, None)
    assert not conn.has_room()
    assert STREAM_WINDOW == conn.h2.local_settings.initial_window_size


async def test_a_goaway_with_an_error_fails_the_streams_it_had_processed(
    nursery: trio.Nursery,
) -> None:
    conn, peer = await _pair(nursery)
    conn2, _peer2 = await _pair(nursery)
    slot = take_slot(conn, Source([conn, conn2]))
    errors: list[UpstreamError] = []

    async def go() -> None:
        try:
            await slot.exchange(_get(), Timeouts(), trio.current_time() + 30, None, _noop)
        except UpstreamError as e:
            errors.append(e)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            n.start_soon(go)
            await peer.read_until(lambda: 1 in peer.requests)
            # Stream 1 was processed (it is not above the last id): it is not sent again.
            frame = hyperframe.frame.GoAwayFrame(0, last_stream_id=1, error_code=2)
            peer.sock.sendall(frame.serialize())
    assert errors[0].status == 502 and "INTERNAL_ERROR" in errors[0].detail
    assert conn.dead is not None and not conn2.streams
