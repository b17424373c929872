"""WebSocket through weft: the Upgrade handshake reaches the upstream, the 101 comes back, and
then weft is a byte tunnel in both directions (wsproto client on one end, wsproto server in the
upstream on the other)."""

from __future__ import annotations

import httpx
import pytest
from support.config import simple_config
from support.wsclient import WsClient

pytestmark = pytest.mark.e2e


def test_websocket_messages_are_echoed_through_the_tunnel(upstream, weft, free_port):
    up = upstream("wsecho")
    proxy = weft(simple_config(free_port(), [up.address]))
    with WsClient(proxy.port, "/ws", host_header="chat.example") as ws:
        # 1. the handshake went through: the upstream's 101 came back with its headers
        assert ws.accepted, f"handshake refused with {ws.rejected_status}"
        assert (b"x-upstream", b"wsecho") in ws.accepted_headers
        # 2. text, binary, a large message and a ping cross in both directions
        ws.send_text("hello through weft")
        assert ws.receive() == "hello through weft"
        ws.send_bytes(bytes(range(256)))
        assert ws.receive() == bytes(range(256))
        big = "x" * 300_000
        ws.send_text(big)
        assert ws.receive(timeout=10.0) == big
        assert ws.ping(b"are you there") == b"are you there"
    stats = up.stats()
    assert stats["connections_accepted"] == 1
    assert stats["by_path"] == {"/ws": 1}


def test_a_tunnelled_upstream_connection_never_carries_plain_requests(upstream, weft, free_port):
    up = upstream("mixed")
    proxy = weft(simple_config(free_port(), [up.address]))
    # 1. a WebSocket and plain requests at the same time
    with WsClient(proxy.port, "/ws") as ws, httpx.Client(base_url=proxy.url, timeout=5.0) as c:
        assert ws.accepted
        tunnel_conn = dict(ws.accepted_headers)[b"x-connection-id"].decode()
        ws.send_text("one")
        during = c.get("/echo")
        assert during.status_code == 200
        assert ws.receive() == "one"
    # 2. after the WebSocket closed, its upstream connection is not reused for HTTP
    with httpx.Client(base_url=proxy.url, timeout=5.0) as c:
        after = c.get("/echo")
    assert tunnel_conn not in (during.headers["x-connection-id"], after.headers["x-connection-id"])


def test_refused_upgrade_is_an_ordinary_response(upstream, weft, free_port):
    up = upstream("noupgrade")
    proxy = weft(simple_config(free_port(), [up.address]))
    # /echo does not speak WebSocket: it answers 200 instead of 101, which the client sees
    ws = WsClient(proxy.port, "/echo")
    try:
        assert not ws.accepted
        assert ws.rejected_status == 200
    finally:
        ws.close()
