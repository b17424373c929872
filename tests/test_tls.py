"""Unit tests for weft.http.tls: TLSTransport on a real loopback TCP pair, both ends weft's.

The properties the adapters rely on: plaintext already decrypted is readable without the
socket, a short write leaves nothing encrypted-but-unsent behind once the caller's send_all
returns, records without plaintext (session tickets) do not make an idle connection look
busy, and each way a handshake fails is counted under its own reason.
"""

from __future__ import annotations

import hashlib
import socket
import ssl

import pytest
import trio
from support.certs import CA

from weft.http import tls, tls_errors
from weft.http.io import Timers
from weft.http.tls import HandshakeFailed, TLSTransport
from weft.http.transport import TCPTransport

BOUND = 10.0  # seconds: no step of these tests may wait longer


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(server side, client side) of a loopback TCP connection, both non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for s in (server, client):
        s.setblocking(False)
    return server, client


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path)
    return ca, ca.leaf("server", ["localhost"]), ca.leaf("client", ["weft-client"], client=True)


def server_context(pki, *, client_ca: bool = False, min_13: bool = False) -> ssl.SSLContext:
    ca, leaf, _ = pki
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    ctx.set_alpn_protocols(["http/1.1"])
    if min_13:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if client_ca:
        ctx.load_verify_locations(ca.pem)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(pki, *, trust: bool = True, cert: bool = False,
                   max_12: bool = False) -> ssl.SSLContext:
    ca, _, client = pki
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if trust:
        ctx.load_verify_locations(ca.pem)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if cert:
        ctx.load_cert_chain(client.cert, client.key)
    if max_12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def connected(server_ctx, client_ctx) -> tuple[TLSTransport, TLSTransport]:
    s, c = tcp_pair()
    out: dict[str, TLSTransport] = {}

    async def serve() -> None:
        out["s"] = await tls.accept(s, server_ctx, BOUND)

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            out["c"] = await tls.connect(TCPTransport(c), client_ctx, "localhost")
    return out["s"], out["c"]


async def test_handshake_negotiates_alpn_and_shows_the_client_certificate(pki):
    server, client = await connected(server_context(pki, client_ca=True),
                                     client_context(pki, cert=True))
    assert server.alpn == client.alpn == "http/1.1"
    assert server.tls and client.tls
    assert server.peer_certificate == pki[2].der
    assert client.peer_certificate == pki[1].der
    server.close()
    client.close()


async def test_plaintext_already_decrypted_is_read_without_waiting_on_the_socket(pki):
    server, client = await connected(server_context(pki), client_context(pki))
    # 1. two requests in one record; the server reads only a few bytes of it
    await client.send_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    view = memoryview(bytearray(6))
    with trio.fail_after(BOUND):
        await server.wait_readable()
    assert server.recv_into_now(view) == 6 and bytes(view) == b"GET /a"
    # 2. the rest sits in the SSL object, the socket is empty: no wait may sleep on it
    assert server.readable_now()
    with trio.fail_after(1.0):
        await server.wait_readable()
        rest = await server.recv_until(100, trio.current_time() + 1.0, Timers(),
                                       try_first=False)
    assert rest == b" HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
    # 3. and once it is read, nothing is readable until the client writes again
    assert not server.readable_now()
    assert server.recv_now(10) is None
    server.close()
    client.close()


async def test_a_short_write_is_finished_by_send_all_without_loss_or_repeat(pki):
    server, client = await connected(server_context(pki), client_context(pki))
    payload = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)  # 8 MiB
    # 1. nobody reads: the kernel's buffers fill and a write comes back short
    sent = server.send_some(payload)
    assert sent < len(payload)
    assert server._owed and server._out  # a record the kernel did not take whole waits
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(payload):
            data = await client.recv(65536)
            assert data, "EOF before the whole payload"
            received.extend(data)

    # 2. the caller awaits send_all with the rest, as the adapters do; the client reads
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await server.send_all(memoryview(payload)[sent:])
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    server.close()
    client.close()


