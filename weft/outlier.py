"""Passive outlier detection: ejecting an endpoint on what real traffic says of it, as pure
functions of one shared 64-bit word per endpoint.

This module owns the decisions of ``[destinations.<name>.outlier]``: how each attempt's outcome
(`weft.outcome`) extends or ends an endpoint's runs of failures (`observe`), when a run ejects
it and for how long (`eject`), whether the destination may lose one more endpoint
(``max_ejection_percent``), and how a returning endpoint's weight ramps up (`slow_start`). The
word lives in shared memory, so every worker's traffic counts towards one run and an ejection
is seen by all at once; the functions take a word and return the next one for a CAS.

Theory of operation:

* **Runs**: ``consecutive_5xx`` counts 5xx answers *and* failures weft answers as 502/504
  itself (connect errors, resets, timeouts, protocol errors), as Envoy does when it does not
  split local-origin errors; ``consecutive_gateway_errors`` counts 502/503/504 and those same
  failures. Any other answer ends both runs; a 500 ends only the gateway run.
* **Ejection**: a run that reaches its limit ejects the endpoint, if the destination can spare
  it: after the ejection at most ``max_ejection_percent`` of its endpoints may be ejected,
  rounded down. With 2 endpoints and 50 %, one may go and the other always stays; with 40 %,
  none may (Envoy ejects one host whatever the percentage; here the percentage is a bound).
  A run that may not eject is kept, so the endpoint goes as soon as another one returns.
* **Duration**: the n-th ejection lasts ``n * base_ejection``, capped by ``max_ejection``. n
  goes back to 0 once the endpoint has served for ``max_ejection`` without being ejected
  again, so an old incident does not lengthen a new one for ever.
* **The word**: the 5xx run in bits 0-7, the gateway run in 8-15, n in 16-23, and in 24-62
  the millisecond (CLOCK_MONOTONIC) the current or last ejection ends, 0 if there was none.
  An endpoint is ejected while now is before that time; from then on it is back, and slow
  start counts from that same time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from weft.outcome import CONNECT_ERROR, OK, PROTOCOL_ERROR, RESET, STATUS, TIMEOUT

__all__ = [
    "SLOW_START_FLOOR",
    "Outlier",
    "can_eject",
    "eject",
    "ejected_count",
    "is_ejected",
    "observe",
    "pack",
    "slow_start",
    "unpack",
]

_RUN_MAX = 255
_MS_MASK = (1 << 39) - 1  # bit 63 stays clear: the words are signed 64-bit
_GATEWAY_STATUSES = (502, 503, 504)
_LOCAL_FAILURES = (CONNECT_ERROR, RESET, TIMEOUT, PROTOCOL_ERROR)
# A returning endpoint's weight starts at this share of its weight (Envoy's
# slow_start_config.min_weight_percent default): at 0 it would get no traffic to ramp on.
SLOW_START_FLOOR = 0.1


class Outlier(NamedTuple):
    """An outlier word, unpacked."""

    run_5xx: int
    run_gateway: int
    ejections: int
    until_ms: int  # the end of the current or last ejection, 0 if none


def pack(run_5xx: int = 0, run_gateway: int = 0, ejections: int = 0, until_ms: int = 0) -> int:
    return (
        min(run_5xx, _RUN_MAX)
        | min(run_gateway, _RUN_MAX) << 8
        | min(ejections, _RUN_MAX) << 16
        | (until_ms & _MS_MASK) << 24
    )


def unpack(word: int) -> Outlier:
    return Outlier(word & 0xFF, word >> 8 & 0xFF, word >> 16 & 0xFF, word >> 24 & _MS_MASK)


def is_ejected(word: int, now_ms: int) -> bool:
    return now_ms < word >> 24 & _MS_MASK


def observe(
    word: int, result: str, status: int, *, consecutive_5xx: int, consecutive_gateway: int
) -> tuple[int, bool]:
    """(the word after one attempt's outcome, whether a run reached its limit). `result` and
    `status` are what the forwarder reports (`weft.outcome`). A run's limit of 0 turns it off.
    An ejection starts both runs over (`eject`)."""
    r5, rg, n, until = unpack(word)
    if result == OK or (result == STATUS and status < 500):
        r5 = rg = 0
    elif result == STATUS:
        r5 += 1
        rg = rg + 1 if status in _GATEWAY_STATUSES else 0
    elif result in _LOCAL_FAILURES:
        r5 += 1
        rg += 1
    else:
        raise ValueError(f"unknown outcome {result!r}")
    due = (consecutive_5xx > 0 and r5 >= consecutive_5xx) or (
        consecutive_gateway > 0 and rg >= consecutive_gateway
    )
    return pack(r5, rg, n, until), due


def can_eject(ejected_now: int, endpoints: int, max_ejection_percent: float) -> bool:
    """Whether one more of `endpoints` may be ejected while `ejected_now` already are."""
    return (ejected_now + 1) * 100 <= max_ejection_percent * endpoints


def eject(word: int, now_ms: int, *, base_ejection: float, max_ejection: float) -> int:
    """The word of an endpoint ejected now (its runs start over)."""
    _r5, _rg, n, until = unpack(word)
    max_ms = round(max_ejection * 1000)
    if until and now_ms - until >= max_ms:
        n = 0  # it served for max_ejection since its last ejection: start over
    n += 1
    duration = min(round(n * base_ejection * 1000), max_ms)
    return pack(0, 0, n, now_ms + duration)


def slow_start(weight: float, word: int, now_ms: int, window: float) -> float:
    """The weight to balance with: `weight` ramped linearly over `window` seconds from the end
    of the endpoint's last ejection (from `SLOW_START_FLOOR` of it), `weight` when the window
    is 0 or over, or when it never was ejected."""
    until = word >> 24 & _MS_MASK
    if window <= 0 or not until or now_ms < until:
        return weight
    elapsed = (now_ms - until) / (window * 1000)
    if elapsed >= 1:
        return weight
    return weight * max(SLOW_START_FLOOR, elapsed)


def ejected_count(words: Sequence[int], now_ms: int) -> int:
    """How many of a destination's endpoints are ejected now."""
    return sum(1 for w in words if is_ejected(w, now_ms))
