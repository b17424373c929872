"""What the forwarder hands an upstream adapter, and what it expects of a pooled connection.

The forwarder (`weft.forward`) decides the endpoint, the header policy and the retry; an
upstream adapter (`weft.http.h1_client` today, h2 next) carries one exchange on one
connection. This module is the seam between them, so that neither imports the other's
protocol library and the pool (`weft.connection`) can hold connections of any protocol:

* `Outgoing` is the request as it goes upstream: method, target and fields already rewritten
  by the forwarder, the body stream, and what the adapter must know to frame it.
* `UpstreamConnection` is the interface of a pooled connection: ``exchange`` plus the pool's
  questions. An h2 connection answers `reusable` while it has stream capacity left, so the
  same pool code hands out streams on shared connections.
* `ClientWatch` is what the client side offers the upstream side: a callback when the client
  leaves while its response is awaited (h1: the connection closes; h2: the stream is reset),
  so the upstream exchange is abandoned at once instead of when the upstream answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from weft.http.messages import Body, HeaderList, Response
    from weft.schema import Endpoint, Timeouts


class ClientWatch(Protocol):
    """The client of a request, as the upstream side watches it while a response is awaited."""

    def watch_gone(self, on_gone: Callable[[], None]) -> None:
        """Call `on_gone()` once if the client leaves before `unwatch_gone` (from another task:
        it must only set state and wake the waiting one)."""
        ...

    def unwatch_gone(self) -> None:
        """Stop watching (idempotent)."""
        ...


class Outgoing:
    """One request as it is sent upstream (built by the forwarder for each attempt)."""

    __slots__ = (
        "arena",
        "body",
        "client_watch",
        "close_client",
        "duplex",
        "fields_checked",
        "has_body",
        "headers",
        "method",
        "target",
        "upgrade",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: HeaderList,
        body: Body,
        *,
        has_body: bool,
        fields_checked: bool,
        upgrade: bool = False,
        client_watch: ClientWatch | None = None,
        arena: Any = None,
        duplex: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.has_body = has_body
        # Every field is known to be valid (parsed, or checked after middleware ran): the
        # adapter may skip its own per-field checks.
        self.fields_checked = fields_checked
        # The client asked for a WebSocket upgrade: only then may a 101 become a tunnel.
        self.upgrade = upgrade
        # The adapter watches the client while the response head is awaited (the body sent):
        # a client that leaves abandons the exchange. None when the client side cannot tell.
        self.client_watch = client_watch
        # The request's `weft.arena_pool.Arena`: a streamed body is relayed through a buffer
        # leased from it. None (a request made outside an adapter): relayed as `bytes`.
        self.arena = arena
        # The client side lets the request body go on streaming while the response streams
        # back (h2: another stream's task reads it). An h2 upstream then keeps sending it
        # after the response head came (gRPC bidirectional calls need that); otherwise the
        # rest of the body is dropped once the response starts (`close_client`).
        self.duplex = duplex
        # Set by the adapter: the upstream answered before the whole body was sent, so the
        # client connection must close after the response (its body's rest is unread).
        self.close_client = False


class UpstreamConnection(Protocol):
    """A pooled connection to one endpoint, of any protocol."""

    endpoint: Endpoint
    requests: int  # exchanges completed on it
    idle_since: float  # when it was last given back (trio time)
    stray: int  # bytes found past the end of a response: never reused, counted by the pool

    @property
    def response_started(self) -> bool:
        """Whether any response byte came back in the current exchange."""
        ...

    def reusable(self) -> bool:
        """Whether it can carry another exchange once this one is done."""
        ...

    def recycle(self) -> None:
        """Reset per-exchange state before it goes back to the idle list."""
        ...

    def closed_while_idle(self) -> bool:
        """Whether the peer closed it (or sent bytes nobody asked for) while it was idle."""
        ...

    def close(self) -> None: ...

    async def exchange(
        self,
        out: Outgoing,
        timeouts: Timeouts,
        deadline: float,
        interim: Callable[[int, HeaderList], Awaitable[None]] | None,
        on_done: Callable[[bool], None],
    ) -> Response:
        """Carry one exchange; `on_done(reusable)` once the connection is free again."""
        ...
