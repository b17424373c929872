"""Unit tests for weft.http.headers: the header rules of a proxy, with plain header lists.

Header lists are what h11 produces: lowercase byte names, values as sent.
"""

from __future__ import annotations

import ipaddress
import uuid

import pytest

from weft.http.headers import (
    HOP_BY_HOP,
    connection_tokens,
    forward_request_headers,
    forward_response_headers,
    is_trusted,
    is_upgrade_request,
    new_request_id,
    strip_hop_by_hop,
    valid_request_id,
)

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


def forward(headers, **overrides):
    """forward_request_headers with the values of a plain request from an untrusted client."""
    kwargs = dict(
        client_ip="203.0.113.7",
        trusted=False,
        scheme="http",
        host=b"shop.example",
        upstream_host=b"shop.example",
        via=b"1.1 weft",
        request_id_header=b"x-request-id",
        request_id=b"rid-1",
        upgrade=False,
    )
    kwargs.update(overrides)
    return forward_request_headers(headers, **kwargs)


def values(headers, name):
    return [v for k, v in headers if k == name]


# -- hop-by-hop ----------------------------------------------------------------------------------


def test_connection_tokens_are_lowercased_across_every_connection_field():
    headers = [(b"connection", b"Keep-Alive, X-Trace"), (b"connection", b" close ,,")]
    assert connection_tokens(headers) == {b"keep-alive", b"x-trace", b"close"}


def test_every_hop_by_hop_field_and_every_field_connection_names_is_removed():
    headers = [
        (b"host", b"a"),
        (b"connection", b"keep-alive, x-secret"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"keep-alive"),
        (b"te", b"gzip"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"x-secret", b"for the next hop only"),
        (b"accept", b"*/*"),
    ]
    assert strip_hop_by_hop(headers) == [(b"host", b"a"), (b"accept", b"*/*")]


def test_hop_by_hop_set_is_the_rfc_list():
    assert HOP_BY_HOP == {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",  # RFC 7540 section 3.2.1: connection-specific (h2c upgrades only)
    }


def test_te_trailers_survives_as_the_only_te_value():
    # gRPC needs "te: trailers" end to end; other TE codings are for this hop only.
    out = strip_hop_by_hop([(b"te", b"Trailers, deflate;q=0.5"), (b"accept", b"*/*")])
    assert out == [(b"accept", b"*/*"), (b"te", b"trailers")]


def test_upgrade_is_kept_only_when_asked():
    headers = [(b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"x-a", b"1")]

    assert strip_hop_by_hop(headers) == [(b"x-a", b"1")]
    assert strip_hop_by_hop(headers, keep_upgrade=True) == [
        (b"x-a", b"1"),
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
    ]


def test_an_upgrade_request_needs_both_the_upgrade_field_and_the_connection_token():
    assert is_upgrade_request([(b"connection", b"keep-alive, Upgrade"), (b"upgrade", b"websocket")])
    assert not is_upgrade_request([(b"upgrade", b"websocket")])
    assert not is_upgrade_request([(b"connection", b"upgrade")])
    assert not is_upgrade_request([])


@pytest.mark.parametrize("upgrade", [
    [(b"upgrade", b"WebSocket")],
    [(b"upgrade", b"h2c, websocket")],
    [(b"upgrade", b"h2c"), (b"upgrade", b" websocket ")],
])
def test_a_websocket_token_anywhere_in_the_upgrade_list_is_an_upgrade_request(upgrade):
    assert is_upgrade_request([(b"connection", b"Upgrade"), *upgrade])


@pytest.mark.parametrize("value", [b"h2c", b"H2C", b"ws", b"TLS/1.2", b"websocket/13", b"",
                                   b"websockets", b"h2c, web socket"])
def test_only_a_websocket_upgrade_is_an_upgrade_request(value):
    # RFC 9113 section 3.1: h2c is gone; an h2c upgrade that reached an upstream would let the
    # client talk HTTP/2 to it past weft (h2csmuggler). Anything but WebSocket is plain HTTP/1.1.
    assert not is_upgrade_request([(b"connection", b"Upgrade, HTTP2-Settings"),
                                   (b"upgrade", value), (b"http2-settings", b"AAMAAABkAAQ")])


