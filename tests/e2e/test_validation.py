"""Requests weft must refuse, sent byte for byte over a raw socket.

Each case: what the client sends (in ONE send(), which matters: h11 skips its header-size check
when a whole head arrives in one read), the status weft must answer, whether the connection
must be closed after it, and that the upstream never saw the request.
"""

from __future__ import annotations

import json
import re

import pytest
from support import procs
from support.config import base_config, destination, route
from support.rawhttp import RawConnection, exchange

pytestmark = pytest.mark.e2e

LIMITS = {
    "max_request_line": "1KiB",
    "max_header_bytes": "4KiB",
    "max_headers": 20,
    "max_body_bytes": "10KiB",
}


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """One weft (small limits) for the whole module: these tests only send bad requests.

    Module scope keeps the file fast; it uses procs directly because the function-scoped
    factories cannot be shared.
    """
    tmp = tmp_path_factory.mktemp("validation")
    up = procs.start_upstream("valid", tmp)
    port = procs.free_port()
    config = (base_config(port, limits=LIMITS)
              + destination("app", [up.address])
              + route("app"))
    try:
        proxy = procs.start_weft(tmp, config)
    except BaseException:
        up.stop()
        raise
    yield proxy, up
    try:
        errors = procs.finish([proxy])
    finally:
        up.stop()
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


def _refused(proxied, data: bytes, status: int, *, closed: bool | None = None) -> None:
    proxy, up = proxied
    before = up.stats()["requests"]
    result = exchange(proxy.port, data)
    assert result.statuses == [status], (
        f"expected {status}, got {result.statuses} (leftover {result.leftover[:200]!r})")
    if closed is not None:
        assert result.closed == closed, "connection close after the error"
    assert up.stats()["requests"] == before, "a refused request must not reach the upstream"


# -- framing ------------------------------------------------------------------------------------


def test_content_length_with_transfer_encoding_is_refused_and_closed(proxied):
    _refused(proxied, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
             400, closed=True)


def test_transfer_encoding_on_http10_is_refused_and_closed(proxied):
    _refused(proxied, b"POST /echo HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n", 400, closed=True)


@pytest.mark.parametrize("value", [b"abc", b"5, 6", b"-1"])
def test_malformed_content_length_is_refused(proxied, value):
    _refused(proxied, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: " + value
             + b"\r\n\r\nhello", 400, closed=True)


