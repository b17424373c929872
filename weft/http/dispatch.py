"""The protocol dispatcher: which adapter serves a newly accepted connection.

The worker calls `serve_connection` once per accepted connection, as hypercorn's
`ProtocolWrapper` does; everything protocol-specific starts here. Today every connection is
HTTP/1.1. The rules the TLS and HTTP/2 issue adds, in this order:

1. a TLS transport whose ALPN chose ``h2`` gets the h2 adapter; ``http/1.1`` or no ALPN, h1;
2. a cleartext connection whose first bytes are the HTTP/2 preface (``PRI * HTTP/2.0``) gets
   the h2 adapter (prior knowledge, h2c); anything else, h1. The h1 ``Upgrade: h2c`` path
   stays refused (RFC 9113 §3.1 deprecates it; it is a smuggling vector).

Until then the h1 adapter answers a preface with 505 itself. The dispatcher owns nothing after
it handed the connection over: the adapter closes the transport when it is done.

`SERVED_ALPN` is what a TLS listener may advertise: the protocols an adapter here serves. A
listener's ``alpn`` may name ``h2`` before it is served (`weft.config_tls` filters the list
through this set), so that a config written for h2 keeps working and gets h2 once it lands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from weft.http.h1_server import H1Server
from weft.http.transport import Transport

if TYPE_CHECKING:
    from weft.workers.state import ServerState

#: ALPN protocol ids a connection can be served with (the adapter that serves each is above)
SERVED_ALPN = frozenset({"http/1.1"})


async def serve_connection(
    transport: Transport, state: ServerState, client: tuple[str, int]
) -> None:
    """Serve one client connection with the adapter its protocol needs; never raises for
    anything the client did, and closes the transport when done."""
    await H1Server(transport, state, client).serve()