@pytest.mark.parametrize("connection", [b"Upgrade, HTTP2-Settings", b"Upgrade", b"keep-alive"])
def test_an_h2c_upgrade_is_forwarded_without_any_trace_of_it(connection):
    headers = [(b"connection", connection), (b"upgrade", b"h2c"),
               (b"http2-settings", b"AAMAAABkAAQ"), (b"x-a", b"1")]
    out = forward(headers, upgrade=is_upgrade_request(headers))
    names = [k for k, _ in out]
    assert b"upgrade" not in names and b"http2-settings" not in names
    assert b"connection" not in names
    assert values(out, b"x-a") == [b"1"]


def test_a_websocket_upgrade_offering_h2c_too_is_forwarded_as_websocket_only():
    headers = [(b"connection", b"Upgrade, HTTP2-Settings"), (b"upgrade", b"h2c, WebSocket"),
               (b"http2-settings", b"AAMAAABkAAQ"), (b"sec-websocket-key", b"k")]
    out = forward(headers, upgrade=is_upgrade_request(headers))
    assert values(out, b"upgrade") == [b"WebSocket"]
    assert values(out, b"connection") == [b"upgrade"]
    assert values(out, b"http2-settings") == []


def test_http2_settings_is_hop_by_hop_even_when_connection_does_not_name_it():
    assert b"http2-settings" in HOP_BY_HOP
    assert strip_hop_by_hop([(b"http2-settings", b"AAMA"), (b"x-a", b"1")]) == [(b"x-a", b"1")]


# -- trust ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_ip", "trusted"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # IPv4 client on a dual-stack socket
        ("fd12::1", True),
        ("11.0.0.1", False),
        ("::ffff:11.0.0.1", False),
        ("", False),
        ("not-an-ip", False),
    ],
)
def test_is_trusted_checks_the_peer_against_the_trusted_networks(client_ip, trusted):
    assert is_trusted(client_ip, TRUSTED) is trusted


def test_nobody_is_trusted_without_trusted_proxies():
    assert not is_trusted("127.0.0.1", [])


# -- request ids ---------------------------------------------------------------------------------


def test_new_request_ids_are_random_rfc_9562_version_4_uuids():
    ids = {new_request_id() for _ in range(200)}
    assert len(ids) == 200
    for rid in ids:
        u = uuid.UUID(rid)
        assert str(u) == rid
        assert u.version == 4
        assert u.variant == uuid.RFC_4122
        assert valid_request_id(rid.encode())


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (b"abc-123", True),
        (b"!~", True),
        (b"x" * 200, True),
        (b"x" * 201, False),
        (b"", False),
        (b"has space", False),
        (b"tab\there", False),
        (b"caf\xc3\xa9", False),
        (b"nul\x00", False),
    ],
)
def test_a_client_request_id_is_kept_only_when_short_visible_ascii(value, valid):
    assert valid_request_id(value) is valid


# -- the request on its way upstream -------------------------------------------------------------


def test_a_plain_request_gets_forwarded_headers_via_and_request_id():
    out = forward([(b"host", b"shop.example"), (b"accept", b"*/*")])

    assert out == [
        (b"host", b"shop.example"),
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"203.0.113.7"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"shop.example"),
        (b"via", b"1.1 weft"),
        (b"x-request-id", b"rid-1"),
    ]


def test_an_untrusted_client_cannot_spoof_forwarded_headers():
    out = forward(
        [
            (b"x-forwarded-for", b"1.1.1.1"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"admin.example"),
        ],
        scheme="http",
    )
    assert values(out, b"x-forwarded-for") == [b"203.0.113.7"]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-host") == [b"shop.example"]


