"""The body of an HTTP/1.1 upstream response, streamed from its connection to whoever relays it.

Split from `weft.http.h1_client`, which owns the exchange (sending the request, reading the
head); this is what comes after the head: the bytes of the body, and the moment the connection
is free again (`on_done`). How those bytes travel is what this module is about:

* a **Content-Length** body is taken out of h11 as soon as the head is parsed: what came with
  the head is lifted from h11's buffer without a copy (`weft.http.h1.take_body_start`), and the
  rest is read **raw**, straight from the socket into the relay's pool buffer
  (`receive_into`), at most the bytes still owed, so nothing past the body is ever read;
* **chunked** and read-until-close bodies go through h11, which owns that framing.

A body read raw leaves h11 in SEND_BODY; the connection says it is reusable on the count alone
(`H1Upstream.raw_done`) and starts its next exchange on a fresh h11 connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import h11
import trio

from weft.http.errors import UpstreamError
from weft.http.h1 import READ_SIZE, fields, take_body_start
from weft.http.messages import Body

if TYPE_CHECKING:
    from weft.http.h1_client import H1Upstream

# Called once when the exchange's connection is free again: True when it may be reused.
OnDone = Callable[[bool], None]


class H1ResponseBody(Body):
    """A response body streamed from an upstream connection; frees it (`on_done`) at the end.

    As on the server side (`weft.http.h1_request.H1RequestBody`), a Content-Length body goes
    **raw** from the moment h11's buffer is empty: read straight from the socket, at most the
    bytes still owed, into the relay's pool buffer (`receive_into`). The connection is then
    reusable on the count alone (`H1Upstream.raw_done`): nothing past the body was read, and
    the next exchange gets a fresh h11 connection. Chunked and read-until-close bodies go
    through h11.
    """

    __slots__ = (
        "_chunks",
        "_complete",
        "_deadline",
        "_done",
        "_idle",
        "_left",
        "_on_done",
        "_raw",
        "_up",
    )

    def __init__(
        self,
        up: H1Upstream,
        on_done: OnDone,
        idle: float,
        deadline: float,
        length: int | None,
    ) -> None:
        super().__init__()
        self._up = up
        self._on_done = on_done
        self._idle = idle
        self._deadline = deadline
        self.length = length
        self._done = False
        self._chunks: list[bytes | bytearray] = []
        self._complete = False
        self._raw = False
        self._left = 0
        conn = up.conn
        if length:
            # A Content-Length body: what came with the head is taken from h11 uncopied, and
            # the rest is read raw (see the class docstring).
            start = take_body_start(conn, length)
            if start is not None:
                if start:
                    self._chunks.append(start)
                self._raw = True
                self._left = length - len(start)
                if not self._left:
                    self._complete = True
                    up.raw_done = True
                    self._finish(True)
                return
        # Take what h11 already holds, without I/O.
        seen = 0
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError:
                break  # reported by the first receive()
            t = type(ev)
            if t is h11.Data:
                self._chunks.append(ev.data)  # h11's own copy: kept, not copied again
                seen += len(ev.data)
            elif t is h11.EndOfMessage:
                self.trailers = fields(ev.headers)
                self._complete = True
                self._finish(True)
                break
            else:
                if ev is h11.NEED_DATA and length is not None:
                    # h11's buffer is empty: the rest is read raw (see the class docstring).
                    self._raw = True
                    self._left = length - seen
                break  # NEED_DATA (or PAUSED): the rest comes by receive()

    def prefetched(self) -> tuple[list[bytes | bytearray], bool]:  # type: ignore[override]
        chunks, self._chunks = self._chunks, []
        return chunks, self._complete

    def _finish(self, reusable: bool) -> None:
        if not self._done:
            self._done = True
            self._on_done(reusable)

    def _wait(self) -> tuple[float, str]:
        """The deadline of the next read and the reason word if it passes."""
        now = trio.current_time()
        if now >= self._deadline:
            raise UpstreamError("request_total exceeded", status=504, reason="request_timeout")
        if self._deadline < now + self._idle:
            return self._deadline, "request_timeout"
        return now + self._idle, "upstream_body_timeout"

    async def receive(self) -> bytes:
        if self._chunks:
            return bytes(self._chunks.pop(0))
        if self._complete:
            return b""
        if self._raw:
            view = memoryview(bytearray(min(self._left, READ_SIZE)))
            return bytes(view[: await self._receive_raw(view)])
        try:
            ev = await self._up.next_event(*self._wait())
        except BaseException:
            self._finish(False)
            raise
        t = type(ev)
        if t is h11.Data:
            return bytes(ev.data)
        if t is h11.EndOfMessage:
            self.trailers = fields(ev.headers)
            self._complete = True
            self._finish(True)
            return b""
        self._finish(False)
        raise UpstreamError(
            f"upstream closed mid-body ({type(ev).__name__})", reason="upstream_reset"
        )

    async def receive_into(self, view: memoryview) -> int:
        if self._raw and not self._chunks and not self._rest:
            if self._complete:
                return 0
            return await self._receive_raw(view)
        return await super().receive_into(view)

    async def _receive_raw(self, view: memoryview) -> int:
        """Read up to the bytes still owed straight into `view`; ends the body at the count."""
        if self._left < len(view):
            view = view[: self._left]
        up = self._up
        try:
            deadline, what = self._wait()
            try:
                n = await up.transport.recv_into(view, deadline, up.timers)
            except TimeoutError:
                raise UpstreamError(
                    f"upstream too slow ({what})", status=504, reason=what
                ) from None
            except (OSError, trio.ClosedResourceError) as e:
                raise UpstreamError(
                    f"upstream connection reset: {e}", reason="upstream_reset"
                ) from None
            if not n:
                raise UpstreamError(
                    f"upstream closed mid-body, {self._left} bytes short", reason="upstream_reset"
                )
        except BaseException:
            self._finish(False)
            raise
        up.received += n
        self._left -= n
        if not self._left:
            self._complete = True
            up.raw_done = True
            self._finish(True)
        return n

    async def aclose(self) -> None:
        self._chunks = []
        self._finish(False)
