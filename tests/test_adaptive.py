"""The circuit breaker's transition table, admission, results and sliding window
(`weft.adaptive`), with time as plain milliseconds; a small in-memory stand-in for the shared
words plays the CAS protocol of several workers."""

from __future__ import annotations

import pytest

from weft.adaptive import (
    ALLOW,
    BUCKETS,
    CLOSED,
    HALF_OPEN,
    OPEN,
    REJECT,
    TRIAL,
    admit,
    bucket_epoch,
    on_result,
    open_period,
    pack,
    record,
    unpack,
    window_totals,
)

WINDOW_MS = 10_000
OPEN_FOR, MAX_OPEN_FOR = 5.0, 60.0
RATE, MINIMUM = 50, 20


class Shared:
    """The words one endpoint's breaker has in shared memory, and the protocol each worker
    follows around the pure functions (CAS stands in as compare-then-store: the test is
    single-threaded, interleavings are written out)."""

    def __init__(self) -> None:
        self.state = pack(CLOSED)
        self.buckets = [0] * BUCKETS
        self.trial = 0  # the trial word: claimer's pid or 0

    def cas_state(self, expected: int, new: int) -> bool:
        if self.state != expected:
            return False
        self.state = new
        return True

    def admit(self, pid: int, now: int) -> tuple[object, int]:
        """(ALLOW | TRIAL | REJECT, retry_after): TRIAL means this pid holds the trial."""
        while True:
            word = self.state
            a = admit(word, now, OPEN_FOR, MAX_OPEN_FOR)
            if a.word is not None and not self.cas_state(word, a.word):
                continue  # someone else moved it: decide again
            if a.decision is TRIAL:
                if self.trial == 0:
                    self.trial = pid
                    return TRIAL, 0
                return REJECT, a.retry_after
            return a.decision, a.retry_after

    def finish(self, pid: int, now: int, failed: bool, trial: bool) -> None:
        word = self.state
        calls = failures = 0
        if not trial and unpack(word).state is CLOSED:
            e = bucket_epoch(now, WINDOW_MS)
            i = e % BUCKETS
            self.buckets[i] = record(self.buckets[i], e, failed)
            calls, failures = window_totals(self.buckets, now, WINDOW_MS, unpack(word).since_ms)
        new = on_result(word, failed=failed, trial=trial, calls=calls, failures=failures,
                        now_ms=now, failure_rate=RATE, minimum_calls=MINIMUM)
        if new is not None:
            self.cas_state(word, new)
        if trial and self.trial == pid:
            self.trial = 0  # released only after the state was written


def trip(b: Shared, now: int) -> None:
    for i in range(MINIMUM):
        assert b.admit(1, now + i)[0] is ALLOW
        b.finish(1, now + i, failed=True, trial=False)
    assert unpack(b.state).state is OPEN


def test_no_trip_below_the_minimum_calls_or_the_rate():
    b = Shared()
    for i in range(MINIMUM - 1):
        b.finish(1, 1_000 + i, failed=True, trial=False)
    assert unpack(b.state).state is CLOSED  # 19 failures of 19 calls: too few calls
    b2 = Shared()
    for i in range(40):
        b2.finish(1, 1_000 + i, failed=i % 3 == 0, trial=False)  # 14 of 40 failed: 35 %
    assert unpack(b2.state).state is CLOSED


def test_trips_when_the_rate_is_reached_and_refuses_with_retry_after():
    b = Shared()
    for i in range(MINIMUM - 1):
        b.finish(1, 1_000 + i, failed=i % 2 == 1, trial=False)  # 9 failed of 19
    assert unpack(b.state).state is CLOSED
    b.finish(1, 1_019, failed=True, trial=False)  # 10 of 20: exactly failure_rate
    assert unpack(b.state) == (OPEN, 1, 1_019)
    decision, retry_after = b.admit(1, 2_000)
    assert decision is REJECT
    assert retry_after == 5  # 4.019 s left, rounded up