def test_a_trusted_proxy_chain_is_extended_and_its_proto_and_host_kept():
    out = forward(
        [
            (b"x-forwarded-for", b"198.51.100.1"),
            (b"x-forwarded-for", b"198.51.100.2, 10.9.9.9"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-proto", b"http"),
            (b"x-forwarded-host", b"www.example"),
        ],
        client_ip="10.0.0.5",
        trusted=True,
    )
    # Every hop in order, ours last; the first proto/host the edge proxy set is believed.
    assert values(out, b"x-forwarded-for") == [b"198.51.100.1, 198.51.100.2, 10.9.9.9, 10.0.0.5"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"www.example"]


def test_a_trusted_proxy_without_forwarded_headers_gets_what_weft_saw():
    out = forward([], client_ip="10.0.0.5", trusted=True, scheme="https")
    assert values(out, b"x-forwarded-for") == [b"10.0.0.5"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"shop.example"]


def test_host_is_replaced_by_the_upstream_host_and_sent_first():
    out = forward([(b"accept", b"*/*"), (b"host", b"shop.example")], upstream_host=b"10.0.0.9:8080")
    assert out[0] == (b"host", b"10.0.0.9:8080")
    assert values(out, b"host") == [b"10.0.0.9:8080"]
    # The client's host is still visible to the upstream.
    assert values(out, b"x-forwarded-host") == [b"shop.example"]


def test_http10_request_without_host_gets_no_host_and_no_forwarded_host():
    out = forward([(b"accept", b"*/*")], host=None, upstream_host=None)
    assert values(out, b"host") == []
    assert values(out, b"x-forwarded-host") == []


def test_expect_is_answered_by_weft_and_not_sent_upstream():
    out = forward([(b"expect", b"100-continue"), (b"content-length", b"5")])
    assert values(out, b"expect") == []
    assert values(out, b"content-length") == [b"5"]


def test_the_request_id_field_is_replaced_by_the_chosen_one():
    out = forward(
        [(b"x-trace", b"client-sent"), (b"x-trace", b"second")],
        request_id_header=b"x-trace",
        request_id=b"chosen",
    )
    assert values(out, b"x-trace") == [b"chosen"]
    assert out[-1] == (b"x-trace", b"chosen")


def test_hop_by_hop_fields_do_not_reach_the_upstream():
    out = forward(
        [
            (b"connection", b"keep-alive, x-hop"),
            (b"keep-alive", b"timeout=5"),
            (b"x-hop", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"te", b"trailers"),
        ]
    )
    names = [k for k, _ in out]
    for name in (b"connection", b"keep-alive", b"x-hop", b"transfer-encoding"):
        assert name not in names
    assert values(out, b"te") == [b"trailers"]


def test_a_websocket_request_keeps_its_upgrade():
    out = forward(
        [(b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-key", b"k")],
        upgrade=True,
    )
    assert values(out, b"connection") == [b"upgrade"]
    assert values(out, b"upgrade") == [b"websocket"]
    assert values(out, b"sec-websocket-key") == [b"k"]


def test_via_is_appended_to_an_existing_via():
    out = forward([(b"via", b"1.0 edge")])
    assert b", ".join(values(out, b"via")) == b"1.0 edge, 1.1 weft"


def test_via_entry_is_last_when_the_client_sent_several_via_fields():
    # Field lines with one name combine in order (RFC 9110 §5.3); a proxy appends its entry to
    # the end of the combined value (§7.6.3), so weft's entry must come after "1.1 b".
    out = forward([(b"via", b"1.0 a"), (b"via", b"1.1 b")])
    combined = b", ".join(values(out, b"via"))
    assert combined == b"1.0 a, 1.1 b, 1.1 weft"


def test_the_callers_header_list_is_not_changed():
    headers = [(b"connection", b"close"), (b"via", b"1.0 a"), (b"host", b"h")]
    before = list(headers)
    forward(headers)
    forward_response_headers(headers, via=b"1.1 weft")
    assert headers == before


# -- the response on its way back ----------------------------------------------------------------


def test_response_loses_hop_by_hop_fields_and_gains_via():
    out = forward_response_headers(
        [
            (b"content-type", b"text/plain"),
            (b"connection", b"close, x-internal"),
            (b"x-internal", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"keep-alive", b"timeout=5"),
        ],
        via=b"1.1 weft",
    )
    assert out == [(b"content-type", b"text/plain"), (b"via", b"1.1 weft")]


def test_a_101_response_keeps_upgrade_for_the_client():
    out = forward_response_headers(
        [(b"connection", b"Upgrade"), (b"upgrade", b"websocket"), (b"sec-websocket-accept", b"a")],
        via=b"1.1 weft",
        upgrade=True,
    )
    assert out == [
        (b"sec-websocket-accept", b"a"),
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
        (b"via", b"1.1 weft"),
    ]


def test_request_ids_are_version_4_uuids_and_differ_across_forks():
    import os
    import uuid

    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in list(ids)[:50]:
        u = uuid.UUID(rid)
        assert (u.version, u.variant, str(u)) == (4, uuid.RFC_4122, rid)
    # Forked workers must not repeat each other's ids (nor the parent's next ones).
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, new_request_id().encode())
        os._exit(0)
    os.close(w)
    child_id = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert child_id != new_request_id() and uuid.UUID(child_id).version == 4
