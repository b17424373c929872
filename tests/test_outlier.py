"""Passive outlier detection (`weft.outlier`): runs, ejection with growing durations, the
max_ejection_percent bound and slow start, with time as plain milliseconds."""

from __future__ import annotations

import pytest

from weft.outcome import CONNECT_ERROR, OK, PROTOCOL_ERROR, RESET, STATUS, TIMEOUT
from weft.outlier import (
    SLOW_START_FLOOR,
    can_eject,
    eject,
    ejected_count,
    is_ejected,
    observe,
    pack,
    slow_start,
    unpack,
)

LIMITS = {"consecutive_5xx": 5, "consecutive_gateway": 3}
BASE, MAX = 30.0, 300.0


def feed(outcomes, word=0):
    """Apply (result, status) pairs; return the word and whether any made a run due."""
    due = False
    for result, status in outcomes:
        word, d = observe(word, result, status, **LIMITS)
        due = due or d
    return word, due


def test_three_gateway_errors_in_a_row_are_due():
    word, due = feed([(STATUS, 503), (CONNECT_ERROR, 0)])
    assert not due
    word, due = feed([(TIMEOUT, 0)], word)
    assert due
    assert unpack(word)[:2] == (3, 3)


def test_a_500_ends_the_gateway_run_but_not_the_5xx_run():
    word, due = feed([(STATUS, 502), (STATUS, 502), (STATUS, 500), (STATUS, 503),
                      (STATUS, 500)])
    assert due  # five 5xx in a row
    assert unpack(word)[:2] == (5, 0)


@pytest.mark.parametrize("ok", [(OK, 200), (STATUS, 404), (STATUS, 499)])
def test_any_answer_below_500_ends_both_runs(ok):
    word, _ = feed([(STATUS, 502), (RESET, 0), ok])
    assert unpack(word)[:2] == (0, 0)


def test_local_failures_count_as_both():
    for result in (CONNECT_ERROR, RESET, TIMEOUT, PROTOCOL_ERROR):
        word, _ = feed([(result, 0)])
        assert unpack(word)[:2] == (1, 1)


def test_a_limit_of_zero_turns_that_run_off():
    word = 0
    for _ in range(10):
        word, due = observe(word, STATUS, 503, consecutive_5xx=0, consecutive_gateway=0)
        assert not due


def test_ejections_grow_by_base_up_to_max_and_start_over_after_a_quiet_max():
    word = eject(0, 1_000, base_ejection=BASE, max_ejection=MAX)
    assert unpack(word) == (0, 0, 1, 31_000)
    assert is_ejected(word, 30_999) and not is_ejected(word, 31_000)
    word = eject(word, 40_000, base_ejection=BASE, max_ejection=MAX)
    assert unpack(word).until_ms == 40_000 + 60_000  # the second lasts 2 x base
    for _ in range(20):
        start = unpack(word).until_ms + 1
        word = eject(word, start, base_ejection=BASE, max_ejection=MAX)
    n, until = unpack(word).ejections, unpack(word).until_ms
    assert n == 22
    assert until == start + 300_000  # 22 x 30 s, capped by max_ejection
    # served for max_ejection without an ejection: the next one is the first again
    word = eject(word, until + 300_000, base_ejection=BASE, max_ejection=MAX)
    assert unpack(word).ejections == 1
    assert unpack(word).until_ms == until + 300_000 + 30_000


@pytest.mark.parametrize(
    ("ejected_now", "endpoints", "percent", "allowed"),
    [
        (0, 2, 50, True),  # one of two may go ...
        (1, 2, 50, False),  # ... the other always stays (issue 9: Envoy's bug is a test)
        (0, 2, 40, False),  # 40 % of 2 is less than one endpoint: none may go
        (0, 1, 50, False),
        (0, 1, 100, True),
        (2, 10, 30, True),
        (3, 10, 30, False),
    ],
)
def test_max_ejection_percent_is_a_bound(ejected_now, endpoints, percent, allowed):
    assert can_eject(ejected_now, endpoints, percent) is allowed


def test_ejected_count_reads_the_destination_s_words():
    words = [eject(0, 0, base_ejection=BASE, max_ejection=MAX), pack(), pack(until_ms=5)]
    assert ejected_count(words, 10) == 1
    assert ejected_count(words, 30_000) == 0


def test_slow_start_ramps_from_the_end_of_the_ejection():
    word = eject(0, 0, base_ejection=BASE, max_ejection=MAX)  # back at 30 s
    assert slow_start(10, word, 29_000, window=20.0) == 10  # still ejected: no traffic anyway
    assert slow_start(10, word, 30_000, window=20.0) == pytest.approx(10 * SLOW_START_FLOOR)
    assert slow_start(10, word, 40_000, window=20.0) == pytest.approx(5)
    assert slow_start(10, word, 50_000, window=20.0) == 10
    assert slow_start(10, word, 31_000, window=0.0) == 10  # off
    assert slow_start(10, pack(), 31_000, window=20.0) == 10  # never ejected
