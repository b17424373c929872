"""The protocol dispatcher: which adapter serves a newly accepted connection.

The worker calls `serve_connection` once per accepted connection, as hypercorn's
`ProtocolWrapper` does; everything protocol-specific starts here. The rules, in this order:

1. a TLS transport whose ALPN chose ``h2`` gets the h2 adapter; ``http/1.1`` or no ALPN, h1;
2. a cleartext connection whose first bytes are the HTTP/2 preface (``PRI * HTTP/2.0``) gets
   the h2 adapter (prior knowledge, h2c); anything else, h1. The h1 ``Upgrade: h2c`` path
   stays refused (RFC 9113 §3.1 deprecates it; it is a smuggling vector).

The preface is recognised by peeking (``MSG_PEEK``): its bytes stay in the kernel, and whichever
adapter is picked reads the connection from its first byte, so nothing has to be handed over.
Until the first bytes come the dispatcher waits at most ``timeouts.client_header``, or
``drain_idle`` once the worker drains (what h1 gives a connection that sent nothing); the h1
adapter counts its own ``client_header`` from the same moment (the accept), not from the
sniff's end, so a slow first head gets one ``client_header`` in all, not two. The dispatcher
owns nothing after it handed the connection over: the adapter closes the transport when it is
done.

`weft.http.protocols.SERVED_ALPN` is what a TLS listener may advertise: the protocols an
adapter here serves (`weft.config_tls` checks a listener's ``alpn`` against it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from weft.http.h1_server import H1Server
from weft.http.h2_server import H2Server
from weft.http.transport import Transport

if TYPE_CHECKING:
    from weft.workers.state import ServerState



async def serve_connection(
    transport: Transport, state: ServerState, client: tuple[str, int]
) -> None:
    """Serve one client connection with the adapter its protocol needs; never raises for
    anything the client did, and closes the transport when done."""
    alpn = transport.alpn
    if alpn == "h2":
        await H2Server(transport, state, client).serve()
    elif alpn is not None or transport.tls:
        await H1Server(transport, state, client).serve()  # HTTP/2 over TLS only by ALPN
    else:
        accepted = trio.current_time()
        kind = await _sniff(transport, state, accepted)
        if kind is H2Server:
            await H2Server(transport, state, client).serve()
        elif kind is H1Server:
            await H1Server(transport, state, client, accepted=accepted).serve()
        else:
            transport.close()  # nothing came (or EOF): as h1 closes an idle connection


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# A preface that came in pieces is rare (24 bytes fit any first segment): poll for the rest.
_PIECE_WAIT = 0.01


class _Waiting:
    """A connection in `_sniff`, as the worker's drain sees it (`ServerState.register`)."""

    __slots__ = ("drain_idle", "scope", "since")

    def __init__(self, scope: trio.CancelScope, since: float, drain_idle: float) -> None:
        self.scope = scope
        self.since = since
        self.drain_idle = drain_idle

    def on_drain(self) -> None:
        self.scope.deadline = min(
            self.scope.deadline, max(self.since + self.drain_idle, trio.current_time())
        )


async def _sniff(transport: Transport, state: ServerState, now: float) -> type | None:
    """H2Server when the first bytes are the HTTP/2 preface, H1Server for anything else,
    None when the client sent nothing within ``client_header`` of `now` or closed. Reads
    nothing."""
    timeouts = state.config.timeouts
    scope = trio.CancelScope(deadline=now + timeouts.client_header)
    waiting = _Waiting(scope, now, timeouts.drain_idle)
    state.register(waiting)
    try:
        with scope:
            while True:
                await transport.wait_readable()
                first = transport.peek(len(PREFACE))
                if not first:
                    return None  # EOF, or a reset
                if not PREFACE.startswith(first):
                    return H1Server
                if len(first) == len(PREFACE):
                    return H2Server
                await trio.sleep(_PIECE_WAIT)
    except (OSError, trio.ClosedResourceError):
        return None
    finally:
        state.unregister(waiting)
    return None
