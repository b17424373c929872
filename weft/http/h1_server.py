"""The HTTP/1.1 server side: one `H1Server` per client connection, with h11 doing the framing.

It serves requests one after another (pipelined requests wait in the buffer and are answered in
order), turning each into a neutral `Request` for the App and writing its `Response` back.

What weft adds to h11, and why (see ARCHITECTURE.md, "Known pitfalls"):

* **The request head is found and measured before h11 sees it.** h11 only enforces its size
  limit on heads that arrive in pieces, so weft keeps its own buffer, finds the end of the head
  itself, and applies the request-line (414), head-size and field-count (431) limits to every
  request, pipelined or not. Each request then gets a fresh `h11.Connection` fed with that buffer;
  what h11 has not consumed when the exchange ends (`trailing_data`) becomes the start of the
  next request. A fresh h11 object costs a few microseconds and keeps the limits exact.
* **Checks h11 leaves out**: Host syntax, ``#`` in the target, asterisk-form for anything but
  OPTIONS, versions other than 1.0/1.1 (505), CONNECT (405: weft is not a forward proxy) and the
  HTTP/2 preface (505). h11 would pause on the last two; weft answers them before h11 sees them.
* **Framing is checked on the raw head** (`weft.http.h1_request`, where the head rules
  live), before h11 repairs the evidence away: a body length that two parsers could read
  differently is a 400 and a close. That is Content-Length together with Transfer-Encoding;
  more than one Content-Length, repeated or listed, even when the values agree (h11 merges
  them); a Transfer-Encoding other than one ``chunked`` (h11 answers 501; RFC 9112 §6.3 wants
  400 when chunked is not last, and weft frames no other coding); Transfer-Encoding on
  HTTP/1.0; obs-fold (h11 unfolds it).
* **Closing is lingering**: after an error response the write side is shut and the read side
  drained briefly, so the client reads the response instead of a reset (nginx's lingering_close).
* **100-continue** is answered by weft the moment the forwarder starts reading the body.
* **Drain never races a client's send** (`on_drain`): a request in progress gets
  ``Connection: close``; a connection that waits for its next request keeps being served until
  it has been idle ``timeouts.drain_idle`` since its last response, then closes lingering. Most
  clients (http.client, curl, wrk) reuse a kept-alive connection without checking it, so a
  close at the moment of the drain would cost each of them the request it is sending.

The server never lets a request kill the connection task with an unexpected exception: the
handler (`weft.handler`) turns middleware failures into 500s, and the errors in
`weft.http.errors` become their status here. The body of such an answer is a plain sentence
(``400 Bad Request: malformed request head``); what h11 said about the bytes it refused goes to
the log (``weft.h1``, info), never to the client.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11
import trio

from weft.arena_pool import RELAY_SIZE, BuffersExhausted
from weft.http.errors import ClientError, ClientGone, UpstreamError, error_response
from weft.http.h1 import (
    END,
    READ_SIZE,
    data_bytes,
    end_of_message,
)
from weft.http.h1_request import (
    ClientTimeout,
    H1RequestBody,
    check_fields,
    head_length,
    make_request,
    request_line,
)
from weft.http.headers import fields_valid, has_field
from weft.http.io import SCRATCH
from weft.http.messages import Request, Response
from weft.http.transport import Transport

if TYPE_CHECKING:
    from weft.bufpool import Buffer
    from weft.workers.state import ServerState

log = logging.getLogger("weft.h1")

# After an error response: how long and how much to read before the final close.
LINGER_SECONDS = 2.0  # nginx lingering_time is 30s; 2s covers a client finishing its send
LINGER_BYTES = 1024 * 1024
# Unread request body we still read and discard to keep a connection alive (nginx discards
# bodies of any size; a bound keeps a slow client from holding a worker slot).
DISCARD_BYTES = 256 * 1024
# A draining worker closes an idle connection lingering this long: the client may have sent
# a request just as the idle time ran out, and a close with its bytes unread would be a reset.
DRAIN_LINGER_SECONDS = 1.0

_REASON = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")  # RFC 9112 §4 reason-phrase


def _no_body(request: Request, response: Response) -> bool:
    """A response that carries no body whatever its fields say (RFC 9110 §6.4.1)."""
    return request.method == "HEAD" or response.status in (204, 304)

class H1Server:
    """Serves one client connection until it closes, fails, or the worker drains."""

    def __init__(
        self,
        transport: Transport,
        state: ServerState,
        client: tuple[str, int],
        *,
        accepted: float | None = None,
    ) -> None:
        """`accepted`: when the connection was accepted (trio time), if earlier than now: the
        first head's ``client_header`` counts from then (the dispatcher sniffed meanwhile)."""
        self.transport = transport
        self.state = state
        self.client = client
        cfg = state.config
        self.limits = cfg.limits
        self.timeouts = cfg.timeouts
        self.body_idle = cfg.timeouts.client_body_idle
        self.send_idle = cfg.timeouts.client_send_idle
        self.rid_header = cfg.request_id_header.encode()
        self.drain_idle = cfg.timeouts.drain_idle
        # The connection's arena (`weft.arena_pool`): each request leases its pool buffers
        # through it, and `serve` releases them in one call when the exchange ends. None
        # when the worker has no pool (a ServerState made without one, in tests).
        arenas = state.arenas
        self.arena = arenas.acquire() if arenas is not None else None
        self.buf = self.arena.head if self.arena is not None else bytearray()
        self.requests = 0
        # When the connection last finished something (accepted, or a response sent): keep-alive
        # and drain idle times count from here. `_waiting`: blocked in `_wait_first_byte`.
        self._idle_since = accepted if accepted is not None else trio.current_time()
        self._waiting = False
        self._watched = -1  # the fd registered by watch_gone

    def malformed(self, part: str, detail: object, reason: str) -> ClientError:
        """The 400 for a request h11 refused: the client is told which `part` was malformed,
        the log gets h11's `detail` (it quotes the bytes, as Python reprs)."""
        log.info("malformed %s from %s:%d: %s", part, *self.client, detail)
        return ClientError(f"malformed {part}", reason=reason)

    # -- I/O with timeouts -------------------------------------------------------------------

    async def receive(self, timeout: float, what: str, size: int = READ_SIZE) -> bytes:
        """One read from the client, of at most `size` bytes. Raises ClientTimeout after
        `timeout`, ClientGone on reset."""
        with trio.move_on_after(timeout) as cs:
            try:
                return await self.transport.recv(min(size, READ_SIZE))
            except OSError as e:
                raise ClientGone(f"client connection broke: {e}") from None
        assert cs.cancelled_caught
        raise ClientTimeout(what)

    async def receive_into(self, view: memoryview, timeout: float, what: str) -> int:
        """One read from the client into `view` (a pool buffer's): the byte count, 0 at EOF.
        A read that succeeds at once enters no cancel scope. Raises ClientTimeout after
        `timeout`, ClientGone on reset."""
        transport = self.transport
        try:
            n = transport.recv_into_now(view)
            if n is not None:
                await trio.lowlevel.checkpoint()
                return n
            with trio.move_on_after(timeout):
                while True:
                    await transport.wait_readable()
                    n = transport.recv_into_now(view)
                    if n is not None:
                        return n
        except OSError as e:
            raise ClientGone(f"client connection broke: {e}") from None
        raise ClientTimeout(what)

    async def send_bytes(self, data: bytes | memoryview) -> None:
        """Write to the client. Raises ClientGone on a reset or after `client_send_idle`."""
        try:
            transport = self.transport
            sent = transport.send_some(data)
            if sent < len(data):
                await transport.send_all(memoryview(data)[sent:], self.send_idle)
        except TimeoutError:
            raise ClientGone("client stopped reading (client_send_idle)") from None
        except OSError as e:
            raise ClientGone(f"client connection broke: {e}") from None

    async def send_parts(self, parts: list[bytes | memoryview]) -> None:
        """`send_bytes` of the parts in order, in one gathered write when the kernel takes them
        all (the usual case: no joined copy of a head and its body); what it does not take is
        joined and written as the rest."""
        if len(parts) == 1:
            await self.send_bytes(parts[0])
            return
        try:
            sent = self.transport.send_parts(parts)
        except OSError as e:
            raise ClientGone(f"client connection broke: {e}") from None
        if sent < sum(map(len, parts)):
            await self.send_bytes(memoryview(b"".join(parts))[sent:])

    def watch_gone(self, on_gone: Callable[[], None]) -> None:
        """`ClientWatch`: `on_gone()` once the client closes (or half-closes, or resets) its
        connection while the upstream works on its request (see `PeerWatch`)."""
        self._watched = self.transport.fileno()
        self.state.timers.peers.watch(self._watched, on_gone)

    def unwatch_gone(self) -> None:
        if self._watched >= 0:
            self.state.timers.peers.unwatch(self._watched)
            self._watched = -1

    # -- the connection loop -----------------------------------------------------------------

    async def serve(self) -> None:
        """Serve requests until the connection ends. Closes the transport; never raises."""
        state = self.state
        state.register(self)
        try:
            while await self._wait_first_byte():
                state.inflight += 1
                state.requests += 1
                try:
                    keep = await self._exchange()
                finally:
                    state.inflight -= 1
                    if self.arena is not None:
                        self.arena.release()  # every path: done, failed, client gone, cancelled
                if not keep:
                    break
                self.requests += 1
                self._idle_since = trio.current_time()
        except ClientGone:
            pass
        except Exception:
            log.exception("connection from %s:%d failed", *self.client)
        finally:
            state.unregister(self)
            self.unwatch_gone()
            self.transport.close()
            if self.arena is not None:
                state.arenas.give_back(self.arena)
                self.arena = None

    def on_drain(self) -> None:
        """The worker drains (see `ServerState.drain`).

        A request in progress is answered with ``Connection: close`` and the connection closes
        after it (`_send_response`, `_finish_exchange`). A connection waiting for its next
        request is woken to re-arm its wait: it still serves a request that starts within
        ``timeouts.drain_idle`` of its last response, because closing it at once races a
        request the client is already sending (that request is lost, and a close with its bytes
        unread is a reset).
        """
        if self._waiting:
            self.transport.wake()

    async def _wait_first_byte(self) -> bool:
        """Wait for the next request to start. False: close quietly (idle, EOF, drain)."""
        if self.buf:
            return True
        transport = self.transport
        try:
            n = transport.recv_into_now(SCRATCH)
        except OSError:
            return False
        if n is not None:
            if not n:
                return False
            self.buf += SCRATCH[:n]  # out of the shared scratch before anything awaits
            # Already there (a busy client): no wait, and no yield either, except every 16th
            # request, so that a client pipelining requests weft answers without I/O (404s)
            # cannot starve the other connections. A checkpoint costs ~10 µs here.
            if not self.requests & 15:
                await trio.lowlevel.checkpoint()
            return True
        state = self.state
        timeout = self.timeouts.client_keepalive if self.requests else self.timeouts.client_header
        deadline = self._idle_since + timeout
        try_first = False  # the read just above found nothing: wait first
        while True:
            draining = state.draining
            if draining:
                # Idle since its last response: a client that sent nothing for drain_idle is
                # not mid-send (HAProxy's close-spread-time plays the same part).
                deadline = min(deadline, max(self._idle_since + self.drain_idle,
                                             trio.current_time()))
            self._waiting = True
            try:
                n = await transport.recv_into(
                    SCRATCH, deadline, state.timers, try_first=try_first
                )
            except trio.ClosedResourceError:
                if state.draining and not draining and not transport.closed:
                    try_first = True  # woken by on_drain: wait again, until drain_idle
                    continue
                return False
            except TimeoutError:
                if draining:
                    await self._linger_close(DRAIN_LINGER_SECONDS)
                return False  # idle too long
            except OSError:
                return False  # reset
            finally:
                self._waiting = False
            if not n:
                return False
            self.buf += SCRATCH[:n]
            return True

    async def _read_head(self) -> int:
        """Read until the end of the head; returns its length. Raises ClientError on limits."""
        deadline = trio.current_time() + self.timeouts.client_header
        while (head_len := head_length(self.buf, self.limits)) < 0:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise ClientTimeout("client_header_timeout")
            data = await self.receive(remaining, "client_header_timeout")
            if not data:
                raise ClientGone("client closed mid-head")
            self.buf += data
        return head_len

    async def _exchange(self) -> bool:
        start = trio.current_time()
        request_id = ""
        response: Response | None = None
        request: Request | None = None
        conn: h11.Connection | None = None

        try:
            head_len = head_length(self.buf, self.limits)  # usually complete: no coroutine for it
            if head_len < 0:
                head_len = await self._read_head()
            buf = self.buf
            nl = buf.find(b"\n")
            method, target, version = request_line(bytes(buf[:nl]))
            if buf.count(b"\n", 0, head_len) - 2 > self.limits.max_headers:
                raise ClientError("too many header fields", status=431, reason="too_many_headers")
            check_fields(buf, nl, head_len, version)
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=head_len + 1)
            self._current_conn = conn
            conn.receive_data(buf)  # h11 copies it into its own buffer
            buf.clear()
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                # Always a 400: the head is complete (h11's 431 is for heads in pieces), and
                # its 501 (Transfer-Encoding) cannot come past check_fields.
                raise self.malformed("request head", e, "bad_request") from None
            assert type(ev) is h11.Request, ev
            request = make_request(self, conn, ev, method, target, version, start)
            request.client_watch = self
            arena = self.arena
            if arena is not None:
                request.arena = arena
                arena.ctx = request.ctx
            request_id = request.id
            response = await self.state.app(request)
        except ClientGone:
            if request is not None and self.state.on_abandon is not None:
                self.state.on_abandon(request)
            raise
        except ClientError as e:
            if request is not None:
                request.ctx.setdefault("error", e.reason)
            response = error_response(e.status, e.detail, request_id, close=True)
            if request is None or request.method != "HEAD":
                response.bytes_out = response.body.length or 0
            self._log(request, response, e.reason, start)
            await self._send_error_and_close(conn, response, request)
            return False
        # From here on, a response exists and is ours to send and close.
        if response.tunnel is None:
            chunks, complete = response.body.prefetched()
        else:
            chunks, complete = [], True
        relay = None
        if not complete and self.arena is not None and not _no_body(request, response):
            # The body streams: through a pool buffer, leased before the head goes out, so
            # that none free in time is still a 503 and not a truncated response.
            route = request.route
            idle = (route.timeouts if route is not None else self.timeouts).upstream_body_idle
            try:
                relay = await self.arena.lease_wait(RELAY_SIZE, idle)
            except BuffersExhausted as e:
                await response.body.aclose()
                request.ctx["error"] = e.reason
                response = error_response(
                    503, BuffersExhausted.public, request.id, close=True, retry_after=1
                )
                if request.method != "HEAD":
                    response.bytes_out = response.body.length or 0
                self._log(request, response, e.reason, start)
                await self._send_error_and_close(conn, response, request)
                return False
        try:
            await self._send_response(conn, request, response, chunks, complete, relay)
        except UpstreamError as e:
            # The upstream failed mid-body: the client got a truncated response; it must see
            # the connection close, never a well-framed but incomplete body.
            request.ctx["error"] = e.reason
            log.warning("request %s: %s", request.id, e.detail)
            return False
        except ClientError as e:
            request.ctx["error"] = e.reason
            return False
        finally:
            await response.body.aclose()
            self._log(request, response, request.ctx.get("error"), start)
        if response.tunnel is not None:
            return False
        return await self._finish_exchange(conn, request)

    def _log(
        self, request: Request | None, response: Response, error: str | None, start: float
    ) -> None:
        hook = self.state.on_exchange
        if hook is not None:
            try:
                hook(request, response, error, self.client, trio.current_time() - start)
            except Exception:
                log.exception("access log hook failed")

    async def _send_interim(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Relay a 1xx (not 101) to the client. Only offered to HTTP/1.1 clients."""
        req_conn = self._current_conn
        if req_conn is None or req_conn.our_state is not h11.SEND_RESPONSE:
            return
        await self.send_bytes(
            req_conn.send(h11.InformationalResponse(status_code=status, headers=headers))
        )

    _current_conn: h11.Connection | None = None

    async def _send_response(
        self,
        conn: h11.Connection,
        request: Request,
        response: Response,
        chunks: list[bytes],
        complete: bool,
        relay: Buffer | None,
    ) -> bool:
        """Write the response head and stream its body (`chunks` and `complete`: what the
        body's `prefetched` gave; the rest is read into `relay`'s pool buffer and written from
        it, or as `bytes` without one). Returns True once the head went out."""
        self._current_conn = conn
        headers = response.headers.raw
        close = request.ctx.get("close") or self.state.draining
        if response.tunnel is not None:
            data = conn.send(
                h11.InformationalResponse(status_code=101, headers=headers, reason=response.reason)
            )
            await self.send_bytes(data)
            client_rest = conn.trailing_data[0]
            await response.tunnel.run(self.transport, client_rest)
            return True
        if close:
            headers = [*headers, (b"connection", b"close")]
        try:
            reason = response.reason
            trusted = (request.validated or fields_valid(headers)) and (
                _REASON.fullmatch(reason) is not None
            )
            data = conn.send(
                h11.Response(
                    status_code=response.status, headers=headers, reason=reason, _parsed=trusted
                )
            )
        except h11.LocalProtocolError as e:
            raise UpstreamError(
                f"response head cannot be sent: {e}", reason="bad_response"
            ) from None
        body = response.body
        no_body = _no_body(request, response)
        chunked = request.http_version == "1.1" and not has_field(headers, b"content-length")
        out: list[bytes | memoryview] = [data]
        sent = 0
        if not no_body:
            for c in chunks:
                sent += len(c)
                out += conn.send_with_data_passthrough(h11.Data(data=c))
        chunks.clear()  # the caller's list: do not keep the chunks alive through the relay
        if complete:
            trailers = body.trailers if chunked and not no_body else []
            out.append(conn.send(end_of_message(trailers)))
        await self.send_parts(out)
        del out
        response.bytes_out = sent
        if not complete:
            if relay is not None:
                view = relay.view
                while n := await body.receive_into(view):
                    try:
                        data = data_bytes(conn, view[:n])
                    except h11.LocalProtocolError as e:
                        raise UpstreamError(
                            f"upstream sent more than it declared: {e}", reason="bad_response"
                        ) from None
                    await self.send_bytes(data)
                    response.bytes_out += n
            while chunk := await body.receive():
                if no_body:
                    continue
                try:
                    data = conn.send(h11.Data(data=chunk))
                except h11.LocalProtocolError as e:
                    raise UpstreamError(
                        f"upstream sent more than it declared: {e}", reason="bad_response"
                    ) from None
                await self.send_bytes(data)
                response.bytes_out += len(chunk)
            trailers = body.trailers if chunked and not no_body else []
            try:
                data = conn.send(end_of_message(trailers))
            except h11.LocalProtocolError as e:
                raise UpstreamError(
                    f"response body incomplete: {e}", reason="bad_response"
                ) from None
            if data:
                await self.send_bytes(data)
        return True

    async def _finish_exchange(self, conn: h11.Connection, request: Request) -> bool:
        """After the response: discard an unread body if cheap, decide on keep-alive."""
        body = request.body
        assert isinstance(body, H1RequestBody)
        if not body.done:
            if conn.client_is_waiting_for_100_continue or request.ctx.get("close"):
                return await self._linger_close()
            discarded = 0
            try:
                with trio.move_on_after(min(self.body_idle, LINGER_SECONDS)):
                    while chunk := await body.receive():
                        discarded += len(chunk)
                        if discarded > DISCARD_BYTES:
                            break
            except ClientError:
                return False
            if not body.done:
                return await self._linger_close()
        # A body read raw (`H1RequestBody`) ended at its exact last byte, past h11 (whose
        # state stays SEND_BODY) and with nothing read beyond it: as good as their DONE.
        their_done = conn.their_state is h11.DONE or body.raw
        if conn.our_state is h11.DONE and their_done:
            # The response promised keep-alive (it had no Connection: close). Even if the
            # worker began draining since it went out, the client may be sending its next
            # request now: `_wait_first_byte` serves it or closes after drain_idle.
            if not body.raw:
                self.buf += conn.trailing_data[0]  # pipelined bytes (buf is empty here)
            return True
        return await self._linger_close() if not their_done else False

    async def _send_error_and_close(
        self, conn: h11.Connection | None, response: Response, request: Request | None
    ) -> None:
        """Send an error response the proxy made, then close (lingering)."""
        if conn is None or conn.our_state is not h11.SEND_RESPONSE:
            # h11 never parsed the head: write our response with a throwaway connection.
            conn = h11.Connection(h11.SERVER)
            conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            conn.next_event()
        try:
            data = conn.send(
                h11.Response(status_code=response.status, headers=response.headers.raw)
            )
            chunks, _ = response.body.prefetched()
            if request is None or request.method != "HEAD":
                for c in chunks:
                    data += conn.send(h11.Data(data=c))
            data += conn.send(END)
            await self.send_bytes(data)
        except (ClientGone, h11.LocalProtocolError):
            return
        await self._linger_close()

    async def _linger_close(self, seconds: float = LINGER_SECONDS) -> bool:
        """Shut our write side and read what the client still sends, for at most `seconds`
        (nginx's lingering_close), so the client reads what we wrote instead of a reset.
        Returns False."""
        transport = self.transport
        try:
            transport.shutdown_write()
        except OSError:
            return False
        total = 0
        with trio.move_on_after(seconds):
            try:
                while data := await transport.recv(READ_SIZE):
                    total += len(data)
                    if total > LINGER_BYTES:
                        # A client that keeps sending (an upload weft refused): stop reading, so
                        # it costs no more CPU, but keep the connection until the time is up, so
                        # it can read our response before the close's reset discards it.
                        await trio.sleep_forever()
            except (OSError, trio.ClosedResourceError):
                pass
        return False
