"""Endpoint health: the three states, the transition table, and the prober lease, as pure
functions of shared 64-bit words.

This module owns the *decisions* of active health checking and nothing of its I/O: what a
probe's result means (`classify_probe`), how a result moves an endpoint between Healthy,
Degraded and Unhealthy (`step`, driven by `TRANSITIONS`), which endpoints balancing may use
(`excluded`), and who runs an endpoint's probes (`lease`). Each state lives in one word of the
instance's shared memory, so every worker sees the same health and the prober writes it with
one compare-and-swap; the functions here take a word and return the next one, so the CAS loop
around them is three lines and the tables are tested with plain integers and a fake clock.
It is shaped like h11's ``_state.py``: sentinels for the states and events, one table for the
transitions, no behaviour hidden in the I/O.

Theory of operation:

* **States** `HEALTHY`, `DEGRADED` (answers, but slowly or says so with the degraded header,
  Envoy's ``x-envoy-degraded``), `UNHEALTHY`. A new endpoint starts Healthy, so a fresh weft
  serves at once instead of refusing traffic until the first probes pass (Envoy's default;
  its ``ignore_new_hosts_until_first_hc`` is the other choice).
* **Events** `PASS`, `DEGRADED_PASS` and `FAIL` come from probes; `TRAFFIC_DEGRADED` and
  `TRAFFIC_CLEAN` from real responses (with and without the degraded header). Real traffic
  only ever moves an endpoint between Healthy and Degraded; `TRAFFIC_CLEAN` is sent only for
  destinations without active probes, where nothing else could end a Degraded spell.
* **Thresholds**: leaving Healthy or Degraded for Unhealthy takes ``unhealthy_threshold``
  consecutive failures; leaving Unhealthy takes ``healthy_threshold`` consecutive passes. A
  result of the other kind resets the run. Moving between Healthy and Degraded is immediate.
* **The word**: state code in bits 0-1, the run of passes in 8-15, of failures in 16-23
  (saturating at 255; config caps thresholds below that), and in bits 32-62 a count of state
  changes, so a worker that remembers the last word it saw can tell that a transition happened
  (to close an endpoint's idle pooled connections when it turns Unhealthy) with one load.
* **Lease**: the owner's pid and an expiry (milliseconds of CLOCK_MONOTONIC, which all
  processes of a host share; trio's clock is per process) in one word. The owner renews it
  every interval; anyone may take a lease that expired or is free. A lease lasts two
  intervals, so a dead owner's endpoint is probed again within two intervals even before the
  supervisor's reclaim frees the word.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from weft.sentinels import Sentinel

__all__ = [
    "DEGRADED",
    "DEGRADED_PASS",
    "FAIL",
    "HEALTHY",
    "PASS",
    "STATES",
    "TRAFFIC_CLEAN",
    "TRAFFIC_DEGRADED",
    "TRANSITIONS",
    "UNHEALTHY",
    "Event",
    "Health",
    "State",
    "classify_probe",
    "excluded",
    "lease",
    "lease_owner",
    "pack",
    "step",
    "unpack",
]


class State(Sentinel):
    """A health state; its `code` is what a shared word holds."""

    __slots__ = ()


class Event(Sentinel):
    """Something that happened to an endpoint: a probe's result or a real response's sign."""

    __slots__ = ()


HEALTHY = State("HEALTHY", 0)
DEGRADED = State("DEGRADED", 1)
UNHEALTHY = State("UNHEALTHY", 2)
STATES = (HEALTHY, DEGRADED, UNHEALTHY)  # indexed by code

PASS = Event("PASS")
DEGRADED_PASS = Event("DEGRADED_PASS")
FAIL = Event("FAIL")
TRAFFIC_DEGRADED = Event("TRAFFIC_DEGRADED")
TRAFFIC_CLEAN = Event("TRAFFIC_CLEAN")

_PASSES = "passes"
_FAILS = "fails"

# (state, event) -> (the run the event extends, or None; the state it leads to). With a run,
# the state changes only once that run reaches its threshold (passes: healthy_threshold,
# fails: unhealthy_threshold) and the other run is reset; without one, the state changes at
# once and both runs are reset.
TRANSITIONS: dict[tuple[State, Event], tuple[str | None, State]] = {
    (HEALTHY, PASS): (None, HEALTHY),
    (HEALTHY, DEGRADED_PASS): (None, DEGRADED),
    (HEALTHY, FAIL): (_FAILS, UNHEALTHY),
    (HEALTHY, TRAFFIC_DEGRADED): (None, DEGRADED),
    (HEALTHY, TRAFFIC_CLEAN): (None, HEALTHY),
    (DEGRADED, PASS): (None, HEALTHY),
    (DEGRADED, DEGRADED_PASS): (None, DEGRADED),
    (DEGRADED, FAIL): (_FAILS, UNHEALTHY),
    (DEGRADED, TRAFFIC_DEGRADED): (None, DEGRADED),
    (DEGRADED, TRAFFIC_CLEAN): (None, HEALTHY),
    (UNHEALTHY, PASS): (_PASSES, HEALTHY),
    (UNHEALTHY, DEGRADED_PASS): (_PASSES, DEGRADED),
    (UNHEALTHY, FAIL): (None, UNHEALTHY),
    # Real traffic does not revive an endpoint: only probes do (it gets none anyway, unless
    # its destination is in panic, and a panic answer says nothing of its health).
    (UNHEALTHY, TRAFFIC_DEGRADED): (None, UNHEALTHY),
    (UNHEALTHY, TRAFFIC_CLEAN): (None, UNHEALTHY),
}

_RUN_MAX = 255


class Health(NamedTuple):
    """A health word, unpacked."""

    state: State
    passes: int
    fails: int
    changes: int  # state changes so far (mod 2**31)


def pack(state: State, passes: int = 0, fails: int = 0, changes: int = 0) -> int:
    return (
        state.code
        | min(passes, _RUN_MAX) << 8
        | min(fails, _RUN_MAX) << 16
        | (changes & 0x7FFFFFFF) << 32  # 31 bits: the words are signed 64-bit
    )


def unpack(word: int) -> Health:
    return Health(STATES[word & 3], word >> 8 & 0xFF, word >> 16 & 0xFF, word >> 32)


def step(word: int, event: Event, healthy_threshold: int, unhealthy_threshold: int) -> int:
    """The health word after `event` (see `TRANSITIONS`). A word equal to `word` means
    nothing to write."""
    state, passes, fails, changes = unpack(word)
    run, target = TRANSITIONS[(state, event)]
    if run is None:
        passes = fails = 0
    elif run is _PASSES:
        passes, fails = passes + 1, 0
        if passes < healthy_threshold:
            target = state
    else:
        passes, fails = 0, fails + 1
        if fails < unhealthy_threshold:
            target = state
    if target is not state:
        passes = fails = 0
        changes += 1
    return pack(target, passes, fails, changes)


def classify_probe(
    status: int | None,
    latency: float,
    *,
    expected: Sequence[tuple[int, int]],
    degraded_latency: float,
    degraded_header: bool,
) -> Event:
    """A probe's event: FAIL without an answer (`status` None: connect error, reset, timeout)
    or with a status outside every `expected` (low, high) range; DEGRADED_PASS when it passed
    but carried the degraded header or took longer than `degraded_latency` (0: off); PASS."""
    if status is None or not any(lo <= status <= hi for lo, hi in expected):
        return FAIL
    if degraded_header or (degraded_latency > 0 and latency > degraded_latency):
        return DEGRADED_PASS
    return PASS


def excluded(
    states: Sequence[State], ejected: Sequence[bool], panic_threshold: float
) -> frozenset[int]:
    """The endpoints balancing must skip, by index.

    Unhealthy and ejected endpoints are skipped; of the rest, Degraded ones are used only when
    no Healthy one is left. When the usable share of the destination (Healthy or Degraded, not
    ejected) falls below `panic_threshold` percent, the destination is in panic and nothing is
    skipped: spreading load over every endpoint beats piling it on the few left (Envoy's
    panic mode). A `panic_threshold` of 0 turns panic off.
    """
    n = len(states)
    if n == 0:
        return frozenset()
    usable = [i for i in range(n) if states[i] is not UNHEALTHY and not ejected[i]]
    if panic_threshold > 0 and len(usable) * 100 < panic_threshold * n:
        return frozenset()
    healthy = [i for i in usable if states[i] is HEALTHY]
    keep = set(healthy or usable)
    return frozenset(i for i in range(n) if i not in keep)


# -- the prober lease -----------------------------------------------------------------------

_EXPIRY_BITS = 40  # milliseconds of CLOCK_MONOTONIC: 34 years of uptime
_EXPIRY_MASK = (1 << _EXPIRY_BITS) - 1
_PID_MAX = (1 << (64 - _EXPIRY_BITS)) - 1  # 16.7 M, above Linux's pid_max limit (2**22)


def lease_owner(word: int) -> int:
    """The pid holding the lease word (0: free). The supervisor's reclaim frees a dead
    owner's words (CAS word -> 0)."""
    return word >> _EXPIRY_BITS


def lease(word: int, pid: int, now_ms: int, ttl_ms: int) -> int | None:
    """The word to CAS in for `pid` to hold (take or renew) the lease until ``now + ttl``;
    None when another live holder has it. A free or expired lease can be taken by anyone."""
    if not 0 < pid <= _PID_MAX:
        raise ValueError(f"pid {pid} out of range")
    owner = word >> _EXPIRY_BITS
    expiry = word & _EXPIRY_MASK
    if owner not in (0, pid) and expiry > now_ms:
        return None
    return pid << _EXPIRY_BITS | (now_ms + ttl_ms) & _EXPIRY_MASK
