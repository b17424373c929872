"""A byte tunnel between a client and an upstream after a 101 (WebSocket).

Once both sides switched protocols, HTTP framing is over: the tunnel copies bytes each way,
passes a half-close on (a FIN from one side becomes a shutdown of the other's write side), and
ends when both directions ended, when either connection breaks, or when no byte moved either
way for ``timeouts.websocket_idle``. It works on two `weft.http.transport` transports, so it
does not care whether either side is TLS.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from weft.http.h1 import READ_SIZE
from weft.http.transport import TCPTransport


class Tunnel:
    """Relays bytes both ways until either side ends or goes idle; frees the upstream side
    (`on_done(False)`: a tunnelled connection is never reused) when it stops."""

    __slots__ = ("idle", "on_done", "upstream", "upstream_rest")

    def __init__(
        self,
        upstream: TCPTransport,
        upstream_rest: bytes,
        idle: float,
        on_done: Callable[[bool], None],
    ) -> None:
        self.upstream = upstream
        self.upstream_rest = upstream_rest  # bytes the upstream sent right after its 101
        self.idle = idle
        self.on_done = on_done

    async def run(self, client: TCPTransport, client_rest: bytes) -> None:
        """Relay until done. `client_rest`: bytes the client sent right after its request."""
        scope = trio.CancelScope()

        async def copy(src: TCPTransport, dst: TCPTransport, first: bytes) -> None:
            try:
                if first:
                    await dst.send_all(first)
                while data := await src.recv(READ_SIZE):
                    await dst.send_all(data)
                    scope.deadline = trio.current_time() + self.idle
                dst.shutdown_write()  # pass the half-close on
            except (OSError, trio.ClosedResourceError):
                scope.cancel()

        try:
            scope.deadline = trio.current_time() + self.idle
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(copy, client, self.upstream, client_rest)
                    nursery.start_soon(copy, self.upstream, client, self.upstream_rest)
        finally:
            self.on_done(False)
