"""Retry decisions: which failures are retried, which requests can be replayed, how long to
back off, and the retry budget shared by all workers, as pure functions.

This module owns the *policy* of ``[routes.retry]`` and none of its I/O: the forwarder asks
`RetryOn.matches` after a failed attempt, `replayable` before it keeps a body for replay,
`backoff` for the pause, and `budget_allows` whether the route may spend one more retry. The
budget's counts live in shared memory as the breaker's window does (epoch-tagged bucket words,
one CAS per request, see `weft.adaptive`), so that an outage does not multiply the load by the
number of workers, each thinking it retries only a fifth.

Theory of operation:

* **Conditions** (the ``on`` list): ``connect_error``, ``reset``, ``timeout`` and
  ``protocol_error`` name the forwarder's outcomes (`weft.outcome`); ``5xx`` is any status from
  500; ``gateway_error`` is 502, 503, 504 and every one of those outcomes (Envoy's
  ``gateway-error`` plus ``connect-failure``); a number is that status. Anything else is a
  config error, with the list of what is known.
* **Replay**: a request is sent again only if weft still has all of it: no body, or a body that
  was read whole into memory within ``buffer_body``. Methods are no condition of their own
  here: a POST whose body weft holds is replayed as the issue asks, which Envoy's retry policy
  allows too; it is the route's owner who lists which failures are safe to retry.
* **Backoff** is full jitter (AWS's "Exponential Backoff and Jitter"): uniform in
  ``[0, min(backoff_max, backoff_base * 2**(n-1))]`` before the n-th retry. A 503 with a
  ``Retry-After`` of a few seconds is honoured when it fits under ``backoff_max``; a longer one
  ends the retries (the upstream said when to come back, and it is not now).
* **Budget**: retries may be at most ``budget_percent`` of the route's requests in the window,
  but ``budget_min_per_second`` per second of the window are always allowed, so a quiet route
  still gets its retries (Envoy's retry budget with ``min_retry_concurrency``, and Finagle's
  RetryBudget, in shape). The window is `BUDGET_WINDOW` (Finagle's RetryBudget default ttl),
  in `weft.adaptive.BUCKETS` bucket words laid out as the breaker's: epoch, then 20-bit counts
  of requests and retries (`budget_record`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import NamedTuple

from weft.adaptive import bucket_counts, bucket_word
from weft.outcome import CONNECT_ERROR, PROTOCOL_ERROR, RESET, STATUS, TIMEOUT

__all__ = [
    "BUDGET_WINDOW",
    "CONDITIONS",
    "RetryOn",
    "backoff",
    "budget_allows",
    "budget_record",
    "reason",
    "replayable",
    "retry_after",
]

BUDGET_WINDOW = 10.0  # seconds the retry budget looks back (Finagle's RetryBudget ttl)

# The named conditions of the `on` list (a status number is the other kind).
CONDITIONS = ("connect_error", "reset", "timeout", "protocol_error", "5xx", "gateway_error")
_LOCAL = {CONNECT_ERROR, RESET, TIMEOUT, PROTOCOL_ERROR}
_GATEWAY_STATUSES = frozenset({502, 503, 504})


class RetryOn(NamedTuple):
    """A parsed ``on`` list."""

    results: frozenset[str]  # outcome words retried (connect_error, reset, ...)
    statuses: frozenset[int]  # statuses retried
    any_5xx: bool

    @classmethod
    def parse(cls, items: Iterable[str | int]) -> RetryOn:
        """Raises ValueError naming the first item that is not a condition."""
        results: set[str] = set()
        statuses: set[int] = set()
        any_5xx = False
        for item in items:
            text = str(item).strip().lower()
            if text.isdigit() and 100 <= int(text) <= 599:
                statuses.add(int(text))
            elif text == "5xx":
                any_5xx = True
            elif text == "gateway_error":
                statuses |= _GATEWAY_STATUSES
                results |= _LOCAL
            elif text in CONDITIONS:
                results.add(text)
            else:
                raise ValueError(
                    f"unknown retry condition {item!r}: use {', '.join(CONDITIONS)}"
                    " or a status code"
                )
        return cls(frozenset(results), frozenset(statuses), any_5xx)

    def matches(self, result: str, status: int) -> bool:
        """Whether an attempt that ended with `result` (and `status`, 0 without one) is
        retried."""
        if result == STATUS:
            return status in self.statuses or (self.any_5xx and status >= 500)
        if status and status in self.statuses:
            return True  # an ok outcome with a listed status below 500 (a 429, say)
        return result in self.results


def reason(result: str, status: int) -> str:
    """The label a retry is counted under: the status for answers, else the result word."""
    return str(status) if status else result


def replayable(has_body: bool, buffered: int | None, buffer_body: int) -> bool:
    """Whether weft can send the request again: it has no body, or its whole body
    (`buffered` bytes, None while not read whole) is held in memory within `buffer_body`."""
    if not has_body:
        return True
    return buffered is not None and buffered <= buffer_body


def backoff(retry: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before the `retry`-th retry (1 for the first), full jitter."""
    ceiling = min(cap, base * 2.0 ** min(max(retry - 1, 0), 32))
    return (rng or random).uniform(0.0, ceiling)


def retry_after(value: bytes | None, cap: float) -> float | None:
    """How long a 503's Retry-After asks to wait, if weft should wait that long: the seconds
    when they are at most `cap`; None when absent or an HTTP-date (use the backoff);
    raises LookupError when it asks for more than `cap` (do not retry)."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():
        return None  # an HTTP-date: too rare upstream to be worth a clock comparison
    seconds = float(int(text))
    if seconds > cap:
        raise LookupError(f"Retry-After {seconds:g}s is longer than backoff_max {cap:g}s")
    return seconds


def budget_allows(
    requests: int, retries: int, *, percent: float, min_per_second: float, window: float
) -> bool:
    """Whether one more retry fits the budget, given the route's `requests` and `retries` in
    the last `window` seconds (all workers together)."""
    allowed = max(requests * percent / 100.0, min_per_second * window)
    return retries + 1 <= allowed


def budget_record(bucket: int, epoch: int, requests: int, retries: int) -> int:
    """The budget bucket word after adding `requests` and `retries` in `epoch` (a bucket of
    another epoch starts over); its counts are read with `weft.adaptive.window_totals`."""
    old_requests, old_retries = bucket_counts(bucket, epoch)
    return bucket_word(epoch, old_requests + requests, old_retries + retries)
