"""A real HTTP/1.1 upstream server for weft's end-to-end tests, which misbehaves on request.

Run it as a subprocess::

    python tests/support/upstream.py --port 0 --name NAME

It binds 127.0.0.1 (``--host`` to change), prints ``LISTENING <port>`` on stdout once it
accepts connections, and exits on SIGTERM (or when its parent dies: PR_SET_PDEATHSIG, so a
killed test run leaves no server behind).

Theory of operation: plain blocking sockets, h11 for the protocol, one daemon thread per
accepted TCP connection. Blocking code is the point: a handler can ``time.sleep`` to be slow,
write raw bytes to break framing, or close the socket mid-body, with nothing in between that
could "fix" the misbehaviour. Threads are cheap at test scale (tens of connections).

Counters (``/stats``) are kept under one lock. ``/stats`` and ``/control`` are *control*
requests: they never count in ``requests``, ``by_path``, ``requests_times``, ``status_counts`` or
``bodies``, are never subject to a fault, and a connection whose first request is a control one
does not count in ``connections_accepted`` (nor ``open_connections``), so a test can read the
counters and steer the server without disturbing them.

Behaviour by path (query parameters in brackets; every response carries ``x-upstream: NAME``
and ``x-connection-id``, the number of the TCP connection it was sent on):

==================================  ==============================================================
``/echo`` [close=1]                 200 JSON describing the request (see ``_describe``)
``/fixed`` [size=N]                 N pattern bytes with Content-Length (HEAD: head only)
``/chunked`` [size=N, chunk=K]      N pattern bytes, chunked, K bytes per chunk
``/trailers``                       chunked body with a trailer field ``x-checksum``
``/sink``                           streams the request body; JSON {body_len, body_sha256}
``/source`` [size=N]                N pattern bytes with Content-Length, written 64 KiB at a time
``/slow`` [delay=S]                 sleeps S seconds, then answers like /echo
``/slowbody`` [delay=S, size=N]     head (Content-Length N), S seconds pause, then the body
``/dribble`` [n=N, interval=S]      chunked: N chunks, S seconds before each
``/close-mid``                      head with Content-Length 1000, 100 bytes, then close
``/close-before``                   reads the request, then closes without answering
``/bad-framing``                    raw response with both Content-Length and Transfer-Encoding
``/bad-response``                   garbage instead of a status line, then close
``/status`` [code=N]                status N (no body for 1xx-less 204/304; HEAD as usual)
``/ws``                             WebSocket echo after a 101 handshake (wsproto)
``/expect`` [reject=1]              100 Continue then JSON, or 417 without reading the body
``/healthz``                        200 ``ok`` with Content-Length; its time and peer are recorded
``/stats`` [reset=1]                JSON counters (below); reset=1 answers them, then clears them
``/control`` [mode, ...]            sets the fault settings (below); 200 JSON of the new settings
``*`` (OPTIONS)                     200 with an Allow header
anything else                       404 with the JSON of /echo
==================================  ==============================================================

``?idle_close=S`` on any keep-alive request: the server closes the connection if no next request
arrives within S seconds (a keep-alive timeout, not announced in the response).
``?idle_408=S`` does the same, but first writes an unsolicited ``408 Request Timeout`` response
(as some servers do on their idle timeout).

TLS (``--tls-cert PEM --tls-key PEM``, and ``--tls-client-ca PEM`` to require client
certificates): every accepted connection is wrapped before it is served, its handshake in its
own thread (a failed one closes that connection only); ``/echo`` then also reports
``tls_client``, the common name of the client's certificate (null without one), and
``tls_client_uris``, its URI SANs (a SPIFFE ID; [] without one).

A request that carries ``Expect: 100-continue`` gets ``100 Continue`` before its body is read,
on every path. ``Connection: close`` from the client (or ``?close=1``) closes after the
response; otherwise the connection is kept alive.

Faults (``/control``): one process-wide setting, changed at run time, so that a test can make the
upstream misbehave and recover while weft runs (health checks, outlier ejection, circuit
breaker, retries). Every ``/control`` request replaces the *whole* setting: a parameter it does
not give takes its default, so ``/control`` alone (or ``?mode=ok``) restores normal behaviour.
Unknown parameters, and parameters that do not belong to the mode, are refused with 400.

==================================  ==============================================================
``mode=ok``                         normal behaviour (the default)
``mode=status&code=N``              status N (200..599) to every request, the request body read
                                    first so the connection stays reusable; [retry_after=S] adds
                                    ``Retry-After: S``
``mode=hang``                       reads the request, answers nothing; closes the connection once
                                    the mode is no longer hang (or after 120 s, or when the peer
                                    closes)
``mode=slow&delay=S``               sleeps S seconds, then answers normally
``mode=reset``                      reads the request, then closes with SO_LINGER 0: the peer
                                    gets a RST and no answer
``mode=flap&period=S``              normal for S seconds, then 503 for S seconds, and so on,
                                    counted from when the mode was set (``since``); the 503s
                                    read the body and take [retry_after=S] like mode=status
``degraded=1``                      every normal response carries ``x-weft-degraded: 1``
``scope=all|traffic|health``        which requests mode *and* degraded apply to: all (default),
                                    only ``/healthz`` (health), or all but ``/healthz`` (traffic)
==================================  ==============================================================

A request whose body the client waits to be invited for (``Expect: 100-continue``) is not read in
hang and reset modes: inviting it would be an answer. The answer JSON has every field: ``mode``,
``code``, ``retry_after``, ``delay``, ``period`` (null where the mode has none), ``degraded``
(bool), ``scope`` and ``since`` (the ``time.monotonic()`` of the change).

``/stats`` fields (times are ``time.monotonic()``: CLOCK_MONOTONIC, which on Linux is one clock
for every process, so a test can compare them with its own):

==================================  ==============================================================
``connections_accepted``            TCP connections, control connections excluded
``requests``, ``by_path``           counted requests, in total and by path (query excluded)
``in_flight``, ``max_in_flight``    requests being handled now, and the most at once
``open_connections``                connections open now (control connections excluded)
``status_counts``                   {"status": count} of final responses sent: 101, the raw heads
                                    of /close-mid and /bad-framing and idle 408s included
``requests_times``                  arrival time of each counted request (the last 20000)
``healthz_times``                   arrival time of each ``/healthz`` request, faulted ones
                                    included (the last 20000; ``by_path`` has the total)
``healthz_peers``                   the client [host, port] of each, index for index
``bodies``                          the last 50 request bodies that were not empty:
                                    {"path", "len", "sha256"}, oldest first
``faults``                          the current fault setting (as ``/control`` answers it)
==================================  ==============================================================

``/stats?reset=1`` answers the counters, then (atomically) clears every count and list;
``in_flight`` and ``open_connections`` describe the present and are kept, ``max_in_flight``
restarts at ``in_flight``. The fault setting is not touched.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11

# 64 KiB: the write size of /source and of the pattern block (a typical socket buffer order).
BLOCK = 64 * 1024
_PATTERN = bytes(range(256)) * (BLOCK // 256)

# A head larger than h11's 16 KiB default must still reach the handlers: the proxy's limits are
# under test, not ours.
MAX_HEAD = 1024 * 1024

# RFC 6455 section 1.3.
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Requests that read or steer the server: never counted, never faulted (module docstring).
CONTROL_PATHS = frozenset({"/stats", "/control"})
HEALTHZ = "/healthz"

# Caps of the /stats lists: enough for any window a test looks at, bounded for soak runs.
TIMES_KEPT = 20000
BODIES_KEPT = 50

# mode=hang holds a connection at most this long: a forgotten hang must not pin threads forever.
HANG_MAX = 120.0
# ... and looks this often whether the peer gave up (so open_connections stays truthful).
HANG_POLL = 0.1


def pattern(size: int, offset: int = 0) -> bytes:
    """The bytes ``offset .. offset+size`` of the endless pattern /fixed, /chunked, /source serve.

    Tests import this to know what a body must be.
    """
    out = bytearray()
    pos = offset
    end = offset + size
    while pos < end:
        start = pos % BLOCK
        take = min(BLOCK - start, end - pos)
        out += _PATTERN[start : start + take]
        pos += take
    return bytes(out)


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    done = 0
    while done < size:
        take = min(BLOCK, size - done)
        h.update(_PATTERN[:take])
        done += take
    return h.hexdigest()


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


@dataclass(frozen=True)
class FaultSettings:
    """One fault setting, as ``/control`` sets it. Frozen: a request reads one consistent
    setting even while a control request replaces it."""

    mode: str = "ok"
    code: int | None = None
    retry_after: str | None = None
    delay: float | None = None
    period: float | None = None
    degraded: bool = False
    scope: str = "all"
    since: float = 0.0  # time.monotonic() when set: flap phases count from here

    MODES = ("ok", "status", "hang", "slow", "reset", "flap")
    SCOPES = ("all", "traffic", "health")
    # Which mode each mode-specific parameter belongs to; one given to another mode is a typo.
    PARAM_MODES = {"code": ("status",), "retry_after": ("status", "flap"),
                   "delay": ("slow",), "period": ("flap",)}
    # Parameters every request may carry (handled by the connection loop, not by /control).
    GENERIC = ("close", "idle_close", "idle_408")

    @classmethod
    def from_query(cls, query: dict[str, str], now: float) -> FaultSettings:
        """The setting a /control query asks for; ValueError (its text for the 400) if the
        query is malformed."""
        known = {"mode", "degraded", "scope", *cls.PARAM_MODES, *cls.GENERIC}
        unknown = sorted(set(query) - known)
        if unknown:
            raise ValueError(f"unknown parameters {unknown}")
        mode = query.get("mode", "ok")
        if mode not in cls.MODES:
            raise ValueError(f"mode must be one of {list(cls.MODES)}, not {mode!r}")
        for key, modes in cls.PARAM_MODES.items():
            if key in query and mode not in modes:
                raise ValueError(f"{key} belongs to mode {'/'.join(modes)}, not {mode}")
        scope = query.get("scope", "all")
        if scope not in cls.SCOPES:
            raise ValueError(f"scope must be one of {list(cls.SCOPES)}, not {scope!r}")
        degraded = query.get("degraded", "0")
        if degraded not in ("0", "1"):
            raise ValueError(f"degraded must be 0 or 1, not {degraded!r}")
        code = delay = period = None
        if mode == "status":
            if "code" not in query:
                raise ValueError("mode=status needs code")
            code = int(query["code"])
            if not 200 <= code <= 599:  # 1xx is not a final answer: h11 could not send it
                raise ValueError(f"code must be 200..599, not {code}")
        if mode == "slow":
            if "delay" not in query:
                raise ValueError("mode=slow needs delay")
            delay = float(query["delay"])
            if not delay >= 0:
                raise ValueError(f"delay must be >= 0, not {delay}")
        if mode == "flap":
            if "period" not in query:
                raise ValueError("mode=flap needs period")
            period = float(query["period"])
            if not period > 0:
                raise ValueError(f"period must be > 0, not {period}")
        retry_after = query.get("retry_after")
        if retry_after is not None and not (
                retry_after.isascii() and retry_after.isprintable() and retry_after.strip()):
            raise ValueError(f"retry_after is no header value: {retry_after!r}")
        return cls(mode, code, retry_after, delay, period, degraded == "1", scope, now)

    def applies_to(self, path: str) -> bool:
        if self.scope == "health":
            return path == HEALTHZ
        if self.scope == "traffic":
            return path != HEALTHZ
        return True

    def flap_failing(self, now: float) -> bool:
        """In mode=flap: True during the 503 half of the cycle at ``now``."""
        assert self.period is not None
        return int((now - self.since) / self.period) % 2 == 1

    def as_json(self) -> dict[str, object]:
        return asdict(self)


class Faults:
    """The process-wide fault setting. A Condition, not just a lock: requests held by mode=hang
    wait on it and are woken the moment the setting changes."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.settings = FaultSettings(since=time.monotonic())

    def current(self) -> FaultSettings:
        with self.cond:
            return self.settings

    def set(self, settings: FaultSettings) -> None:
        with self.cond:
            self.settings = settings
            self.cond.notify_all()


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.raw_accepted = 0
        self.control_connections = 0
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.open_connections = 0
        self.by_path: dict[str, int] = {}
        self.status_counts: dict[int, int] = {}
        self.requests_times: deque[float] = deque(maxlen=TIMES_KEPT)
        self.healthz_times: deque[float] = deque(maxlen=TIMES_KEPT)
        self.healthz_peers: deque[tuple[str, int]] = deque(maxlen=TIMES_KEPT)
        self.bodies: deque[dict[str, object]] = deque(maxlen=BODIES_KEPT)

    def _snapshot_locked(self) -> dict[str, object]:
        return {
            "connections_accepted": self.raw_accepted - self.control_connections,
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "open_connections": self.open_connections,
            "by_path": dict(self.by_path),
            # JSON object keys are strings: "503", not 503.
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "requests_times": list(self.requests_times),
            "healthz_times": list(self.healthz_times),
            "healthz_peers": [list(p) for p in self.healthz_peers],
            "bodies": [dict(b) for b in self.bodies],
        }

    def snapshot(self, reset: bool = False) -> dict[str, object]:
        """The counters; with ``reset``, cleared in the same critical section, so that no
        request is counted in neither the answer nor what follows."""
        with self.lock:
            snap = self._snapshot_locked()
            if reset:
                # Connections: both raw and control to 0, so that connections_accepted restarts
                # at 0 (the control connection asking was counted in both). In-flight requests
                # and open connections are the present, not history: kept.
                self.raw_accepted = self.control_connections = 0
                self.requests = 0
                self.max_in_flight = self.in_flight
                self.by_path.clear()
                self.status_counts.clear()
                self.requests_times.clear()
                self.healthz_times.clear()
                self.healthz_peers.clear()
                self.bodies.clear()
            return snap

    def count_status(self, status: int) -> None:
        with self.lock:
            self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def record_body(self, path: str, length: int, sha256: str) -> None:
        with self.lock:
            self.bodies.append({"path": path, "len": length, "sha256": sha256})