def test_after_open_for_exactly_one_trial_across_workers():
    b = Shared()
    trip(b, 1_000)
    opened = unpack(b.state).since_ms
    assert b.admit(1, opened + 4_999)[0] is REJECT
    # time is up: the first worker's call becomes the trial, every other call is refused
    assert b.admit(11, opened + 5_000) == (TRIAL, 0)
    assert unpack(b.state).state is HALF_OPEN
    for pid in (12, 13, 11):
        assert b.admit(pid, opened + 5_100) == (REJECT, 1)
    # the trial succeeds: closed, and the old failures do not trip it again
    b.finish(11, opened + 5_200, failed=False, trial=True)
    assert unpack(b.state) == (CLOSED, 0, opened + 5_200)
    assert b.trial == 0
    assert b.admit(12, opened + 5_300)[0] is ALLOW
    b.finish(12, opened + 5_300, failed=True, trial=False)
    assert unpack(b.state).state is CLOSED


def test_a_failed_trial_reopens_with_the_open_time_doubled():
    b = Shared()
    trip(b, 1_000)
    opened = unpack(b.state).since_ms
    assert b.admit(11, opened + 5_000)[0] is TRIAL
    b.finish(11, opened + 5_050, failed=True, trial=True)
    state, trips, since = unpack(b.state)
    assert (state, trips, since) == (OPEN, 2, opened + 5_050)
    assert b.admit(12, since + 9_999)[0] is REJECT  # 10 s now
    assert b.admit(12, since + 10_000)[0] is TRIAL


def test_a_trial_whose_claimer_died_is_taken_by_the_next_call():
    b = Shared()
    trip(b, 1_000)
    opened = unpack(b.state).since_ms
    assert b.admit(11, opened + 5_000)[0] is TRIAL
    assert b.admit(12, opened + 5_100)[0] is REJECT
    b.trial = 0  # worker 11 died; the supervisor's reclaim released its slots
    assert b.admit(12, opened + 5_200)[0] is TRIAL


def test_a_late_result_of_an_old_trial_changes_nothing():
    word = pack(OPEN, 2, 1_000)
    assert on_result(word, failed=False, trial=True, calls=0, failures=0, now_ms=2_000,
                     failure_rate=RATE, minimum_calls=MINIMUM) is None
    assert on_result(word, failed=True, trial=False, calls=99, failures=99, now_ms=2_000,
                     failure_rate=RATE, minimum_calls=MINIMUM) is None


@pytest.mark.parametrize(("trips", "seconds"),
                         [(0, 5.0), (1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0), (5, 60.0),
                          (63, 60.0)])
def test_open_periods_double_up_to_max_open_for(trips, seconds):
    assert open_period(trips, OPEN_FOR, MAX_OPEN_FOR) == seconds


def test_the_window_forgets_calls_older_than_the_window():
    buckets = [0] * BUCKETS
    for t in range(0, 10_000, 100):  # 100 calls over 10 s, one in ten failed
        e = bucket_epoch(t, WINDOW_MS)
        buckets[e % BUCKETS] = record(buckets[e % BUCKETS], e, failed=t % 1_000 == 0)
    assert window_totals(buckets, 9_999, WINDOW_MS, 0) == (100, 10)
    assert window_totals(buckets, 14_999, WINDOW_MS, 0) == (50, 5)  # 5 buckets aged out
    assert window_totals(buckets, 30_000, WINDOW_MS, 0) == (0, 0)
    # and nothing recorded before the last close counts
    assert window_totals(buckets, 9_999, WINDOW_MS, 7_000) == (30, 3)


def test_a_bucket_of_an_older_epoch_starts_over_and_counts_saturate():
    b = record(0, 5, failed=True)
    b = record(b, 5, failed=False)
    assert window_totals([b], 5 * 1_000, WINDOW_MS, 0) == (2, 1)
    b = record(b, 15, failed=False)  # the same slot, ten slices later
    assert window_totals([b], 15 * 1_000, WINDOW_MS, 0) == (1, 0)
    big = (15 << 40) | ((1 << 20) - 1) << 20 | ((1 << 20) - 1)
    assert window_totals([record(big, 15, True)], 15 * 1_000, WINDOW_MS, 0) == (
        (1 << 20) - 1, (1 << 20) - 1)
