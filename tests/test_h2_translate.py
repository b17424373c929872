"""The h1 <-> h2 header mapping of the upstream side (`weft.http.h2_translate`) and the
``protocol`` key of a destination (`weft.config`)."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from support.certs import CA
from support.config import MINIMAL_CONFIG, config_errors, load_text

from weft.http.h2_translate import request_headers, response_head, trailer_fields


def test_pseudo_headers_come_first_with_authority_from_host():
    out = request_headers(b"POST", b"/a?b=1", [(b"host", b"api.test:8080"), (b"x-a", b"1")],
                          b"https")
    assert out == [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"api.test:8080"),
        (b":path", b"/a?b=1"),
        (b"x-a", b"1"),
    ]


def test_connection_specific_fields_and_those_connection_names_are_removed():
    fields = [
        (b"host", b"h"),
        (b"connection", b"keep-alive, x-private"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"keep-alive"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"x-private", b"secret"),
        (b"x-kept", b"yes"),
    ]
    names = [k for k, _ in request_headers(b"GET", b"/", fields, b"http")]
    assert names == [b":method", b":scheme", b":authority", b":path", b"x-kept"]


@pytest.mark.parametrize(
    ("te", "kept"),
    [(b"trailers", True), (b"gzip, Trailers", True), (b"gzip", False), (b"deflate;q=1", False)],
)
def test_te_is_kept_only_as_trailers(te, kept):
    out = request_headers(b"GET", b"/", [(b"host", b"h"), (b"te", te)], b"http")
    assert ((b"te", b"trailers") in out) is kept
    assert [v for k, v in out if k == b"te"] in ([b"trailers"], [])


def test_only_the_first_host_becomes_the_authority():
    out = request_headers(b"GET", b"/", [(b"host", b"a"), (b"host", b"b")], b"http")
    assert [v for k, v in out if k == b":authority"] == [b"a"]
    assert not any(k == b"host" for k, _ in out)


def test_request_trailers_lose_pseudo_and_framing_fields():
    t = [(b"x-sum", b"1"), (b":path", b"/x"), (b"content-length", b"3"),
         (b"transfer-encoding", b"chunked"), (b"grpc-status", b"0")]
    assert trailer_fields(t) == [(b"x-sum", b"1"), (b"grpc-status", b"0")]


def test_response_head_gives_status_and_regular_fields():
    status, fields = response_head([(b":status", b"204"), (b"x-a", b"1"), (b"server", b"s")])
    assert status == 204
    assert fields == [(b"x-a", b"1"), (b"server", b"s")]


@pytest.mark.parametrize("head", [[(b"x-a", b"1")], [(b":status", b"2000")],
                                  [(b":status", b"abc")]])
def test_a_response_head_without_a_valid_status_is_refused(head):
    with pytest.raises(ValueError):
        response_head(head)


# -- the destination's protocol key ---------------------------------------------------------


def with_protocol(value: str, extra: str = "") -> str:
    return MINIMAL_CONFIG.replace(
        '[destinations.web]\n', f'[destinations.web]\nprotocol = "{value}"\n'
    ) + extra


def test_protocol_defaults_to_http11_and_reads_h2c(tmp_path):
    assert load_text(tmp_path, MINIMAL_CONFIG).destinations["web"].protocol == "http1.1"
    assert load_text(tmp_path, with_protocol("h2c")).destinations["web"].protocol == "h2c"


def test_an_unknown_protocol_is_refused_with_its_key_path(tmp_path):
    errors = config_errors(tmp_path, with_protocol("http3"))
    assert any("destinations.web.protocol" in e and "unknown protocol 'http3'" in e
               for e in errors), errors


def test_h2_needs_tls_and_h2c_refuses_it(tmp_path):
    errors = config_errors(tmp_path, with_protocol("h2"))
    assert any("destinations.web.protocol" in e and "needs [destinations.web.tls]" in e
               for e in errors), errors
    errors = config_errors(tmp_path, with_protocol("h2c", "\n[destinations.web.tls]\n"))
    assert any("destinations.web.protocol" in e and '"h2c" is cleartext' in e
               for e in errors), errors


@pytest.mark.parametrize(("protocol", "alpn"), [("h2", "h2"), ("auto", "h2"),
                                                ("http1.1", "http/1.1")])
def test_the_upstream_tls_context_offers_alpn_by_protocol(tmp_path, protocol, alpn):
    cfg = load_text(tmp_path, with_protocol(protocol, "\n[destinations.web.tls]\n"))
    ctx = cfg.destinations["web"].tls.context
    # ALPN offered is not readable from a context: a handshake against a server that picks
    # the first protocol it is offered shows it.
    ca = CA(tmp_path / "pki")
    leaf = ca.leaf("s", ["localhost"])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(leaf.cert, leaf.key)
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.load_verify_locations(str(ca.pem))
    a, b = socket.socketpair()
    chosen: list[str | None] = []

    def serve() -> None:
        with server_ctx.wrap_socket(a, server_side=True) as s:
            chosen.append(s.selected_alpn_protocol())

    t = threading.Thread(target=serve)
    t.start()
    with ctx.wrap_socket(b, server_hostname="localhost") as c:
        assert c.selected_alpn_protocol() == alpn
    t.join(10)
    assert chosen == [alpn]
