"""weft.grpc: which requests are gRPC, grpc-timeout, status mapping, grpc-message encoding, and
the Trailers-Only form of weft's own answers."""

from __future__ import annotations

import pytest

from weft import grpc
from weft.http.errors import error_response
from weft.http.messages import Body, Headers, Request, Response


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"application/grpc+json", True),
        (b"application/grpc;charset=utf-8", True),
        (b"Application/GRPC", True),
        (b"application/grpc-web", False),
        (b"application/grpc-web+proto", False),
        (b"application/json", False),
        (b"application/grpcx", False),
    ],
)
def test_is_grpc_by_content_type(content_type: bytes, expected: bool) -> None:
    assert grpc.is_grpc([(b"te", b"trailers"), (b"content-type", content_type)]) is expected


def test_a_request_without_content_type_is_not_grpc() -> None:
    assert not grpc.is_grpc([(b"te", b"trailers")])


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"500m", 0.5),
        (b"250000u", 0.25),
        (b"100000000n", None),  # 9 digits: over the grammar's 8
        (b"99999999n", 0.099999999),
        (b"12345678S", 12345678.0),
    ],
)
def test_parse_timeout_units(value: bytes, seconds: float | None) -> None:
    got = grpc.parse_timeout(value)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [b"", b"S", b"10", b"10s", b"10 S", b" 10S", b"-1S", b"1.5S", b"1x", b"0S", b"00m", b"\xff1S"],
)
def test_an_unusable_grpc_timeout_is_ignored(value: bytes) -> None:
    """Envoy's getGrpcTimeout gives no timeout for these; a zero one Envoy reads as none."""
    assert grpc.parse_timeout(value) is None


def test_timeout_of_reads_the_header() -> None:
    assert grpc.timeout_of([(b"grpc-timeout", b"20m")]) == pytest.approx(0.02)
    assert grpc.timeout_of([(b"content-type", b"application/grpc")]) is None


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        (400, "bad_request", grpc.INTERNAL),
        (401, None, grpc.UNAUTHENTICATED),
        (403, None, grpc.PERMISSION_DENIED),
        (404, "no_route", grpc.UNIMPLEMENTED),
        (405, "no_route", grpc.UNKNOWN),
        (413, "body_too_large", grpc.UNKNOWN),
        (500, "middleware_error", grpc.UNKNOWN),
        (502, "connect_error", grpc.UNAVAILABLE),
        (502, "upstream_reset", grpc.UNAVAILABLE),
        (503, "no_endpoint", grpc.UNAVAILABLE),
        (503, "breaker_open", grpc.UNAVAILABLE),
        (503, "pool_full", grpc.UNAVAILABLE),
        # weft's own meanings come before the table
        (429, "rate_limited", grpc.RESOURCE_EXHAUSTED),
        (503, "rate_limited", grpc.RESOURCE_EXHAUSTED),  # a limit configured to answer 503
        (429, None, grpc.UNAVAILABLE),  # a 429 that is not weft's rate limit: the table
        (504, "request_timeout", grpc.DEADLINE_EXCEEDED),
        (504, "upstream_header_timeout", grpc.DEADLINE_EXCEEDED),
        (408, "client_body_timeout", grpc.DEADLINE_EXCEEDED),
        (504, "connect_timeout", grpc.UNAVAILABLE),
    ],
)
def test_status_for(status: int, reason: str | None, code: int) -> None:
    assert grpc.status_for(status, reason) == code


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        ("plain text", b"plain text"),
        ("100%", b"100%25"),
        ("café", b"caf%C3%A9"),
        ("a\nb\tc", b"a%0Ab%09c"),
        ("~ and \x7f", b"~ and %7F"),
        ("☕", b"%E2%98%95"),
    ],
)
def test_grpc_message_is_percent_encoded_and_decodes_back(message: str, wire: bytes) -> None:
    assert grpc.encode_message(message) == wire
    assert grpc.decode_message(wire) == message


def test_a_bad_escape_in_grpc_message_is_kept_as_it_is() -> None:
    assert grpc.decode_message(b"50%zz and %4") == "50%zz and %4"


def test_status_of_reads_grpc_status() -> None:
    assert grpc.status_of([(b"grpc-status", b"14"), (b"grpc-message", b"x")]) == 14
    assert grpc.status_of([(b"grpc-status", b"0")]) == 0
    assert grpc.status_of([(b"grpc-status", b"x")]) is None
    assert grpc.status_of([]) is None


def _request(content_type: bytes = b"application/grpc") -> Request:
    headers = Headers([(b"host", b"h"), (b"content-type", content_type)])
    return Request("POST", "/pkg.Svc/Method", headers, Body(), http_version="2")


def test_weft_own_answer_to_a_grpc_request_is_trailers_only() -> None:
    request = _request()
    request.ctx["error"] = "breaker_open"
    response = error_response(503, "the upstream is failing", "rid-1", close=False, retry_after=3)
    fields = grpc.local_reply(request, response)
    assert fields == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"),
        (b"grpc-message", b"the upstream is failing"),
        (b"x-request-id", b"rid-1"),
        (b"retry-after", b"3"),
    ]
    assert request.ctx["grpc_status"] == grpc.UNAVAILABLE
    assert response.status == 503, "the status weft meant stays for the log and metrics"


def test_no_grpc_form_for_other_requests_or_relayed_responses() -> None:
    response = error_response(503, "no", "rid", close=False)
    assert grpc.local_reply(_request(b"text/plain"), response) is None
    assert grpc.local_reply(None, response) is None
    relayed = Response(503, Headers([(b"content-type", b"text/plain")]))
    assert grpc.local_reply(_request(), relayed) is None


def test_trailers_only_leaves_out_an_empty_message() -> None:
    assert grpc.trailers_only(grpc.OK, "") == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"0"),
    ]
