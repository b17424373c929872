"""The circuit breaker of one endpoint: its states, the transition table, and the sliding
window of calls, as pure functions of shared 64-bit words.

This module owns the breaker's *decisions*: whether a call may go to the endpoint (`admit`),
what a finished call does to the breaker (`on_result`), and how calls are counted in a
sliding window that every worker writes (`record`, `window_totals`). All of it is state in the
instance's shared memory, so 8 workers trip, wait and probe as one breaker; each function takes
words and returns the word to compare-and-swap in, so the I/O around it is a CAS loop and the
logic is tested with plain integers and times. Shaped like h11's ``_state.py`` (and `weft.health`):
sentinels for states and events, one transition table.

Theory of operation:

* **States**: `CLOSED` (calls flow and are counted), `OPEN` (calls are refused with 503 and a
  Retry-After, no upstream contact), `HALF_OPEN` (one trial call decides).
* **Tripping**: in CLOSED, once the window holds at least ``minimum_calls`` calls and the
  failed share reaches ``failure_rate`` percent, the breaker opens (`TRIP`).
* **Open time**: the n-th consecutive opening lasts ``open_for * 2**(n-1)``, capped by
  ``max_open_for``; a successful trial resets n. After it, the first call that finds the time
  up moves the breaker to HALF_OPEN (`ELAPSED`).
* **One trial across all workers**: in HALF_OPEN a call must also claim the trial word, an
  owner-tagged slot (CAS 0 -> pid, see `weft.shm.slots`); everyone else is refused. The
  trial's success closes the breaker (`TRIAL_OK`), its failure reopens it with the open time
  doubled (`TRIAL_FAILED`). The claimer writes the new state *before* it releases the trial
  word, so no second trial can start in the same half-open period; a worker that dies holding
  the trial has it released by the supervisor's reclaim, and the next call is the next trial.
* **The state word**: state code in bits 0-1, the count of consecutive openings in 2-7, and in
  8-47 the milliseconds (CLOSED: of the last close, OPEN and HALF_OPEN: of the opening) on
  CLOCK_MONOTONIC, which all processes of a host share.
* **The window**: ``BUCKETS`` bucket words, each an epoch (which ``window / BUCKETS`` slice of
  time it counts, mod 2**23) with 20-bit counts of calls and failures. Recording is one CAS on
  the bucket of now; a bucket of an older epoch is restarted by the first call that lands in it.
  Only calls made while CLOSED are counted, and only buckets since the last close are summed,
  so the failures that tripped the breaker cannot trip it again at once after a good trial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from weft.sentinels import Sentinel

__all__ = [
    "ALLOW",
    "BUCKETS",
    "CLOSED",
    "ELAPSED",
    "HALF_OPEN",
    "OPEN",
    "REJECT",
    "STATES",
    "TRANSITIONS",
    "TRIAL",
    "TRIAL_FAILED",
    "TRIAL_OK",
    "TRIP",
    "Admission",
    "Breaker",
    "BreakerState",
    "admit",
    "bucket_counts",
    "bucket_epoch",
    "bucket_word",
    "on_result",
    "open_period",
    "pack",
    "record",
    "unpack",
    "window_totals",
]


class BreakerState(Sentinel):
    """A breaker state; its `code` is what the state word holds."""

    __slots__ = ()


CLOSED = BreakerState("CLOSED", 0)
OPEN = BreakerState("OPEN", 1)
HALF_OPEN = BreakerState("HALF_OPEN", 2)
STATES = (CLOSED, OPEN, HALF_OPEN)  # indexed by code

# Events
TRIP = Sentinel("TRIP")
ELAPSED = Sentinel("ELAPSED")
TRIAL_OK = Sentinel("TRIAL_OK")
TRIAL_FAILED = Sentinel("TRIAL_FAILED")

# Decisions of `admit`
ALLOW = Sentinel("ALLOW")  # send it; count its result
TRIAL = Sentinel("TRIAL")  # send it only if the trial word can be claimed; else REJECT
REJECT = Sentinel("REJECT")  # 503 breaker_open, Retry-After, no upstream contact

# (state, event) -> next state. A pair not in the table leaves the state as it is (a late
# result of a call sent before the breaker opened, say).
TRANSITIONS: dict[tuple[BreakerState, Sentinel], BreakerState] = {
    (CLOSED, TRIP): OPEN,
    (OPEN, ELAPSED): HALF_OPEN,
    (HALF_OPEN, TRIAL_OK): CLOSED,
    (HALF_OPEN, TRIAL_FAILED): OPEN,
}

_TRIPS_MAX = 63
_MS_MASK = (1 << 40) - 1


class Breaker(NamedTuple):
    """A state word, unpacked."""

    state: BreakerState
    trips: int  # consecutive openings (0 once a trial succeeded)
    since_ms: int  # when the state began (CLOSED: the last close; else the opening)


def pack(state: BreakerState, trips: int = 0, since_ms: int = 0) -> int:
    return state.code | min(trips, _TRIPS_MAX) << 2 | (since_ms & _MS_MASK) << 8


def unpack(word: int) -> Breaker:
    return Breaker(STATES[word & 3], word >> 2 & _TRIPS_MAX, word >> 8 & _MS_MASK)


def open_period(trips: int, open_for: float, max_open_for: float) -> float:
    """Seconds the `trips`-th consecutive opening lasts."""
    if trips <= 1:
        return min(open_for, max_open_for)
    return min(open_for * 2.0 ** min(trips - 1, 32), max_open_for)


class Admission(NamedTuple):
    decision: Sentinel  # ALLOW, TRIAL or REJECT
    word: int | None  # the state word to CAS in first (OPEN -> HALF_OPEN), or None
    retry_after: int  # seconds, for REJECT


def admit(word: int, now_ms: int, open_for: float, max_open_for: float) -> Admission:
    """May a call go to the endpoint now? See the module docstring for the protocol."""
    state, trips, since = unpack(word)
    if state is CLOSED:
        return Admission(ALLOW, None, 0)
    if state is OPEN:
        until = since + round(open_period(trips, open_for, max_open_for) * 1000)
        if now_ms < until:
            return Admission(REJECT, None, max(1, math.ceil((until - now_ms) / 1000)))
        # The time is up: this call moves the breaker to HALF_OPEN and bids for the trial.
        return Admission(TRIAL, pack(TRANSITIONS[(OPEN, ELAPSED)], trips, since), 0)
    # HALF_OPEN: the trial is out (or about to be claimed); its answer comes within a
    # request's time, so come back in a second.
    return Admission(TRIAL, None, 1)


def on_result(
    word: int,
    *,
    failed: bool,
    trial: bool,
    calls: int,
    failures: int,
    now_ms: int,
    failure_rate: float,
    minimum_calls: int,
) -> int | None:
    """The state word after a finished call, or None to leave it.

    `trial`: this call held the trial word. `calls` and `failures`: the window's totals with
    this call already recorded (`record`, `window_totals`; ignored for trials)."""
    state, trips, _since = unpack(word)
    if trial:
        if state is not HALF_OPEN:
            return None  # the breaker moved on without this trial (it was reclaimed)
        if failed:
            return pack(TRANSITIONS[(HALF_OPEN, TRIAL_FAILED)], trips + 1, now_ms)
        return pack(TRANSITIONS[(HALF_OPEN, TRIAL_OK)], 0, now_ms)
    if state is not CLOSED or not failed:
        return None
    if calls >= minimum_calls and failures * 100 >= failure_rate * calls:
        return pack(TRANSITIONS[(CLOSED, TRIP)], trips + 1, now_ms)
    return None


# -- the sliding window ---------------------------------------------------------------------

BUCKETS = 10
# 23, not 24: the words are signed 64-bit (weft.shm.atomics), and bit 63 must stay clear.
_EPOCH_BITS = 23
_EPOCH_MASK = (1 << _EPOCH_BITS) - 1
_COUNT_BITS = 20
_COUNT_MAX = (1 << _COUNT_BITS) - 1


def bucket_epoch(now_ms: int, window_ms: int) -> int:
    """Which slice of time (``window / BUCKETS`` long) `now_ms` falls in."""
    return now_ms // max(1, window_ms // BUCKETS)


def bucket_counts(bucket: int, epoch: int) -> tuple[int, int]:
    """A bucket word's two counts (calls, failures) if it counts `epoch`, else (0, 0)."""
    if bucket >> (2 * _COUNT_BITS) != epoch & _EPOCH_MASK:
        return 0, 0
    return bucket >> _COUNT_BITS & _COUNT_MAX, bucket & _COUNT_MAX