class Closed(Exception):
    """The peer closed, or a handler decided the connection is over."""


class Conn:
    """One accepted TCP connection: its socket, its h11 state machine, and helpers."""

    def __init__(self, server: Server, sock: socket.socket, connection_id: int,
                 peer: tuple[str, int]) -> None:
        self.server = server
        self.sock = sock
        self.connection_id = connection_id
        self.peer = peer  # (host, port) of the client, as /stats healthz_peers reports it
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.request_index = 0
        self.request: h11.Request | None = None
        self.control = False  # first request was a control one: not counted as a connection
        # Per request (set by handle): its path, whether it is a control request (never counted,
        # never faulted), whether its normal answer carries x-weft-degraded, and its body's
        # running length and hash (kept here, not in body_chunks, so a body half read by a
        # handler and drained by serve is still hashed whole).
        self.path = ""
        self.control_request = False
        self.degraded = False
        self.body_len = 0
        self.body_hash = hashlib.sha256()
        # ?idle_close=S on a request: after its response, close if no next request within S s
        # (a server-side keep-alive timeout, without announcing it in Connection: close).
        self.idle_close: float | None = None
        self.idle_408 = False  # ... and then send an unsolicited 408 before closing

    # -- plumbing ---------------------------------------------------------------------------

    def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                between_requests = self.h11.their_state is h11.IDLE
                if self.idle_close is not None and between_requests:
                    self.sock.settimeout(self.idle_close)
                try:
                    data = self.sock.recv(BLOCK)
                except TimeoutError:
                    if self.idle_408:
                        with contextlib.suppress(OSError):
                            self.sock.sendall(
                                b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n"
                                b"content-length: 0\r\n\r\n"
                            )
                            self.count_status(408)
                    raise Closed("idle_close: no next request in time") from None
                except OSError:
                    data = b""
                finally:
                    if self.idle_close is not None and between_requests:
                        self.sock.settimeout(None)
                self.h11.receive_data(data)
                continue
            return event

    def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            self.sock.sendall(data)
        # Final answers only (and 101, the answer to an upgrade): 100 Continue is an invitation.
        if isinstance(event, h11.Response) or (
                isinstance(event, h11.InformationalResponse) and event.status_code == 101):
            self.count_status(event.status_code)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def count_status(self, status: int) -> None:
        if not self.control_request:
            self.server.stats.count_status(status)

    @property
    def is_head(self) -> bool:
        assert self.request is not None
        return self.request.method == b"HEAD"

    def body_chunks(self) -> Iterator[bytes]:
        """Yield the request body as it arrives (100 Continue first if the client waits).

        Hashes it on the way (``body_len``, ``body_hash``); a complete non-empty body of a
        counted request goes to /stats ``bodies``.
        """
        if self.h11.they_are_waiting_for_100_continue:
            self.send(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            event = self.next_event()
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                self.body_len += len(data)
                self.body_hash.update(data)
                yield data
            elif isinstance(event, h11.EndOfMessage):
                self.request_trailers = [(k.decode("latin-1"), v.decode("latin-1"))
                                         for k, v in event.headers.raw_items()]
                if self.body_len and not self.control_request:
                    self.server.stats.record_body(self.path, self.body_len,
                                                  self.body_hash.hexdigest())
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise Closed("client closed inside the request body")
            else:
                raise Closed(f"unexpected event in request body: {event!r}")

    def read_body(self) -> bytes:
        return b"".join(self.body_chunks())

    def respond(
        self,
        status: int,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        content_type: str = "text/plain",
    ) -> None:
        """A whole response with Content-Length (none for HEAD-less 204/304)."""
        hdrs = self.base_headers(headers)
        no_body = status in (204, 304) or 100 <= status < 200
        if not no_body:
            hdrs.append(("content-type", content_type))
            hdrs.append(("content-length", str(len(body))))
        self.send(h11.Response(status_code=status, headers=hdrs, reason=_reason(status)))
        if body and not no_body and not self.is_head:
            self.send(h11.Data(data=body))
        self.send(h11.EndOfMessage())

    def respond_json(self, obj: object, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.respond(status, body, content_type="application/json")

    def base_headers(self, extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        hdrs = [("x-upstream", self.server.name), ("server", "weft-test-upstream"),
                ("x-connection-id", str(self.connection_id))]
        if self.degraded:
            hdrs.append(("x-weft-degraded", "1"))
        if self.want_close:
            hdrs.append(("connection", "close"))
        if extra:
            hdrs.extend(extra)
        return hdrs

    @property
    def query(self) -> dict[str, str]:
        assert self.request is not None
        q = parse_qs(urlsplit(self.request.target.decode("latin-1")).query)
        return {k: v[-1] for k, v in q.items()}

    def qint(self, key: str, default: int) -> int:
        return int(self.query.get(key, default))

    def qfloat(self, key: str, default: float) -> float:
        return float(self.query.get(key, default))

    @property
    def want_close(self) -> bool:
        return self.query.get("close") == "1"

    # -- the connection loop ----------------------------------------------------------------

    def serve(self) -> None:
        try:
            while True:
                event = self.next_event()
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if not isinstance(event, h11.Request):
                    return
                self.request = event
                self.idle_close = None
                if not self.handle(event):
                    return  # the handler took the connection over or closed it
                # Discard whatever body the handler did not read, so the next request parses.
                if self.h11.their_state is h11.SEND_BODY:
                    for _ in self.body_chunks():
                        pass
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    if "idle_close" in self.query:
                        self.idle_close = self.qfloat("idle_close", 1.0)
                    elif "idle_408" in self.query:
                        self.idle_close = self.qfloat("idle_408", 1.0)
                        self.idle_408 = True
                    self.h11.start_next_cycle()
                    self.request_index += 1
                else:
                    self.close_gracefully()
                    return
        except (Closed, OSError, h11.ProtocolError):
            return
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            if not self.control:
                with self.server.stats.lock:
                    self.server.stats.open_connections -= 1

    def close_gracefully(self) -> None:
        """FIN after the response, then read until the peer closes (bounded), so no RST
        destroys a response the peer has not read yet."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(2.0)
            while self.sock.recv(BLOCK):
                pass

    def handle(self, request: h11.Request) -> bool:
        """Dispatch one request. Returns False when the connection must not be reused."""
        path = urlsplit(request.target.decode("latin-1")).path
        now = time.monotonic()
        control = path in CONTROL_PATHS
        self.path = path
        self.control_request = control
        self.degraded = False
        self.body_len = 0
        self.request_trailers: list[tuple[str, str]] = []
        self.body_hash = hashlib.sha256()
        stats = self.server.stats
        with stats.lock:
            if control and self.request_index == 0:
                stats.control_connections += 1
                stats.open_connections -= 1
                self.control = True
            if not control:
                stats.requests += 1
                stats.by_path[path] = stats.by_path.get(path, 0) + 1
                stats.in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
                stats.requests_times.append(now)
                if path == HEALTHZ:
                    # On arrival, before any fault: a probe that hangs or is reset still counts.
                    stats.healthz_times.append(now)
                    stats.healthz_peers.append(self.peer)
        try:
            if control:
                result = ROUTES[path](self)
            else:
                result = self.dispatch(path, now)
        finally:
            if not control:
                with stats.lock:
                    stats.in_flight -= 1
        return result is not False

    def dispatch(self, path: str, now: float) -> bool | None:
        """A counted request: the fault setting first, then (if it lets the request through)
        the path's handler."""
        faults = self.server.faults.current()
        if faults.applies_to(path):
            mode = faults.mode
            if mode == "status":
                assert faults.code is not None
                return self.fault_status(faults.code, faults.retry_after)
            if mode == "flap" and faults.flap_failing(now):
                return self.fault_status(503, faults.retry_after)
            if mode == "hang":
                return self.fault_hang(path)
            if mode == "reset":
                return self.fault_reset()
            if mode == "slow":
                assert faults.delay is not None
                time.sleep(faults.delay)
            self.degraded = faults.degraded
        return ROUTES.get(path, Conn.h_not_found)(self)

    # -- faults (module docstring): each returns like a handler -----------------------------

    def fault_status(self, code: int, retry_after: str | None) -> None:
        # The whole body first: an unread body would make the connection unusable, and a test
        # of retries or breakers wants the pooled connection to survive an error answer.
        self.read_body()
        headers = [("retry-after", retry_after)] if retry_after is not None else None
        self.respond(code, f"fault: status {code}\n".encode(), headers=headers)

    def _read_request_silently(self) -> None:
        """The rest of the request, without answering anything: a client that waits for
        100 Continue is not invited (that would be an answer), so its body stays unread."""
        if not self.h11.they_are_waiting_for_100_continue:
            self.read_body()

    def _peer_gone(self) -> bool:
        """True once the peer closed (EOF or RST); pipelined data does not count."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def fault_hang(self, path: str) -> bool:
        """Answer nothing until the setting stops hanging this path (or HANG_MAX, or the peer
        leaves), then close: the request stays unanswered, as a stuck server leaves it."""
        self._read_request_silently()
        faults = self.server.faults
        deadline = time.monotonic() + HANG_MAX
        while True:
            with faults.cond:
                settings = faults.settings
                if not (settings.mode == "hang" and settings.applies_to(path)):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                faults.cond.wait(min(remaining, HANG_POLL))
            if self._peer_gone():
                break
        return False

    def fault_reset(self) -> bool:
        """Close with SO_LINGER 0 after the request: the kernel sends RST instead of FIN, so
        the peer sees ECONNRESET, not a clean end."""
        self._read_request_silently()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        return False

    # -- handlers: each returns None to keep the connection, False to end it ----------------

    def _describe(self, body_len: int, body_sha: str) -> dict[str, object]:
        assert self.request is not None
        return {
            "name": self.server.name,
            "method": self.request.method.decode(),
            "target": self.request.target.decode("latin-1"),
            "http_version": self.request.http_version.decode(),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in
                        self.request.headers.raw_items()],
            "body_len": body_len,
            "body_sha256": body_sha,
            "trailers": [list(t) for t in self.request_trailers],
            "connection_id": self.connection_id,
            "request_index_on_connection": self.request_index,
            "tls_client": _client_cn(self.sock),
            "tls_client_uris": _client_uris(self.sock),
        }

    def _hash_body(self) -> tuple[int, str]:
        for _ in self.body_chunks():  # body_chunks hashes as it reads
            pass
        return self.body_len, self.body_hash.hexdigest()

    def h_echo(self) -> None:
        n, sha = self._hash_body()
        self.respond_json(self._describe(n, sha))

    def h_fixed(self) -> None:
        self.respond(200, pattern(self.qint("size", 1024)), content_type="application/octet-stream")

    def h_chunked(self) -> None:
        size = self.qint("size", 1024)
        chunk = max(1, self.qint("chunk", 100))
        self.send(h11.Response(status_code=200, reason=b"OK", headers=self.base_headers(
            [("content-type", "application/octet-stream"), ("transfer-encoding", "chunked")])))
        if not self.is_head:
            body = pattern(size)
            for i in range(0, size, chunk):
                self.send(h11.Data(data=body[i : i + chunk]))
        self.send(h11.EndOfMessage())

    def h_trailers(self) -> None:
        body = pattern(self.qint("size", 1000))
        self.send(h11.Response(status_code=200, reason=b"OK", headers=self.base_headers(
            [("content-type", "application/octet-stream"), ("transfer-encoding", "chunked"),
             ("trailer", "x-checksum")])))
        if not self.is_head:
            self.send(h11.Data(data=body[:500]))
            self.send(h11.Data(data=body[500:]))
        self.send(h11.EndOfMessage(headers=[("x-checksum", hashlib.sha256(body).hexdigest())]))

    def h_sink(self) -> None:
        n, sha = self._hash_body()
        self.respond_json({"body_len": n, "body_sha256": sha})

    def h_source(self) -> None:
        size = self.qint("size", BLOCK)
        self.send(h11.Response(status_code=200, reason=b"OK", headers=self.base_headers(
            [("content-type", "application/octet-stream"), ("content-length", str(size))])))
        if not self.is_head:
            sent = 0
            while sent < size:
                take = min(BLOCK, size - sent)
                self.send(h11.Data(data=_PATTERN[:take]))
                sent += take
        self.send(h11.EndOfMessage())

    def h_slow(self) -> None:
        n, sha = self._hash_body()
        time.sleep(self.qfloat("delay", 1.0))
        self.respond_json(self._describe(n, sha))

    def h_slowbody(self) -> None:
        body = pattern(self.qint("size", 100))
        self.send(h11.Response(status_code=200, reason=b"OK", headers=self.base_headers(
            [("content-type", "application/octet-stream"), ("content-length", str(len(body)))])))
        time.sleep(self.qfloat("delay", 1.0))
        if not self.is_head:
            self.send(h11.Data(data=body))
        self.send(h11.EndOfMessage())

    def h_dribble(self) -> None:
        n = self.qint("n", 5)
        interval = self.qfloat("interval", 0.1)
        self.send(h11.Response(status_code=200, reason=b"OK", headers=self.base_headers(
            [("content-type", "text/plain"), ("transfer-encoding", "chunked")])))
        for i in range(n):
            time.sleep(interval)
            if not self.is_head:
                self.send(h11.Data(data=f"chunk {i}\n".encode()))
        self.send(h11.EndOfMessage())

    def h_close_mid(self) -> bool:
        self.read_body()
        self.send_raw(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nx-upstream: "
                      + self.server.name.encode() + b"\r\n\r\n" + pattern(100))
        self.count_status(200)
        return False

    def h_close_before(self) -> bool:
        self.read_body()
        return False

    def h_bad_framing(self) -> bool:
        self.read_body()
        self.send_raw(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n"
                      b"x-upstream: " + self.server.name.encode() + b"\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n")
        self.count_status(200)
        self.close_gracefully()
        return False

    def h_bad_response(self) -> bool:
        self.read_body()
        self.send_raw(b"THIS IS NOT HTTP\x00\x01\r\n\r\n")
        self.close_gracefully()
        return False

    def h_status(self) -> None:
        code = self.qint("code", 200)
        self.read_body()
        self.respond(code, f"status {code}\n".encode())

    def h_expect(self) -> bool | None:
        assert self.request is not None
        expect_seen = any(k == b"expect" for k, _ in self.request.headers)
        if self.query.get("reject") == "1":
            # Refuse without reading the body: RFC 9110 section 10.1.1. The unread body
            # makes the connection unusable, so it closes.
            hdrs = self.base_headers([("connection", "close"), ("content-length", "0")])
            self.send(h11.Response(status_code=417, headers=hdrs))
            self.send(h11.EndOfMessage())
            self.close_gracefully()
            return False
        waiting = self.h11.they_are_waiting_for_100_continue
        n, sha = self._hash_body()
        self.respond_json({"expect_seen": expect_seen, "continue_sent": waiting,
                           "body_len": n, "body_sha256": sha})
        return None

    def h_healthz(self) -> None:
        self.read_body()
        self.respond(200, b"ok")

    def h_stats(self) -> None:
        self.read_body()
        snap = self.server.stats.snapshot(reset=self.query.get("reset") == "1")
        snap["faults"] = self.server.faults.current().as_json()
        self.respond_json(snap)

    def h_control(self) -> None:
        self.read_body()
        try:
            settings = FaultSettings.from_query(self.query, time.monotonic())
        except ValueError as e:
            self.respond_json({"error": str(e)}, status=400)
            return
        self.server.faults.set(settings)
        self.respond_json(settings.as_json())

    def h_asterisk(self) -> None:
        """``OPTIONS *``: the server-wide options request (RFC 9110 section 9.3.7)."""
        self.read_body()
        assert self.request is not None
        if self.request.method == b"OPTIONS":
            self.respond(200, b"", headers=[("allow", "GET, HEAD, POST, PUT, DELETE, OPTIONS")])
        else:
            self.respond(400, b"asterisk-form is only for OPTIONS\n")

    def h_not_found(self) -> None:
        """404, but describing the request like /echo: tests of path rewriting read it."""
        n, sha = self._hash_body()
        self.respond_json(self._describe(n, sha), status=404)

    def h_ws(self) -> bool:
        """WebSocket echo: an h11 handshake, then wsproto on the raw socket."""
        from wsproto.connection import Connection, ConnectionType
        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

        assert self.request is not None
        headers = {k.lower(): v for k, v in self.request.headers}
        key = headers.get(b"sec-websocket-key")
        upgrade = headers.get(b"upgrade", b"").lower()
        if key is None or upgrade != b"websocket":
            self.respond(400, b"not a websocket handshake\n")
            return True
        # With Upgrade in the request h11 pauses after EndOfMessage: read up to that point.
        while True:
            event = self.next_event()
            if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                break
            if isinstance(event, h11.ConnectionClosed):
                return False
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        self.send(h11.InformationalResponse(status_code=101, headers=[
            ("upgrade", "websocket"), ("connection", "Upgrade"),
            ("sec-websocket-accept", accept), ("x-upstream", self.server.name),
            ("x-connection-id", str(self.connection_id))]))
        trailing, _ = self.h11.trailing_data
        ws = Connection(ConnectionType.SERVER)
        if trailing:
            ws.receive_data(bytes(trailing))
        closing = False
        while True:
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    self.send_raw(ws.send(type(event)(data=event.data,
                                                      message_finished=event.message_finished)))
                elif isinstance(event, Ping):
                    self.send_raw(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    with contextlib.suppress(Exception):
                        self.send_raw(ws.send(event.response()))
                    closing = True
            if closing:
                self.close_gracefully()
                return False
            try:
                data = self.sock.recv(BLOCK)
            except OSError:
                data = b""
            if not data:
                return False
            ws.receive_data(data)


ROUTES: dict[str, Callable[[Conn], bool | None]] = {
    "/echo": Conn.h_echo,
    "/fixed": Conn.h_fixed,
    "/chunked": Conn.h_chunked,
    "/trailers": Conn.h_trailers,
    "/sink": Conn.h_sink,
    "/source": Conn.h_source,
    "/slow": Conn.h_slow,
    "/slowbody": Conn.h_slowbody,
    "/dribble": Conn.h_dribble,
    "/close-mid": Conn.h_close_mid,
    "/close-before": Conn.h_close_before,
    "/bad-framing": Conn.h_bad_framing,
    "/bad-response": Conn.h_bad_response,
    "/status": Conn.h_status,
    "/expect": Conn.h_expect,
    "/healthz": Conn.h_healthz,
    "/stats": Conn.h_stats,
    "/control": Conn.h_control,
    "/ws": Conn.h_ws,
    "*": Conn.h_asterisk,
}


def _client_cn(sock: socket.socket) -> str | None:
    """The common name of a TLS client's certificate, None without TLS or certificate."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert()
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _client_uris(sock: socket.socket) -> list[str]:
    """The URI SANs of a TLS client's certificate (a SPIFFE ID), [] without TLS or certificate."""
    if not isinstance(sock, ssl.SSLSocket):
        return []
    cert = sock.getpeercert()
    return [str(v) for k, v in (cert or {}).get("subjectAltName", ()) if k == "URI"]


def _tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Server:
    def __init__(self, name: str, host: str, port: int,
                 tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.tls = tls
        self.stats = Stats()
        self.faults = Faults()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(512)
        self.port = self.listener.getsockname()[1]

    def serve_forever(self) -> None:
        next_id = 0
        while True:
            sock, addr = self.listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            next_id += 1
            with self.stats.lock:
                self.stats.raw_accepted += 1
                self.stats.open_connections += 1
            target = Conn(self, sock, next_id, (addr[0], addr[1])).serve
            if self.tls is not None:
                target = functools.partial(self._serve_tls, sock, next_id, (addr[0], addr[1]))
            threading.Thread(target=target, name=f"conn-{next_id}", daemon=True).start()

    def _serve_tls(self, sock: socket.socket, connection_id: int, peer: tuple[str, int]) -> None:
        """Handshake (bounded), then serve; a failed handshake closes this connection only."""
        assert self.tls is not None
        sock.settimeout(10.0)
        tls_sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            tls_sock.do_handshake()
            tls_sock.settimeout(None)
        except (OSError, ValueError):
            # The alert that says why went out; linger so that the peer reads it, and not a
            # reset (TLS 1.3 clients learn of a refused certificate only when they read).
            raw = socket.socket(fileno=tls_sock.detach())
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_WR)
                raw.settimeout(2.0)
                while raw.recv(BLOCK):
                    pass
            raw.close()
            with self.stats.lock:
                self.stats.open_connections -= 1
            return
        Conn(self, tls_sock, connection_id, peer).serve()


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGTERM): a test run killed hard must not leave this server behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--tls-cert", help="serve TLS with this PEM certificate")
    parser.add_argument("--tls-key", help="... and this PEM key")
    parser.add_argument("--tls-client-ca", help="require client certificates signed by this CA")
    args = parser.parse_args(argv)

    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)

    def on_term(signum: int, frame: object) -> None:
        # Exit at once: daemon connection threads may sit in recv(); os._exit skips joining.
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    tls = _tls_context(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    server = Server(args.name, args.host, args.port, tls)
    print(f"LISTENING {server.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