async def test_an_idle_client_connection_is_not_readable_for_a_session_ticket(pki):
    server, client = await connected(server_context(pki, min_13=True), client_context(pki))
    assert client._ssl.version() == "TLSv1.3"  # the server sends tickets after the handshake
    await trio.sleep(0.1)
    # 1. ticket records sit in the socket: not a response, not a close
    assert not client.readable_now()
    assert client.peek(10) is None
    # 2. a real close is seen, as EOF
    server.close()
    with trio.fail_after(BOUND):
        await client.wait_readable()
    assert client.readable_now()
    assert client.peek(10) == b""
    assert client.peer_closed()
    client.close()


async def test_shutdown_write_sends_eof_and_the_other_way_stays_open(pki):
    server, client = await connected(server_context(pki), client_context(pki))
    await client.send_all(b"last words")
    client.shutdown_write()
    with trio.fail_after(BOUND):
        assert await server.recv(100) == b"last words"
        assert await server.recv(100) == b""
        await server.send_all(b"reply")
        assert await client.recv(100) == b"reply"
    server.close()
    client.close()


async def test_recv_until_times_out_on_the_timers_heap(pki):
    server, client = await connected(server_context(pki), client_context(pki))
    timers = Timers()
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(timers.run)
            with pytest.raises(TimeoutError):
                await server.recv_until(10, trio.current_time() + 0.2, timers)
            nursery.cancel_scope.cancel()
    server.close()
    client.close()


async def fail_server(server_ctx, client_side) -> HandshakeFailed:
    """The HandshakeFailed of a server handshake against `client_side(sock)`."""
    s, c = tcp_pair()
    failure: list[HandshakeFailed] = []

    async def serve() -> None:
        try:
            await tls.accept(s, server_ctx, 1.0)
        except HandshakeFailed as e:
            failure.append(e)

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            try:
                await client_side(c)
            except (OSError, tls_errors.UpstreamTLSError):
                pass
    c.close()
    assert s.fileno() == -1, "a failed handshake closes the socket"
    assert failure, "the handshake did not fail"
    return failure[0]


async def test_each_handshake_failure_has_its_reason(pki):
    async def tls_client(ctx):
        async def go(c: socket.socket) -> None:
            t = await tls.connect(TCPTransport(c), ctx, "localhost")
            await t.recv(1)  # TLS 1.3: a refused client certificate arrives after Finished
        return go

    async def plain_http(c: socket.socket) -> None:
        c.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        await trio.sleep(0.5)

    async def silent(c: socket.socket) -> None:
        await trio.sleep(1.5)

    async def gone(c: socket.socket) -> None:
        c.close()

    cases = [
        (server_context(pki), await tls_client(client_context(pki, trust=False)), "unknown_ca"),
        (server_context(pki, client_ca=True), await tls_client(client_context(pki)),
         "bad_certificate"),
        (server_context(pki, min_13=True), await tls_client(client_context(pki, max_12=True)),
         "protocol_version"),
        (server_context(pki), plain_http, "http_request"),
        (server_context(pki), silent, "timeout"),
        (server_context(pki), gone, "eof"),
    ]
    for server_ctx, client_side, reason in cases:
        failure = await fail_server(server_ctx, client_side)
        assert failure.reason == reason, (reason, failure)
        assert failure.reason in tls_errors.HANDSHAKE_REASONS


async def test_an_untrusted_upstream_certificate_names_the_verification_error(pki, tmp_path):
    other = CA(tmp_path / "other", name="other CA")
    s, c = tcp_pair()

    async def serve() -> None:
        try:
            await tls.accept(s, server_context(pki), BOUND)
        except HandshakeFailed:
            pass

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(other.pem)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(tls_errors.UpstreamTLSError) as info:
                await tls.connect(TCPTransport(c), ctx, "localhost")
    assert info.value.reason == "upstream_tls" and info.value.status == 502
    assert info.value.public == (
        "the upstream's TLS certificate was refused: unable to get local issuer certificate")
    assert c.fileno() == -1
