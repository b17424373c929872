"""What happened to one attempt at an endpoint, as the forwarder reports it.

Health, outlier ejection and the circuit breaker all learn from real traffic, and retries decide
on the same facts, so the forwarder reports every attempt once, in one vocabulary, to a
per-destination `Observer`. The observer also answers which endpoints the balancer must skip
(`excluded`): the forwarder feeds that to `Balancer.pick(excluded=...)`. With no observer
configured nothing is reported and nothing excluded: the data path pays one ``is None`` test.

Results:

==================  ============================================================
``ok``              a response head came back with a status below 500
``status``          a response head with a 5xx status (the status is passed too)
``connect_error``   the connection could not be opened (refused, unreachable, timed out, or
                    its TLS handshake failed: the certificate refused, say)
``reset``           the connection closed or reset before or during the response head
``timeout``         no response head, or a body stall, within the configured timeout
``protocol_error``  the upstream did not speak HTTP correctly
==================  ============================================================

Failures that are not the endpoint's (a full wait queue, a worker draining, the client going
away) are not reported.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Protocol

OK = "ok"
STATUS = "status"
CONNECT_ERROR = "connect_error"
RESET = "reset"
TIMEOUT = "timeout"
PROTOCOL_ERROR = "protocol_error"

# UpstreamError.reason -> result; reasons missing here are not the endpoint's fault.
_BY_REASON = {
    "connect_error": CONNECT_ERROR,
    "connect_timeout": CONNECT_ERROR,  # Envoy's connect-failure covers refused and timed out
    "upstream_tls": CONNECT_ERROR,  # Envoy counts a TLS handshake failure as one too
    "upstream_reset": RESET,
    "upstream_header_timeout": TIMEOUT,
    "upstream_body_timeout": TIMEOUT,
    "upstream_send_timeout": TIMEOUT,
    "request_timeout": TIMEOUT,
    "per_try_timeout": TIMEOUT,
    "bad_response": PROTOCOL_ERROR,
}


def result_of(reason: str) -> str | None:
    """The result word for an UpstreamError reason, None when it is not the endpoint's."""
    return _BY_REASON.get(reason)


def result_of_status(status: int) -> str:
    return STATUS if status >= 500 else OK


class Observer(Protocol):
    """Learns from every attempt of one destination; tells the balancer what to skip.
    `weft.observer.DestinationObserver` is the one implementation, over shared memory."""

    #: the response field that marks an endpoint Degraded (lower case), or None
    degraded_header: bytes | None

    def report(
        self,
        index: int,
        result: str,
        status: int,
        latency: float,
        degraded: bool = False,
        *,
        trial: bool = False,
    ) -> None:
        """One attempt at endpoint `index` ended its head phase: `result` (see the table),
        the response status (0 without one), the seconds from send to head/failure, whether
        the response carried the degraded header, and whether the attempt was the breaker's
        half-open trial (`admit` answered -1 for it)."""

    def excluded(self) -> Container[int]:
        """Endpoints the balancer must not pick now (Unhealthy, ejected, breaker open)."""
        ...

    def admit(self, index: int) -> int:
        """After a pick: 0 go, -1 go as the breaker's half-open trial, n > 0 refused (Retry-After
        n seconds)."""
        ...

    def abandon(self, index: int) -> None:
        """A trial call ended without a report: free the trial."""

    def breaker_retry_after(self) -> int:
        """Seconds until an open breaker admits calls again; 0 when none is open."""
        ...
