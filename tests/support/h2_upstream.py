"""A real HTTP/2 upstream server for weft's tests (h2c, or h2 over TLS with ALPN), built on the
`h2` library and trio; it misbehaves on request.

Run it as a subprocess::

    python tests/support/h2_upstream.py --port 0 [--tls-cert PEM --tls-key PEM]
        [--max-streams N] [--goaway-after N] [--refuse-every N]

It prints ``LISTENING <port>`` once it accepts connections and exits on SIGTERM or when its
parent dies. One trio task per connection reads frames; one task per request stream answers.

Behaviour by path (query parameters in brackets; every response carries ``x-connection-id``):

=========================  ==================================================================
``/echo``                  200 JSON: method, path, authority, scheme, headers, body length
``/sink``                  reads the body; JSON {body_len, body_sha256, trailers}
``/trailers``              body ``hello``, then trailers ``x-checksum: abc`` and
                           ``grpc-status: 0``
``/source`` [size, cl]     `size` pattern bytes (cl=0: without Content-Length), as the
                           client's window allows
``/slow`` [delay]          waits `delay` seconds, then answers like /echo
``/stall-read``            never reads the request body (its window never reopens), answers
                           after 60 s
``/stats`` [reset=1]       JSON {connections, requests, refused, goaways, max_active}
=========================  ==================================================================

Faults, for every connection: ``--goaway-after N`` sends a graceful GOAWAY whose last stream
id is the N-th request stream of the connection; streams above it are ignored (never
processed), the others are answered, then the connection closes. ``--refuse-every N`` answers
every N-th request stream of a connection with RST_STREAM REFUSED_STREAM.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import signal
import ssl
import sys

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

PATTERN = bytes(range(256)) * 256


def pattern(size: int) -> bytes:
    out = PATTERN * (size // len(PATTERN) + 1)
    return out[:size]


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.connections = 0
        self.requests = 0
        self.refused = 0
        self.goaways = 0
        self.max_active = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in
                ("connections", "requests", "refused", "goaways", "max_active")}


class Stream:
    def __init__(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.sid = sid
        self.headers = headers
        self.pseudo = {k: v for k, v in headers if k.startswith(b":")}
        self.send, self.recv = trio.open_memory_channel[tuple[bytes, int] | None](1000)
        self.trailers: list[tuple[bytes, bytes]] = []
        self.window = trio.Event()
        self.reset = False


class Conn:
    def __init__(self, server: Server, stream: trio.abc.Stream, cid: int) -> None:
        self.server = server
        self.io = stream
        self.cid = cid
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.streams: dict[int, Stream] = {}
        self.lock = trio.Lock()
        self.count = 0
        self.goaway_last: int | None = None
        self.active = 0

    async def flush(self) -> None:
        async with self.lock:
            data = self.h2.data_to_send()
            if data:
                await self.io.send_all(data)

    async def serve(self, nursery: trio.Nursery) -> None:
        if self.server.max_streams:
            # In the first SETTINGS frame (an assignment would only be sent acknowledged later)
            self.h2.local_settings = h2.settings.Settings(
                client=False,
                initial_values={
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams
                },
            )
        self.h2.initiate_connection()
        await self.flush()
        while True:
            try:
                data = await self.io.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                print(f"connection {self.cid}: {e!r}", file=sys.stderr, flush=True)
                await self.flush()
                return
            for ev in events:
                self.dispatch(ev, nursery)
            await self.flush()
            if self.goaway_last is not None and not self.active:
                return

    def dispatch(self, ev: h2.events.Event, nursery: trio.Nursery) -> None:
        t = type(ev)
        if t is h2.events.RequestReceived:
            sid = ev.stream_id
            if self.goaway_last is not None and sid > self.goaway_last:
                return  # above the GOAWAY's last id: ignored, never processed
            self.count += 1
            srv = self.server
            if srv.refuse_every and self.count % srv.refuse_every == 0:
                srv.stats.refused += 1
                self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            st = Stream(sid, ev.headers)
            self.streams[sid] = st
            self.active += 1
            srv.stats.requests += 1
            srv.stats.max_active = max(srv.stats.max_active, self.active)
            if ev.stream_ended is not None:
                st.send.send_nowait(None)
            nursery.start_soon(self.handle, st)
            if srv.goaway_after and self.count == srv.goaway_after:
                srv.stats.goaways += 1
                self.goaway_last = sid
                self.h2.close_connection(last_stream_id=sid)
                # Keep serving the streams at or below `sid` (the library closed its state).
                self.h2.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
        elif t is h2.events.DataReceived:
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.send.send_nowait((ev.data, ev.flow_controlled_length))
            else:
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif t is h2.events.TrailersReceived:
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.trailers = list(ev.headers)
        elif t is h2.events.StreamEnded:
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.send.send_nowait(None)
        elif t is h2.events.StreamReset:
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.reset = True
                st.window.set()
                st.send.send_nowait(None)
        elif t in (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged):
            for st in self.streams.values():
                st.window.set()

    async def read_body(self, st: Stream) -> bytes:
        parts = []
        while (item := await st.recv.receive()) is not None:
            data, flow = item
            parts.append(data)
            if not st.reset:
                self.h2.acknowledge_received_data(flow, st.sid)
                await self.flush()
        return b"".join(parts)

    async def respond(self, st: Stream, status: int, body: bytes,
                      headers: list[tuple[bytes, bytes]] | None = None,
                      trailers: list[tuple[bytes, bytes]] | None = None,
                      content_length: bool = True) -> None:
        h = [(b":status", str(status).encode()), (b"x-connection-id", str(self.cid).encode())]
        h += headers or []
        if content_length:
            h.append((b"content-length", str(len(body)).encode()))
        self.h2.send_headers(st.sid, h, end_stream=not body and not trailers)
        await self.flush()
        view = memoryview(body)
        while view:
            if st.reset:
                return
            n = min(self.h2.local_flow_control_window(st.sid), self.h2.max_outbound_frame_size,
                    len(view))
            if n <= 0:
                st.window = trio.Event()
                await st.window.wait()
                continue
            self.h2.send_data(st.sid, bytes(view[:n]), end_stream=(n == len(view)
                                                                    and not trailers))
            view = view[n:]
            await self.flush()
        if trailers:
            self.h2.send_headers(st.sid, trailers, end_stream=True)
            await self.flush()

    async def handle(self, st: Stream) -> None:
        try:
            await self._handle(st)
        except Exception as e:  # a reset stream, a closed connection: the test sees it
            print(f"stream {st.sid}: {e!r}", file=sys.stderr)
        finally:
            self.active -= 1
            self.streams.pop(st.sid, None)
            if self.goaway_last is not None and not self.active:
                await self.io.aclose()

    async def _handle(self, st: Stream) -> None:
        path, _, query = st.pseudo.get(b":path", b"/").decode().partition("?")
        q = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
        srv = self.server
        if path == "/stall-read":
            await trio.sleep(60)
            await self.respond(st, 200, b"late")
            return
        body = await self.read_body(st)
        if path == "/stats":
            out = srv.stats.as_dict()
            if q.get("reset") == "1":
                srv.stats.reset()
            await self.respond(st, 200, json.dumps(out).encode())
            return
        if path == "/slow":
            await trio.sleep(float(q.get("delay", "1")))
        if path in ("/echo", "/slow"):
            info = {
                "method": st.pseudo.get(b":method", b"").decode(),
                "path": st.pseudo.get(b":path", b"").decode(),
                "authority": st.pseudo.get(b":authority", b"").decode(),
                "scheme": st.pseudo.get(b":scheme", b"").decode(),
                "headers": [[k.decode(), v.decode()] for k, v in st.headers
                            if not k.startswith(b":")],
                "body_len": len(body),
            }
            await self.respond(st, 200, json.dumps(info).encode(),
                               [(b"content-type", b"application/json")])
        elif path == "/sink":
            info = {"body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
                    "trailers": [[k.decode(), v.decode()] for k, v in st.trailers]}
            await self.respond(st, 200, json.dumps(info).encode())
        elif path == "/trailers":
            await self.respond(st, 200, b"hello", content_length=False,
                               trailers=[(b"x-checksum", b"abc"), (b"grpc-status", b"0")])
        elif path == "/source":
            size = int(q.get("size", "1024"))
            await self.respond_large(st, size, q.get("cl", "1") == "1")
        else:
            await self.respond(st, 404, b"not found")

    async def respond_large(self, st: Stream, size: int, cl: bool) -> None:
        h = [(b":status", b"200"), (b"x-connection-id", str(self.cid).encode())]
        if cl:
            h.append((b"content-length", str(size).encode()))
        self.h2.send_headers(st.sid, h)
        await self.flush()
        sent = 0
        while sent < size:
            if st.reset:
                return
            n = min(self.h2.local_flow_control_window(st.sid), self.h2.max_outbound_frame_size,
                    size - sent, len(PATTERN))
            if n <= 0:
                st.window = trio.Event()
                await st.window.wait()
                continue
            self.h2.send_data(st.sid, PATTERN[:n], end_stream=sent + n == size)
            sent += n
            await self.flush()


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.max_streams = args.max_streams
        self.goaway_after = args.goaway_after
        self.refuse_every = args.refuse_every
        self.stats = Stats()
        self.next_id = 0
        self.ssl: ssl.SSLContext | None = None
        if args.tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
            ctx.set_alpn_protocols(args.alpn.split(","))
            self.ssl = ctx

    async def handle(self, stream: trio.SocketStream) -> None:
        io: trio.abc.Stream = stream
        if self.ssl is not None:
            io = trio.SSLStream(stream, self.ssl, server_side=True)
            try:
                await io.do_handshake()
            except trio.BrokenResourceError:
                return
            if io.selected_alpn_protocol() != "h2":
                await io.aclose()
                return
        self.next_id += 1
        conn = Conn(self, io, self.next_id)
        async with trio.open_nursery() as nursery:
            try:
                await conn.serve(nursery)
            finally:
                nursery.cancel_scope.cancel()
                with trio.move_on_after(1):
                    await io.aclose()

    async def main(self, port: int) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, self._counted, port)
            print(f"LISTENING {listeners[0].socket.getsockname()[1]}", flush=True)

    async def _counted(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        await self.handle(stream)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--alpn", default="h2")
    p.add_argument("--max-streams", type=int, default=0)
    p.add_argument("--goaway-after", type=int, default=0)
    p.add_argument("--refuse-every", type=int, default=0)
    args = p.parse_args()
    try:  # die with the parent (PR_SET_PDEATHSIG = 1)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    trio.run(Server(args).main, args.port)


if __name__ == "__main__":
    main()
