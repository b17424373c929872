"""The health transition table, probe classification, endpoint selection and the prober lease
(`weft.health`): pure functions of words, with time as plain milliseconds."""

from __future__ import annotations

import itertools

import pytest

from weft.health import (
    DEGRADED,
    DEGRADED_PASS,
    FAIL,
    HEALTHY,
    PASS,
    STATES,
    TRAFFIC_CLEAN,
    TRAFFIC_DEGRADED,
    TRANSITIONS,
    UNHEALTHY,
    classify_probe,
    excluded,
    lease,
    lease_owner,
    pack,
    step,
    unpack,
)

EVENTS = (PASS, DEGRADED_PASS, FAIL, TRAFFIC_DEGRADED, TRAFFIC_CLEAN)


def run(events, word=None, healthy=2, unhealthy=3):
    """The states after each event, from `word` (a fresh, Healthy endpoint by default)."""
    word = pack(HEALTHY) if word is None else word
    out = []
    for e in events:
        word = step(word, e, healthy, unhealthy)
        out.append(unpack(word).state)
    return out, word


def test_the_table_covers_every_state_and_event():
    assert set(TRANSITIONS) == set(itertools.product(STATES, EVENTS))


def test_unhealthy_after_unhealthy_threshold_consecutive_failures():
    states, word = run([FAIL, FAIL, FAIL])
    assert states == [HEALTHY, HEALTHY, UNHEALTHY]
    assert unpack(word).changes == 1


def test_a_pass_between_failures_resets_the_run():
    states, _ = run([FAIL, FAIL, PASS, FAIL, FAIL])
    assert states == [HEALTHY] * 5
    states, _ = run([FAIL, FAIL, DEGRADED_PASS, FAIL, FAIL, FAIL])
    assert states == [HEALTHY, HEALTHY, DEGRADED, DEGRADED, DEGRADED, UNHEALTHY]


def test_back_after_healthy_threshold_consecutive_passes():
    _, down = run([FAIL] * 3)
    states, word = run([PASS, FAIL, PASS, PASS], down)
    assert states == [UNHEALTHY, UNHEALTHY, UNHEALTHY, HEALTHY]
    assert unpack(word).changes == 2
    # a degraded pass counts towards returning, and returns it Degraded
    states, _ = run([PASS, DEGRADED_PASS], down)
    assert states == [UNHEALTHY, DEGRADED]


def test_healthy_and_degraded_switch_at_once_and_traffic_never_revives():
    states, _ = run([DEGRADED_PASS, PASS, TRAFFIC_DEGRADED, TRAFFIC_CLEAN])
    assert states == [DEGRADED, HEALTHY, DEGRADED, HEALTHY]
    _, down = run([FAIL] * 3)
    states, _ = run([TRAFFIC_CLEAN, TRAFFIC_DEGRADED] * 3, down)
    assert states == [UNHEALTHY] * 6


def test_an_unchanged_word_means_nothing_to_write():
    word = pack(HEALTHY)
    assert step(word, PASS, 2, 3) == word
    assert step(word, TRAFFIC_CLEAN, 2, 3) == word


def test_runs_saturate_and_the_change_count_wraps():
    word = pack(UNHEALTHY, fails=255, changes=2**32 - 1)
    assert unpack(step(word, FAIL, 2, 3)).fails == 0  # a fail of an Unhealthy one: no run
    word = step(pack(HEALTHY, changes=2**32 - 1), FAIL, 2, 1)
    assert unpack(word) == (UNHEALTHY, 0, 0, 0)
    assert unpack(pack(UNHEALTHY, passes=999)).passes == 255


@pytest.mark.parametrize(
    ("status", "latency", "header", "expected"),
    [
        (200, 0.01, False, PASS),
        (399, 0.01, False, PASS),
        (404, 0.01, False, FAIL),
        (503, 0.01, False, FAIL),
        (None, 0.0, False, FAIL),  # connect error, reset, timeout
        (200, 0.5, False, DEGRADED_PASS),  # slower than degraded_latency
        (200, 0.01, True, DEGRADED_PASS),  # the degraded header
        (500, 0.01, True, FAIL),  # a failure is a failure, header or not
    ],
)
def test_a_probe_result_is_classified(status, latency, header, expected):
    got = classify_probe(status, latency, expected=[(200, 399)], degraded_latency=0.2,
                         degraded_header=header)
    assert got is expected


def test_degraded_latency_zero_is_off():
    assert classify_probe(200, 30.0, expected=[(200, 399)], degraded_latency=0.0,
                          degraded_header=False) is PASS


H, D, U = HEALTHY, DEGRADED, UNHEALTHY


@pytest.mark.parametrize(
    ("states", "ejected", "panic", "skipped"),
    [
        ([H, H, H], [0, 0, 0], 50, set()),
        ([H, D, U], [0, 0, 0], 0, {1, 2}),  # Degraded only when no Healthy one is left
        ([D, D, U], [0, 0, 0], 0, {2}),
        ([H, H, H], [1, 0, 0], 50, {0}),  # ejected
        ([H, D, D], [1, 0, 0], 0, {0}),  # the only Healthy one is ejected: Degraded serve
        ([U, U, H], [0, 0, 0], 50, set()),  # 33 % usable is below 50 %: panic, all serve
        ([U, U, H], [0, 0, 0], 30, {0, 1}),  # 33 % is not below 30 %
        ([U, U], [0, 0], 0, {0, 1}),  # panic off: nothing to use
        ([U, U], [0, 0], 50, set()),
    ],
)
def test_which_endpoints_balancing_skips(states, ejected, panic, skipped):
    assert excluded(states, [bool(e) for e in ejected], panic) == skipped


def test_a_lease_is_taken_renewed_and_expires():
    word = 0
    word = lease(word, 101, now_ms=1_000, ttl_ms=10_000)
    assert word is not None and lease_owner(word) == 101
    assert lease(word, 202, now_ms=5_000, ttl_ms=10_000) is None  # held by a live owner
    renewed = lease(word, 101, now_ms=5_000, ttl_ms=10_000)
    assert renewed is not None and lease_owner(renewed) == 101
    assert lease(renewed, 202, now_ms=14_999, ttl_ms=10_000) is None
    taken = lease(renewed, 202, now_ms=15_000, ttl_ms=10_000)  # the owner stopped renewing
    assert taken is not None and lease_owner(taken) == 202


def test_a_lease_rejects_impossible_pids():
    with pytest.raises(ValueError):
        lease(0, 0, now_ms=0, ttl_ms=1)
    with pytest.raises(ValueError):
        lease(0, 1 << 30, now_ms=0, ttl_ms=1)
