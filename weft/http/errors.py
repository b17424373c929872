"""Exceptions that carry an HTTP outcome across layers.

The data path raises these where it learns what went wrong and catches them where a response can
still be written: a `ClientError` (the client's fault: 4xx, connection closed afterwards when
framing is in doubt) or an `UpstreamError` (the upstream's fault: 502/503/504). `reason` is a
short stable word used in the access log and, later, as a metric label.

The `detail` of a ClientError is what the client is told (``400 Bad Request: <detail>``), so it
is a short plain sentence: what a parser said about the bytes (h11's messages quote them as
Python reprs) goes to the log, never into it. An UpstreamError's detail is only logged; the
forwarder tells the client a fixed sentence per reason (`weft.forward.PUBLIC_REASON`).
"""

from __future__ import annotations

from http import HTTPStatus


class ProxyError(Exception):
    """An outcome with a status the proxy itself produces."""

    status = 500
    reason = "internal"
    close = False  # whether the client connection must be closed afterwards

    def __init__(
        self,
        detail: str = "",
        *,
        status: int | None = None,
        reason: str | None = None,
        close: bool | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason
        if status is not None:
            self.status = status
        if reason is not None:
            self.reason = reason
        if close is not None:
            self.close = close
        self.retry_after = retry_after


class ClientError(ProxyError):
    """The client sent something we refuse, or went quiet. Passes through user middleware."""

    status = 400
    reason = "bad_request"
    close = True


class ClientGone(ClientError):
    """The client closed or reset its connection; nothing can be sent to it any more."""

    status = 499  # nginx's "client closed request": logged only, never sent
    reason = "client_gone"


class UpstreamError(ProxyError):
    """The upstream broke the exchange, was too slow, or none was available."""

    status = 502
    reason = "upstream"
    close = False


def reason_phrase(status: int) -> str:
    """The standard reason phrase of `status` (RFC 9110 §15), or "Error" for an unknown one."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_response(
    status: int, reason: str, request_id: str, *, close: bool, retry_after: int | None = None
) -> messages.Response:
    """A response the proxy itself makes: ``<status> <phrase>: <reason>`` as plain text.

    `reason` is what the client is told; it must be a plain sentence without internal detail
    (the detail goes to the log). `close` adds ``Connection: close``; `retry_after` (seconds)
    adds Retry-After, as 503 and 429 answers carry. The response is marked as weft's own
    (``Response.local``), so that the h2 adapter answers a gRPC request with the same meaning
    as a gRPC status instead (`weft.grpc.local_reply`).
    """
    extra = [("x-request-id", request_id)] if request_id else []
    if retry_after is not None:
        extra.append(("retry-after", str(retry_after)))
    if close:
        extra.append(("connection", "close"))
    response = messages.Response.text(
        status, f"{status} {reason_phrase(status)}: {reason}\n", extra
    )
    response.local = reason
    return response


# At the end: messages imports this module's ClientError, and error_response only needs
# messages.Response when it is called.
from weft.http import messages  # noqa: E402
