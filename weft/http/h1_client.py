"""The HTTP/1.1 client side: one `H1Upstream` per upstream connection, owned by the pool in
`weft.connection` between exchanges, with h11 doing the framing.
"""

from __future__ import annotations

import math
import select
import socket

import h11
import trio

from weft.http.errors import UpstreamError
from weft.http.h1 import READ_SIZE
from weft.http.io import Timers, close, recv_until, send_all, send_some


class H1Upstream:
    """An HTTP/1.1 connection to one upstream endpoint; owned by the pool between requests."""

    __slots__ = (
        "conn",
        "endpoint",
        "idle_since",
        "received",
        "requests",
        "sent",
        "sock",
        "timers",
    )

    def __init__(self, sock: socket.socket, endpoint: object, timers: Timers) -> None:
        self.sock = sock
        self.timers = timers
        self.endpoint = endpoint
        self.conn = h11.Connection(h11.CLIENT)
        self.requests = 0
        self.idle_since = 0.0
        self.received = 0  # bytes received in the current exchange
        self.sent = False  # written to since the last read (the answer is likely not there yet)

    def reusable(self) -> bool:
        c = self.conn
        return c.our_state is h11.DONE and c.their_state is h11.DONE

    def recycle(self) -> None:
        self.conn.start_next_cycle()
        self.received = 0

    def closed_while_idle(self) -> bool:
        """True when the upstream closed (or sent junk on) this idle connection."""
        try:
            readable, _, _ = select.select([self.sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        # Readable means EOF, a reset, or bytes nobody asked for: unusable either way.
        return bool(readable)

    async def send(self, data: bytes, timeout: float = math.inf) -> None:
        """Write to the upstream; 504 after `timeout` without progress, 502 on a reset."""
        self.sent = True
        try:
            sent = send_some(self.sock, data)
            if sent < len(data):
                await send_all(self.sock, memoryview(data)[sent:], timeout)
        except TimeoutError:
            raise UpstreamError(
                "upstream stopped reading the request", status=504, reason="upstream_send_timeout"
            ) from None
        except OSError as e:
            raise UpstreamError(
                f"upstream connection broke while sending: {e}", reason="upstream_reset"
            ) from None

    async def next_event(self, deadline: float, what: str) -> h11.Event:
        """The next h11 event from the upstream, reading as needed.

        Raises UpstreamError: 504 (reason `what`) when no byte came by `deadline` (trio time),
        502 when the upstream closes early or violates HTTP/1.1.
        """
        conn = self.conn
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                raise UpstreamError(
                    f"upstream violated HTTP/1.1: {e}", reason="bad_response"
                ) from None
            if ev is not h11.NEED_DATA:
                return ev
            try:
                data = await recv_until(
                    self.sock, READ_SIZE, deadline, self.timers, try_first=not self.sent
                )
                self.sent = False
            except TimeoutError:
                raise UpstreamError(
                    f"upstream too slow ({what})", status=504, reason=what
                ) from None
            except (OSError, trio.ClosedResourceError) as e:
                raise UpstreamError(
                    f"upstream connection reset: {e}", reason="upstream_reset"
                ) from None
            if not data and not self.received:
                # Closed before answering at all (for a reused connection: the upstream's
                # keep-alive timeout raced our request). h11 would call it a protocol error.
                raise UpstreamError(
                    "upstream closed the connection before responding", reason="upstream_reset"
                )
            self.received += len(data)
            conn.receive_data(data)

    def close(self) -> None:
        close(self.sock)