def test_malformed_chunk_size_is_refused_and_closed(proxied):
    proxy, _ = proxied
    result = exchange(proxy.port, b"POST /sink HTTP/1.1\r\nHost: t\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
    # The head was fine, so the request may already be on its way upstream; the client still
    # gets a 400 and the connection (whose framing is lost) is closed.
    assert result.statuses == [400]
    assert result.closed


# -- Host ---------------------------------------------------------------------------------------


def test_missing_host_on_http11_is_refused(proxied):
    _refused(proxied, b"GET /echo HTTP/1.1\r\nUser-Agent: raw\r\n\r\n", 400)


def test_duplicate_host_is_refused(proxied):
    _refused(proxied, b"GET /echo HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", 400)


@pytest.mark.parametrize("host", [b"bad host", b"a/b", b"[::1", b"user@evil.test",
                                  b"a.test:99999999"])
def test_malformed_host_is_refused(proxied, host):
    _refused(proxied, b"GET /echo HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 400)


def test_http10_without_host_is_accepted(proxied):
    proxy, _ = proxied
    result = exchange(proxy.port, b"GET /echo HTTP/1.0\r\n\r\n")
    assert result.statuses == [200]


# -- request target and method ------------------------------------------------------------------


@pytest.mark.parametrize("target", [b"/echo#fragment", b"/caf\xc3\xa9", b"/a\x7fb"])
def test_fragment_or_non_ascii_in_target_is_refused(proxied, target):
    _refused(proxied, b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n", 400)


def test_asterisk_form_with_get_is_refused(proxied):
    _refused(proxied, b"GET * HTTP/1.1\r\nHost: t\r\n\r\n", 400)


def test_options_asterisk_is_answered(proxied):
    proxy, _ = proxied
    result = exchange(proxy.port, b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", close_wait=0.2)
    assert result.statuses == [200]


def test_connect_is_refused_with_405(proxied):
    _refused(proxied, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405)


def test_long_request_line_gets_414(proxied):
    target = b"/echo?q=" + b"a" * 2000
    _refused(proxied, b"GET " + target + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414)


# -- versions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [b"HTTP/1.2", b"HTTP/2.0", b"HTTP/3.0"])
def test_unsupported_version_gets_505(proxied, version):
    _refused(proxied, b"GET /echo " + version + b"\r\nHost: t\r\n\r\n", 505)


@pytest.mark.parametrize("version", [b"HTTP/1", b"HTTX/1.1", b"http/1.1", b"HTTP/1.1.1"])
def test_malformed_version_gets_400(proxied, version):
    _refused(proxied, b"GET /echo " + version + b"\r\nHost: t\r\n\r\n", 400)


def test_http2_preface_is_served_as_http2_and_reaches_no_upstream(proxied):
    # The dispatcher gives a prior-knowledge preface to the h2 server, whose first frame is
    # its SETTINGS; a client that then sends nothing is closed after client_header
    # (tests/e2e/test_h2.py checks that, with a short timeout).
    proxy, up = proxied
    before = up.stats()["requests"]
    result = exchange(proxy.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", expect=0, close_wait=0.5)
    assert result.statuses == []
    assert result.leftover[3:5] == b"\x04\x00", result.leftover[:20]  # SETTINGS, not an ACK
    assert up.stats()["requests"] == before


# -- header limits ------------------------------------------------------------------------------


def test_too_many_headers_in_one_send_get_431(proxied):
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    _refused(proxied, b"GET /echo HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n", 431)


def test_too_many_header_bytes_in_one_send_get_431(proxied):
    headers = b"".join(b"X-Big%d: %s\r\n" % (i, b"v" * 1500) for i in range(3))
    _refused(proxied, b"GET /echo HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n", 431)


def test_header_bytes_spread_over_several_sends_get_431(proxied):
    proxy, up = proxied
    before = up.stats()["requests"]
    with RawConnection(proxy.port) as conn:
        conn.send_pieces([b"GET /echo HTTP/1.1\r\nHost: t\r\n"]
                         + [b"X-Big%d: %s\r\n" % (i, b"v" * 1500) for i in range(4)]
                         + [b"\r\n"])
        resp = conn.read_response()
    assert resp.status == 431
    assert up.stats()["requests"] == before


def test_malformed_header_line_is_refused(proxied):
    _refused(proxied, b"GET /echo HTTP/1.1\r\nHost: t\r\nNo-Colon-Here\r\n\r\n", 400)


# (Other control characters in a value MAY be kept, RFC 9110 section 5.5; NUL may not.)
@pytest.mark.parametrize("line", [b"X-Nul: a\x00b", b"Bad Name: x", b"X-Cr: a\rb"])
def test_forbidden_bytes_in_a_header_are_refused(proxied, line):
    _refused(proxied, b"GET /echo HTTP/1.1\r\nHost: t\r\n" + line + b"\r\n\r\n", 400)


def test_space_before_colon_is_refused(proxied):
    # RFC 9112 section 5.1: MUST reject with 400.
    _refused(proxied, b"GET /echo HTTP/1.1\r\nHost : t\r\n\r\n", 400)


# -- body limits --------------------------------------------------------------------------------


def test_content_length_over_the_limit_gets_413_before_the_body_is_sent(proxied):
    proxy, up = proxied
    before = up.stats()["requests"]
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: 20000\r\n\r\n")
        resp = conn.read_response()
        assert resp.status == 413
        assert conn.peer_closed(timeout=3.0)
    assert up.stats()["requests"] == before


def test_chunked_body_over_the_limit_gets_413_while_streaming(proxied):
    proxy, _ = proxied
    chunk = b"1000\r\n" + b"z" * 0x1000 + b"\r\n"  # 4 KiB per chunk; the limit is 10 KiB
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /sink HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.send(chunk * 4)  # 16 KiB, no terminating chunk: weft must not wait for the end
        resp = conn.read_response()
        assert resp.status == 413
        assert conn.peer_closed(timeout=3.0)


def test_expect_continue_over_the_limit_gets_413_instead_of_100(proxied):
    proxy, up = proxied
    before = up.stats()["requests"]
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: 20000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        resp = conn.read_response(skip_interim=False)
    assert resp.status == 413, "no 100 Continue for a body that will be refused"
    assert up.stats()["requests"] == before


def test_body_at_the_limit_is_accepted(proxied):
    proxy, _ = proxied
    body = b"k" * 10 * 1024
    result = exchange(proxy.port, b"POST /sink HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                      % len(body) + body, close_wait=0.2)
    assert result.statuses == [200]


def test_limits_apply_with_default_config_too(upstream, weft, free_port):
    """The 32 KiB default head limit holds when a 40 KiB head arrives in one send()."""
    up = upstream("defaults")
    proxy = weft(base_config(free_port()) + destination("app", [up.address]) + route("app"))
    head = b"GET /echo HTTP/1.1\r\nHost: t\r\n" + b"".join(
        b"X-Pad%d: %s\r\n" % (i, b"p" * 4000) for i in range(10)) + b"\r\n"
    result = exchange(proxy.port, head)
    assert result.statuses == [431]
    assert up.stats()["requests"] == 0


# -- message framing, case by case (RFC 9112 section 6) -----------------------------------------
#
# Each case is one request head field block (after Host) and body, the status weft answers and
# whether it then closes the connection. Everything refused here is refused before the request
# reaches the upstream: a body whose length weft cannot determine is never forwarded.

CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"

REFUSED_FRAMING = [
    # Transfer-Encoding: only one "chunked", as the final and only coding (section 6.3 item 4,
    # section 6.1: weft cannot frame any other coding, and refuses it with 400, not 501).
    ("te-chunked-twice-in-one-line", b"Transfer-Encoding: chunked, chunked", CHUNKED_HELLO),
    ("te-chunked-twice-in-two-lines",
     b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", CHUNKED_HELLO),
    ("te-chunked-not-final", b"Transfer-Encoding: chunked, gzip", CHUNKED_HELLO),
    ("te-chunked-not-final-across-lines",
     b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip", CHUNKED_HELLO),
    ("te-gzip-then-chunked", b"Transfer-Encoding: gzip, chunked", CHUNKED_HELLO),
    ("te-gzip-then-chunked-across-lines",
     b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked", CHUNKED_HELLO),
    ("te-gzip-alone", b"Transfer-Encoding: gzip", b"hello"),
    ("te-identity", b"Transfer-Encoding: identity", b"hello"),
    ("te-unknown-token", b"Transfer-Encoding: xchunked", CHUNKED_HELLO),
    ("te-chunked-with-parameter", b"Transfer-Encoding: chunked;q=1", CHUNKED_HELLO),
    ("te-empty", b"Transfer-Encoding: ", b""),
    ("te-empty-list-element", b"Transfer-Encoding: chunked,", CHUNKED_HELLO),
    ("te-with-content-length", b"Transfer-Encoding: chunked\r\nContent-Length: 5", CHUNKED_HELLO),
    # Content-Length (section 6.3 item 5): one field, one value, digits only.
    ("cl-identical-list", b"Content-Length: 5, 5", b"hello"),
    ("cl-identical-lines", b"Content-Length: 5\r\nContent-Length: 5", b"hello"),
    ("cl-differing-lines", b"Content-Length: 5\r\nContent-Length: 6", b"hello!"),
    ("cl-differing-list", b"Content-Length: 5, 6", b"hello!"),
    ("cl-plus-sign", b"Content-Length: +5", b"hello"),
    ("cl-negative", b"Content-Length: -1", b"hello"),
    ("cl-hex", b"Content-Length: 0x5", b"hello"),
    ("cl-empty", b"Content-Length: ", b"hello"),
    ("cl-more-digits-than-any-length", b"Content-Length: " + b"1" * 21, b"hello"),
    # obs-fold (section 5.2): refused, never unfolded (a folded line would be a field to a
    # server that does not unfold, e.g. a Transfer-Encoding hidden from weft).
    ("obs-fold-hiding-transfer-encoding",
     b"Content-Length: 5\r\nX-Pad: a\r\n Transfer-Encoding: chunked", b"hello"),
    ("obs-fold-tab", b"X-Folded: a\r\n\tb", b""),
    ("whitespace-before-first-field", b" X-First: a", b""),
]


@pytest.mark.parametrize(("fields", "body"), [c[1:] for c in REFUSED_FRAMING],
                         ids=[c[0] for c in REFUSED_FRAMING])
def test_ambiguous_or_unsupported_framing_gets_400_and_a_close(proxied, fields, body):
    _refused(proxied, b"POST /echo HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n\r\n" + body,
             400, closed=True)


@pytest.mark.parametrize("fields", [b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
                                    b"Transfer-Encoding: chunked, chunked"],
                         ids=["chunked", "gzip", "chunked-twice"])
def test_transfer_encoding_on_http10_gets_400_and_a_close(proxied, fields):
    # Section 6.1: an HTTP/1.0 recipient cannot know the coding; the body's end is unknown.
    _refused(proxied, b"POST /echo HTTP/1.0\r\nHost: t\r\n" + fields + b"\r\n\r\n"
             + CHUNKED_HELLO, 400, closed=True)


def test_a_content_length_beyond_any_body_limit_gets_413_and_a_close(proxied):
    # 20 digits: still a number to h11 (and to RFC 9110), just over max_body_bytes.
    _refused(proxied, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: " + b"9" * 20
             + b"\r\n\r\nhello", 413, closed=True)


ACCEPTED_FRAMING = [
    ("te-capitalised", b"Transfer-Encoding: Chunked", CHUNKED_HELLO),
    ("te-upper-case-name-and-value", b"TRANSFER-ENCODING: CHUNKED", CHUNKED_HELLO),
    ("te-surrounding-whitespace", b"Transfer-Encoding: \t chunked \t", CHUNKED_HELLO),
    ("cl-leading-zeros", b"Content-Length: 005", b"hello"),
    ("cl-surrounding-whitespace", b"Content-Length:  5 \t", b"hello"),
    ("cl-upper-case-name", b"CONTENT-LENGTH: 5", b"hello"),
]


@pytest.mark.parametrize(("fields", "body"), [c[1:] for c in ACCEPTED_FRAMING],
                         ids=[c[0] for c in ACCEPTED_FRAMING])
def test_unambiguous_framing_variants_are_served_and_the_connection_kept(proxied, fields, body):
    proxy, _ = proxied
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n\r\n" + body)
        first = conn.read_response()
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        second = conn.read_response()
    assert (first.status, second.status) == (200, 200)
    assert json.loads(first.body)["body_len"] == 5
    assert not first.connection_close


# -- chunked bodies (RFC 9112 section 7.1) ------------------------------------------------------

BAD_CHUNKS = [
    # chunk-size: hex digits, and a size that fits in 63 bits (a signed 64-bit offset).
    ("size-100-hex-digits", b"f" * 100 + b"\r\nhello\r\n0\r\n\r\n"),
    ("size-2-pow-64", b"10000000000000000\r\nhello\r\n0\r\n\r\n"),
    ("size-2-pow-63", b"8000000000000000\r\nhello\r\n0\r\n\r\n"),
    ("size-20-hex-digits", b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    ("size-not-hex", b"zz\r\nhello\r\n0\r\n\r\n"),
    ("size-0x-prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("size-negative", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("size-two-numbers", b"5 5\r\nhello\r\n0\r\n\r\n"),
    ("size-leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("size-missing", b"\r\nhello\r\n0\r\n\r\n"),
    ("size-line-ends-in-bare-lf", b"5\nhello\r\n0\r\n\r\n"),
    # chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )
    ("ext-empty-name", b"5;\r\nhello\r\n0\r\n\r\n"),
    ("ext-no-name", b"5;=v\r\nhello\r\n0\r\n\r\n"),
    ("ext-nul", b"5;a=\x00\r\nhello\r\n0\r\n\r\n"),
    ("ext-bare-cr", b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
    ("ext-space-in-value", b"5;a=b c\r\nhello\r\n0\r\n\r\n"),
    ("ext-unterminated-quote", b'5;a="b\r\nhello\r\n0\r\n\r\n'),
    ("ext-non-ascii-name", b"5;\xe9=1\r\nhello\r\n0\r\n\r\n"),
    ("line-over-4-KiB", b"5;a=" + b"b" * 4096 + b"\r\nhello\r\n0\r\n\r\n"),
    ("line-over-4-KiB-without-its-crlf-yet", b"5;a=" + b"b" * 5000),
]


@pytest.mark.parametrize("body", [c[1] for c in BAD_CHUNKS], ids=[c[0] for c in BAD_CHUNKS])
def test_a_malformed_first_chunk_gets_400_and_a_close(proxied, body):
    _refused(proxied, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
             + body, 400, closed=True)


def test_chunk_data_longer_than_its_size_gets_400_and_a_close(proxied):
    # The chunk data must end in CRLF where the size says. (Its first 5 bytes were a valid
    # chunk, so the request may be on its way upstream: only the answer is checked.)
    proxy, _ = proxied
    result = exchange(proxy.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                      b"\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n")
    assert result.statuses == [400]
    assert result.closed


def test_the_largest_chunk_size_weft_accepts_is_limited_by_max_body_bytes_only(proxied):
    # 2**63 - 1: a valid size; the body limit (10 KiB) ends it with 413 once it is exceeded.
    proxy, _ = proxied
    result = exchange(proxy.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                      b"\r\n\r\n7fffffffffffffff\r\n" + b"x" * 16 * 1024)
    assert result.statuses == [413]
    assert result.closed


GOOD_CHUNKS = [
    ("ext-token", b"5;a=b\r\nhello\r\n0\r\n\r\n"),
    ("ext-name-only-and-several", b"5;a;b=c\r\nhello\r\n0\r\n\r\n"),
    ("ext-quoted", b'5;a="x y;\\"z"\r\nhello\r\n0\r\n\r\n'),
    ("ext-bws-after-semicolon", b"5; a = b\r\nhello\r\n0\r\n\r\n"),
    ("ext-s3-chunk-signature", b"5;chunk-signature=" + b"0a" * 32 + b"\r\nhello\r\n0\r\n\r\n"),
    ("ext-line-of-4-KiB", b"5;a=" + b"b" * 4090 + b"\r\nhello\r\n0\r\n\r\n"),
    ("size-upper-case-leading-zeros", b"000000000000000005\r\nhello\r\n0\r\n\r\n"),
    ("last-chunk-with-ext-and-trailer", b"5\r\nhello\r\n0;end=1\r\nX-T: 1\r\n\r\n"),
]


@pytest.mark.parametrize("body", [c[1] for c in GOOD_CHUNKS], ids=[c[0] for c in GOOD_CHUNKS])
def test_well_formed_chunks_are_served_and_the_connection_kept(proxied, body):
    proxy, _ = proxied
    with RawConnection(proxy.port) as conn:
        conn.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        first = conn.read_response()
        conn.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        second = conn.read_response()
    assert (first.status, second.status) == (200, 200)
    assert json.loads(first.body)["body_len"] == 5


def test_a_chunk_line_or_trailer_longer_than_the_head_may_arrive_in_pieces(proxied):
    # A chunk-size line with an S3-style signature, and a trailer, each split across two
    # sends, both longer than this short head: h11 measures incomplete lines against the
    # head's own length unless told otherwise.
    proxy, _ = proxied
    signature = b"5;chunk-signature=" + b"0a" * 32
    with RawConnection(proxy.port) as conn:
        conn.send_pieces([
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
            signature, b"\r\nhello\r\n",
            b"0\r\nX-Trailer: " + b"t" * 200, b"\r\n\r\n",
        ], pause=0.1)
        resp = conn.read_response()
    assert resp.status == 200
    assert json.loads(resp.body)["body_len"] == 5


# -- what a refused client is told --------------------------------------------------------------

PLAIN_BODY = re.compile(rb"[0-9]{3} [A-Za-z -]+: [A-Za-z0-9 ,./()-]+\n")

MALFORMED = [
    ("bad-header-name", b"GET /echo HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n"),
    ("header-without-colon", b"GET /echo HTTP/1.1\r\nHost: t\r\nNo-Colon-Here\r\n\r\n"),
    ("nul-in-value", b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Nul: a\x00b\r\n\r\n"),
    ("bad-request-line", b"GET  /echo HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("bad-method", b"G(T /echo HTTP/1.1\r\nHost: t\r\n\r\n"),
    ("bad-chunk-size", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nhello\r\n0\r\n\r\n"),
    ("bad-chunk-footer", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhelloXX\r\n0\r\n\r\n"),
    ("huge-chunk-size", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + b"f" * 100 + b"\r\nhello\r\n0\r\n\r\n"),
    ("gzip-coding", b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nhello"),
    ("bad-content-length", b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\nhello"),
]


@pytest.mark.parametrize("data", [c[1] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_refused_request_is_told_why_in_a_short_plain_sentence(proxied, data):
    proxy, _ = proxied
    result = exchange(proxy.port, data)
    assert result.statuses == [400]
    body = result.responses[0].body
    for leak in (b"b'", b'b"', b"bytearray", b"h11", b"Traceback", b"Error", b"\\x"):
        assert leak not in body, f"the 400 body shows parser internals: {body!r}"
    assert len(body) < 100 and PLAIN_BODY.fullmatch(body), body
    assert body.startswith(b"400 Bad Request: ")


def test_the_parser_detail_of_a_refused_request_goes_to_the_log(proxied):
    proxy, _ = proxied
    exchange(proxy.port, b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Detail-In-Log\r\n\r\n")
    procs.wait_for(lambda: "X-Detail-In-Log" in proxy.stderr_text(), 5.0,
                   "the refused header line to be logged")
    line = next(ln for ln in proxy.stderr_text().splitlines() if "X-Detail-In-Log" in ln)
    assert " weft.h1[" in line and " INFO " in line, line
