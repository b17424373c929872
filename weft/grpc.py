"""gRPC as weft sees it: plain HTTP/2 with a few fields that mean something to a proxy.

Weft does not speak gRPC (no protobuf, no framing of messages): the calls pass through as h2
streams like any other. This module owns the few places where a proxy must know the protocol
anyway, as pure functions of header fields, so that the data path asks one module:

* **Which requests are gRPC** (`is_grpc`): ``content-type`` is ``application/grpc`` or
  ``application/grpc+<codec>`` / ``application/grpc;<params>`` (gRPC over HTTP/2, "Requests";
  Envoy's ``Grpc::Common::isGrpcRequestHeaders`` tests the same). ``application/grpc-web`` is
  another framing and is not gRPC here.
* **The deadline** (`parse_timeout`): ``grpc-timeout`` is 1 to 8 digits and a unit (H, M, S,
  m, u, n). The App (`weft.handler`) caps the request's ``request_total`` deadline at it, so
  the forwarder's waits end there and the upstream stream is reset. A value that does not
  parse is ignored, as Envoy's ``Grpc::Common::getGrpcTimeout`` ignores it (it returns no
  timeout); a value of 0 is ignored too, as Envoy takes a 0 gRPC timeout to mean "none".
* **Weft's own answers** (`local_reply`): a gRPC client understands a status only in
  ``grpc-status``/``grpc-message``, so every response weft makes itself (`error_response`:
  no endpoint, breaker open, connect failure, rate limited, deadline...) goes to a gRPC client
  as a Trailers-Only response: one HEADERS frame with END_STREAM carrying ``:status 200``,
  ``content-type: application/grpc`` and the status (gRPC over HTTP/2, "Responses"). The h2
  adapter applies it at the edge (`weft.http.h2_stream`), so middleware, the access log and
  the metrics keep the HTTP status weft meant (503, 429, 504); the access log adds the gRPC
  code it sent (``grpc_status``).
* **The code of an HTTP status** (`status_for`): the gRPC project's table
  (doc/http-grpc-status-mapping.md, which Envoy's ``Grpc::Utility::httpToGrpcStatus``
  follows: 400 INTERNAL, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED, 404 UNIMPLEMENTED,
  429/502/503/504 UNAVAILABLE, anything else UNKNOWN), with weft's own meanings first: rate
  limited is RESOURCE_EXHAUSTED and a timeout weft enforced (504, 408) DEADLINE_EXCEEDED,
  except a connect timeout, which is a connect failure (UNAVAILABLE).
* **Upstream statuses** (`status_of`): the ``grpc-status`` of a response head (Trailers-Only)
  or of its trailers, for the forwarder, which reports UNAVAILABLE to health, outlier
  detection and the breaker as it reports an upstream 503 (`UNAVAILABLE_AS_HTTP`). The
  response itself goes to the client unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weft.http.messages import HeaderList, Request, Response

# Status codes (grpc/grpc doc/statuscodes.md).
OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# What a client is told when the deadline its grpc-timeout set ran out.
DEADLINE_REASON = "the call's grpc-timeout ran out"

# The HTTP status an upstream's UNAVAILABLE counts as for health, outlier detection and the
# breaker: the server says it cannot serve now, as a 503 does.
UNAVAILABLE_AS_HTTP = 503

# doc/http-grpc-status-mapping.md (the table Envoy's httpToGrpcStatus follows).
_BY_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}
# Weft's own meaning of an answer, by its reason word (request.ctx["error"]), before the table.
_BY_REASON = {
    "rate_limited": RESOURCE_EXHAUSTED,
    "connect_timeout": UNAVAILABLE,  # a 504, but the upstream was never reached
}
# Statuses weft answers for a timeout it enforced (504 upstream or deadline, 408 client).
_TIMEOUT_STATUSES = (408, 504)

# grpc-timeout units in seconds (gRPC over HTTP/2, "Requests": TimeoutUnit).
_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
_MAX_DIGITS = 8  # TimeoutValue: "positive integer as ASCII string of at most 8 digits"

_CONTENT_TYPE = b"application/grpc"


def is_grpc(headers: HeaderList) -> bool:
    """Whether a request (or response) with these fields is gRPC, by its content-type."""
    for k, v in headers:
        if k == b"content-type":
            v = v.lower()
            return v == _CONTENT_TYPE or (
                v.startswith(_CONTENT_TYPE) and v[len(_CONTENT_TYPE)] in b"+;"
            )
    return False


def parse_timeout(value: bytes) -> float | None:
    """The seconds of a ``grpc-timeout`` value, or None when it does not parse or is 0 (the
    header is then ignored: see the module docstring)."""
    digits = value[:-1]
    if not 1 <= len(digits) <= _MAX_DIGITS or not digits.isdigit():
        return None
    unit = _UNITS.get(value[-1])
    if unit is None:
        return None
    n = int(digits)
    return n * unit if n else None


def timeout_of(headers: HeaderList) -> float | None:
    """The ``grpc-timeout`` of a request in seconds, None without a usable one."""
    for k, v in headers:
        if k == b"grpc-timeout":
            return parse_timeout(v)
    return None


def status_for(http_status: int, reason: str | None = None) -> int:
    """The gRPC code for an answer weft makes with `http_status` for `reason` (the word the
    access log records; None: unknown)."""
    code = _BY_REASON.get(reason or "")
    if code is not None:
        return code
    if http_status in _TIMEOUT_STATUSES:
        return DEADLINE_EXCEEDED
    return _BY_HTTP.get(http_status, UNKNOWN)


def encode_message(message: str) -> bytes:
    """``grpc-message`` as it goes on the wire: UTF-8, with every byte outside printable ASCII
    (0x20-0x7E) and ``%`` itself percent-encoded (gRPC over HTTP/2, "Responses")."""
    out = bytearray()
    for b in message.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def decode_message(value: bytes) -> str:
    """A ``grpc-message`` value back as text (a bad escape is kept as it is, as the spec asks
    of receivers)."""
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        b = value[i]
        if b == 0x25 and _is_hex(value[i + 1 : i + 3]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", errors="replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def status_of(fields: HeaderList) -> int | None:
    """The ``grpc-status`` among `fields` (a Trailers-Only head, or trailers), None without a
    valid one."""
    for k, v in fields:
        if k == b"grpc-status":
            return int(v) if v.isdigit() and len(v) <= 3 else None
    return None


def trailers_only(code: int, message: str, extra: Iterable[tuple[bytes, bytes]] = ()) -> HeaderList:
    """The one HEADERS block of a Trailers-Only response with `code` and `message`, then
    `extra` (fields such as x-request-id)."""
    fields: HeaderList = [
        (b":status", b"200"),
        (b"content-type", _CONTENT_TYPE),
        (b"grpc-status", b"%d" % code),
    ]
    if message:
        fields.append((b"grpc-message", encode_message(message)))
    fields.extend(extra)
    return fields


# What of weft's own answer still goes to a gRPC client beside the status.
_KEPT = frozenset({b"retry-after", b"ratelimit", b"ratelimit-policy"})


def local_reply(request: Request | None, response: Response) -> HeaderList | None:
    """The Trailers-Only fields to send instead of `response` when it is weft's own answer
    (`weft.http.errors.error_response`) to a gRPC request; None otherwise. Records the code in
    ``request.ctx["grpc_status"]`` for the access log."""
    if response.local is None or request is None or not is_grpc(request.headers.raw):
        return None
    code = status_for(response.status, request.ctx.get("error"))
    request.ctx["grpc_status"] = code
    extra = [(k, v) for k, v in response.headers.raw if k in _KEPT or k == b"x-request-id"]
    return trailers_only(code, response.local, extra)