def bucket_word(epoch: int, first: int, second: int) -> int:
    """A bucket word of `epoch` with two counts (each saturating at 2**20 - 1)."""
    return (
        (epoch & _EPOCH_MASK) << (2 * _COUNT_BITS)
        | min(first, _COUNT_MAX) << _COUNT_BITS
        | min(second, _COUNT_MAX)
    )


def record(bucket: int, epoch: int, failed: bool) -> int:
    """The bucket word after one call in `epoch` (a bucket of another epoch starts over)."""
    # Written out rather than through bucket_counts/bucket_word: it runs on every request.
    e = epoch & _EPOCH_MASK
    if bucket >> (2 * _COUNT_BITS) != e:
        return e << (2 * _COUNT_BITS) | 1 << _COUNT_BITS | failed
    calls = bucket >> _COUNT_BITS & _COUNT_MAX
    failures = bucket & _COUNT_MAX
    if calls < _COUNT_MAX:
        calls += 1
    if failed and failures < _COUNT_MAX:
        failures += 1
    return e << (2 * _COUNT_BITS) | calls << _COUNT_BITS | failures


def window_totals(
    buckets: Sequence[int], now_ms: int, window_ms: int, since_ms: int
) -> tuple[int, int]:
    """(calls, failures) of the buckets that belong to the last `window_ms` and began no
    earlier than the bucket of `since_ms` (the last close)."""
    now_e = bucket_epoch(now_ms, window_ms)
    oldest = max(now_e - len(buckets) + 1, bucket_epoch(since_ms, window_ms))
    calls = failures = 0
    for b in buckets:
        age = (now_e - (b >> (2 * _COUNT_BITS))) & _EPOCH_MASK
        if now_e - age >= oldest and age < len(buckets):
            calls += b >> _COUNT_BITS & _COUNT_MAX
            failures += b & _COUNT_MAX
    return calls, failures
