"""Retry decisions (`weft.retry`): conditions, replay, full-jitter backoff, Retry-After and the
budget, without I/O and with a seeded random source."""

from __future__ import annotations

import random

import pytest

from weft.outcome import CONNECT_ERROR, OK, PROTOCOL_ERROR, RESET, STATUS, TIMEOUT
from weft.retry import RetryOn, backoff, budget_allows, replayable, retry_after

DEFAULT = RetryOn.parse(["connect_error", "reset", "timeout", "503"])


@pytest.mark.parametrize(
    ("on", "result", "status", "retried"),
    [
        (DEFAULT, CONNECT_ERROR, 0, True),
        (DEFAULT, RESET, 0, True),
        (DEFAULT, TIMEOUT, 0, True),
        (DEFAULT, PROTOCOL_ERROR, 0, False),
        (DEFAULT, STATUS, 503, True),
        (DEFAULT, STATUS, 502, False),
        (DEFAULT, OK, 200, False),
        (RetryOn.parse(["5xx"]), STATUS, 500, True),
        (RetryOn.parse(["5xx"]), RESET, 0, False),
        (RetryOn.parse(["gateway_error"]), STATUS, 504, True),
        (RetryOn.parse(["gateway_error"]), STATUS, 500, False),
        (RetryOn.parse(["gateway_error"]), PROTOCOL_ERROR, 0, True),
        (RetryOn.parse(["429"]), OK, 429, True),
        (RetryOn.parse([" Reset "]), RESET, 0, True),
    ],
)
def test_only_the_configured_conditions_are_retried(on, result, status, retried):
    assert on.matches(result, status) is retried


@pytest.mark.parametrize("bad", ["timeouts", "6xx", "99", "600", ""])
def test_an_unknown_condition_is_refused_with_the_known_ones(bad):
    with pytest.raises(ValueError, match="connect_error, reset, timeout"):
        RetryOn.parse(["reset", bad])


@pytest.mark.parametrize(
    ("has_body", "buffered", "ok"),
    [(False, None, True), (True, 10 * 1024, True), (True, 64 * 1024, True),
     (True, 64 * 1024 + 1, False), (True, None, False)],
)
def test_only_requests_weft_holds_whole_are_replayed(has_body, buffered, ok):
    assert replayable(has_body, buffered, 64 * 1024) is ok


def test_backoff_is_full_jitter_under_a_doubling_cap():
    rng = random.Random(7)
    for retry, ceiling in [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (40, 0.25)]:
        waits = [backoff(retry, 0.025, 0.25, rng) for _ in range(2000)]
        assert all(0.0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling * 0.95 and min(waits) < ceiling * 0.05  # the whole range


def test_retry_after_is_honoured_only_under_backoff_max():
    assert retry_after(None, 0.25) is None
    assert retry_after(b"Wed, 21 Oct 2026 07:28:00 GMT", 0.25) is None
    assert retry_after(b"0", 0.25) == 0.0
    assert retry_after(b" 2 ", 5.0) == 2.0
    with pytest.raises(LookupError):
        retry_after(b"1", 0.25)


@pytest.mark.parametrize(
    ("requests", "retries", "allowed"),
    [
        (1000, 199, True),  # the 200th retry of 1000 requests: 20 %
        (1000, 200, False),
        (10, 0, True),  # a quiet route: 3/s over 10 s = 30 retries always allowed
        (10, 29, True),
        (10, 30, False),
    ],
)
def test_the_budget_is_a_share_with_a_floor(requests, retries, allowed):
    assert budget_allows(requests, retries, percent=20, min_per_second=3, window=10.0) is allowed
