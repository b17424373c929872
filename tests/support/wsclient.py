"""A blocking WebSocket client (wsproto over a plain socket) with bounded waits.

    with WsClient(port, "/ws", host_header="example.test") as ws:
        ws.send_text("hi")
        assert ws.receive() == "hi"

The handshake result is kept: ``accepted_headers`` (the 101 response's headers) or, on a refusal,
``rejected_status``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class WsClient:
    def __init__(self, port: int, path: str = "/ws", *, host: str = "127.0.0.1",
                 host_header: str | None = None, timeout: float = 5.0,
                 extra_headers: list[tuple[str, str]] | None = None,
                 tls: ssl.SSLContext | None = None, server_name: str = "localhost") -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:  # wss: TLS to `server_name` first
            self.sock = tls.wrap_socket(self.sock, server_hostname=server_name)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.accepted_headers: list[tuple[bytes, bytes]] | None = None
        self.rejected_status: int | None = None
        self.closed = False
        self._pending: list[Event] = []
        self._send(Request(host=host_header or f"{host}:{port}", target=path,
                           extra_headers=[(k.encode(), v.encode()) for k, v in
                                          (extra_headers or [])]))
        deadline = time.monotonic() + timeout
        while self.accepted_headers is None and self.rejected_status is None:
            for event in self._events(deadline):
                if isinstance(event, AcceptConnection):
                    self.accepted_headers = list(event.extra_headers)
                elif isinstance(event, RejectConnection):
                    self.rejected_status = event.status_code
                elif isinstance(event, RejectData):
                    pass
                else:
                    self._pending.append(event)

    def __enter__(self) -> WsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def accepted(self) -> bool:
        return self.accepted_headers is not None

    def _send(self, event: Event) -> None:
        self.sock.sendall(self.ws.send(event))

    def _events(self, deadline: float) -> list[Event]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no WebSocket event within the deadline")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("no WebSocket event within the deadline") from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            self.ws.receive_data(None)
            events = list(self.ws.events())
            if not events:
                raise ConnectionError("the server closed the connection")
            return events
        self.ws.receive_data(data)
        return list(self.ws.events())

    def send_text(self, text: str) -> None:
        self._send(TextMessage(data=text))

    def send_bytes(self, data: bytes) -> None:
        self._send(BytesMessage(data=data))

    def ping(self, payload: bytes = b"ping") -> bytes:
        """Send a ping and return the pong's payload."""
        self._send(Ping(payload=payload))
        deadline = time.monotonic() + self.timeout
        while True:
            for event in self._take(deadline):
                if isinstance(event, Pong):
                    return bytes(event.payload)

    def _take(self, deadline: float) -> list[Event]:
        if self._pending:
            events, self._pending = self._pending, []
            return events
        return self._events(deadline)

    def receive(self, timeout: float | None = None) -> str | bytes:
        """The next whole message (text or bytes). ConnectionError if the server closes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        parts: list[str | bytes] = []
        while True:
            events = self._take(deadline)
            for i, event in enumerate(events):
                if isinstance(event, Message):
                    parts.append(event.data)
                    if event.message_finished:
                        self._pending = events[i + 1 :] + self._pending
                        if isinstance(parts[0], str):
                            return "".join(p for p in parts if isinstance(p, str))
                        return b"".join(p for p in parts if isinstance(p, bytes))
                elif isinstance(event, Ping):
                    self._send(event.response())
                elif isinstance(event, CloseConnection):
                    raise ConnectionError(f"server closed the WebSocket: {event.code}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.accepted and not self.closed:
                self._send(CloseConnection(code=1000))
                deadline = time.monotonic() + 1.0
                while not self.closed:
                    for event in self._events(deadline):
                        if isinstance(event, CloseConnection):
                            self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
