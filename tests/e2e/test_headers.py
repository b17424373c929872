"""What happens to header fields on the way through: hop-by-hop fields stop at weft, forwarding
fields are added (and believed only from trusted proxies), Via and the request id are set.

The upstream's /echo returns the exact header list it received, in order.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from support.config import simple_config
from support.rawhttp import RawConnection

pytestmark = pytest.mark.e2e


def _received(resp: httpx.Response) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in resp.json()["headers"]]


def _values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k == name]


@pytest.fixture
def trusting(upstream, weft, free_port):
    """weft that trusts loopback (the test client) as a proxy."""
    up = upstream("hdr")
    config = simple_config(free_port(), [up.address],
                           server={"via": "weft-e2e", "trusted_proxies": ["127.0.0.1/32"]})
    return weft(config), up


@pytest.fixture
def distrusting(upstream, weft, free_port):
    """weft that trusts nobody (the test client is an ordinary client)."""
    up = upstream("hdr")
    config = simple_config(free_port(), [up.address],
                           server={"via": "weft-e2e", "trusted_proxies": []})
    return weft(config), up


def test_hop_by_hop_fields_are_not_forwarded(distrusting):
    proxy, _ = distrusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/echo", headers={
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "X-End-To-End": "kept",
        })
    got = _received(resp)
    names = {k for k, _ in got}
    for hop in ("x-private-hop", "keep-alive", "proxy-connection", "upgrade"):
        assert hop not in names, f"{hop} reached the upstream: {got}"
    # weft may set its own Connection for its upstream connection, never the client's tokens
    for value in _values(got, "connection"):
        assert "x-private-hop" not in value.lower()
    assert _values(got, "x-end-to-end") == ["kept"]


def test_te_trailers_is_kept_other_te_codings_are_not(distrusting):
    proxy, _ = distrusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        trailers = _received(client.get("/echo", headers={"TE": "trailers"}))
        gzip_only = _received(client.get("/echo", headers={"TE": "gzip"}))
    assert [v.lower() for v in _values(trailers, "te")] == ["trailers"]
    assert _values(gzip_only, "te") == []


def test_hop_by_hop_response_fields_are_not_returned(distrusting):
    proxy, _ = distrusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/echo", params={"close": "1"})
    # the upstream said Connection: close about its own connection
    assert "close" not in resp.headers.get("connection", "").lower()
    assert resp.headers["x-upstream"] == "hdr"


def test_forwarding_fields_from_an_untrusted_client_are_replaced(distrusting):
    proxy, _ = distrusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/echo", headers={
            "Host": "shop.example",
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
        })
    got = _received(resp)
    assert _values(got, "x-forwarded-for") == ["127.0.0.1"]
    assert _values(got, "x-forwarded-proto") == ["http"]
    assert _values(got, "x-forwarded-host") == ["shop.example"]


def test_forwarding_fields_from_a_trusted_proxy_are_appended_to(trusting):
    proxy, _ = trusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/echo", headers={
            "Host": "shop.example",
            "X-Forwarded-For": "203.0.113.7, 198.51.100.2",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "public.example",
        })
    got = _received(resp)
    assert _values(got, "x-forwarded-for") == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    assert _values(got, "x-forwarded-proto") == ["https"]
    assert _values(got, "x-forwarded-host") == ["public.example"]


def test_forwarding_fields_are_added_when_the_client_sent_none(trusting):
    proxy, _ = trusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        got = _received(client.get("/echo", headers={"Host": "plain.example"}))
    assert _values(got, "x-forwarded-for") == ["127.0.0.1"]
    assert _values(got, "x-forwarded-proto") == ["http"]
    assert _values(got, "x-forwarded-host") == ["plain.example"]


def test_host_is_passed_by_default(distrusting):
    proxy, _ = distrusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        got = _received(client.get("/echo", headers={"Host": "shop.example:8443"}))
    assert _values(got, "host") == ["shop.example:8443"]


@pytest.mark.parametrize(("policy", "expected"),
                         [("endpoint", None), ("backend.internal", "backend.internal")])
def test_host_header_policy_of_a_destination(upstream, weft, free_port, policy, expected):
    up = upstream("hosthdr")
    proxy = weft(simple_config(free_port(), [up.address],
                               destination_keys={"host_header": policy}))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        got = _received(client.get("/echo", headers={"Host": "shop.example"}))
    assert _values(got, "host") == [expected or up.address]


def test_via_is_appended_both_ways(distrusting):
    proxy, _ = distrusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/echo", headers={"Via": "1.0 edge"})
    # Several Via fields mean the same as one comma-joined field (RFC 9110 section 5.3).
    via_up = ", ".join(_values(_received(resp), "via"))
    assert re.fullmatch(r"1\.0 edge, 1\.1 weft-e2e", via_up), via_up
    via_down = ", ".join(resp.headers.get_list("via"))
    assert re.fullmatch(r"(.*, )?1\.1 weft-e2e", via_down), via_down


def test_request_id_is_generated_sent_upstream_and_returned(distrusting):
    proxy, _ = distrusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        first = client.get("/echo")
        second = client.get("/echo")
    ids = []
    for resp in (first, second):
        sent = _values(_received(resp), "x-request-id")
        assert len(sent) == 1 and sent[0], "the upstream gets exactly one request id"
        assert resp.headers["x-request-id"] == sent[0], "the client gets the same id back"
        ids.append(sent[0])
    assert ids[0] != ids[1]


def test_request_id_from_the_client_is_kept(distrusting):
    proxy, _ = distrusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/echo", headers={"X-Request-Id": "trace-abc-123"})
    assert _values(_received(resp), "x-request-id") == ["trace-abc-123"]
    assert resp.headers["x-request-id"] == "trace-abc-123"


def test_request_id_header_name_is_configurable(upstream, weft, free_port):
    up = upstream("rid")
    proxy = weft(simple_config(free_port(), [up.address],
                               server={"request_id_header": "x-trace-id"}))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/echo", headers={"X-Trace-Id": "mine-1"})
    assert _values(_received(resp), "x-trace-id") == ["mine-1"]
    assert resp.headers["x-trace-id"] == "mine-1"
    assert "x-request-id" not in resp.headers


def test_end_to_end_fields_keep_their_order_and_repetitions(distrusting):
    proxy, _ = distrusting
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/echo", headers=[("X-Multi", "one"), ("X-Other", "o"),
                                            ("X-Multi", "two")])
    got = _received(resp)
    assert _values(got, "x-multi") == ["one", "two"]
    order = [k for k, _ in got if k in ("x-multi", "x-other")]
    assert order == ["x-multi", "x-other", "x-multi"]


H2C_UPGRADE = (b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
               b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")


@pytest.mark.parametrize("request_head", [
    H2C_UPGRADE,
    # the same without naming HTTP2-Settings in Connection (h2csmuggler sends both forms)
    H2C_UPGRADE.replace(b"Connection: Upgrade, HTTP2-Settings", b"Connection: Upgrade"),
    # other upgrades are not tunnelled either: only a WebSocket handshake is
    H2C_UPGRADE.replace(b"Upgrade: h2c", b"Upgrade: TLS/1.2"),
    H2C_UPGRADE.replace(b"Upgrade: h2c", b"Upgrade: h2c, websocket-not"),
], ids=["h2c", "h2c-settings-not-named", "tls", "websocket-lookalike"])
def test_an_h2c_upgrade_is_served_as_plain_http11_and_never_reaches_the_upstream(
    distrusting, request_head
):
    """RFC 9113 section 3.1 (h2csmuggler): 1. the client asks to upgrade to h2c. 2. weft
    answers as HTTP/1.1 and the upstream sees no trace of the upgrade (no Upgrade, no
    HTTP2-Settings, no Connection token naming them), so no upstream can switch the
    connection to a protocol weft does not inspect. 3. The connection stays HTTP/1.1: an
    HTTP/2 preface sent next is refused, not relayed."""
    proxy, up = distrusting
    with RawConnection(proxy.port) as conn:
        conn.send(request_head)
        resp = conn.read_response()
        assert resp.status == 200
        got = [(k.lower(), v) for k, v in json.loads(resp.body)["headers"]]
        names = {k for k, _ in got}
        assert "upgrade" not in names and "http2-settings" not in names, got
        for value in _values(got, "connection"):
            assert "upgrade" not in value.lower() and "http2-settings" not in value.lower(), got
        before = up.stats()["requests"]
        conn.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        after = conn.read_response()
        assert after.status == 505
        assert conn.peer_closed(timeout=3.0)
    assert up.stats()["requests"] == before
