"""The shared-memory layer of health, ejection and the breaker (`weft.observer`): several
`DestinationObserver`s over one table, as several workers share the state segment, driven with
a fake millisecond clock."""

from __future__ import annotations

import pytest

from weft import adaptive, health, outlier
from weft.observer import DestinationObserver, LocalRecords, snapshot
from weft.outcome import CONNECT_ERROR, OK, STATUS
from weft.schema import BreakerConfig, Destination, Endpoint, HealthCheck, OutlierConfig


class Clock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def dest(n: int = 3, **sections: object) -> Destination:
    eps = tuple(Endpoint("127.0.0.1", 9000 + i) for i in range(n))
    return Destination("web", eps, **sections)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def workers(d: Destination, clock: Clock, k: int = 2, **kw: object) -> list[DestinationObserver]:
    """`k` observers ("workers" with pids 101, 102, ...) over the same records."""
    records = LocalRecords(64)
    cols = records.columns(len(d.endpoints))
    events: list[tuple[str, int, str, str]] = []
    out = [
        DestinationObserver(
            d,
            records.table,
            cols,
            pid=101 + w,
            clock_ms=clock,
            on_event=lambda *e: events.append(e),
            **kw,  # type: ignore[arg-type]
        )
        for w in range(k)
    ]
    for o in out:
        o.events = events  # type: ignore[attr-defined]
        o.records = records  # type: ignore[attr-defined]
    return out


BREAKER = BreakerConfig(
    failure_rate=50, minimum_calls=4, window=10.0, open_for=5.0, max_open_for=60.0
)


def test_the_breaker_trips_for_every_worker_on_the_failures_of_all():
    clock = Clock()
    a, b = workers(dest(1, breaker=BREAKER), clock)
    # 1. Two workers' calls land in one window: 2 ok, then 2 failures make 4 calls at 50 %.
    a.report(0, OK, 200, 0.01)
    b.report(0, OK, 200, 0.01)
    a.report(0, STATUS, 503, 0.01)
    assert a.admit(0) == 0
    b.report(0, CONNECT_ERROR, 0, 0.01)
    # 2. Open for both: refused with a Retry-After of the open time, excluded at the pick.
    assert a.admit(0) == 5 and b.admit(0) == 5
    assert 0 in a.excluded() and 0 in b.excluded()
    assert a.breaker_retry_after() == 5
    assert ("web", 0, "breaker", "OPEN") in a.events  # type: ignore[attr-defined]


def tripped(clock: Clock) -> list[DestinationObserver]:
    obs = workers(dest(1, breaker=BREAKER), clock, k=3)
    for _ in range(4):
        obs[0].report(0, STATUS, 500, 0.01)
    assert obs[0].admit(0) > 0
    return obs


def test_after_open_for_exactly_one_call_across_workers_is_the_trial():
    clock = Clock()
    a, b, c = tripped(clock)
    clock.ms += 5000
    assert a.admit(0) == -1  # the trial, claimed by a
    assert b.admit(0) == 1 and c.admit(0) == 1  # everyone else waits for its answer
    assert a.admit(0) == 1  # even a itself: one trial at a time
    assert 0 in b.excluded()
    assert snapshot(a.table, a.columns[0], clock.ms)["trial_pid"] == a.pid


def test_a_successful_trial_closes_the_breaker_and_a_failed_one_doubles_the_open_time():
    clock = Clock()
    a, b, _ = tripped(clock)
    clock.ms += 5000
    assert a.admit(0) == -1
    a.report(0, STATUS, 503, 0.01, trial=True)  # the trial failed: open again, for 10 s now
    assert adaptive.unpack(a.table.load(a.columns[0], 3)).state is adaptive.OPEN
    assert b.admit(0) == 10
    clock.ms += 10_000
    assert b.admit(0) == -1
    b.report(0, OK, 200, 0.01, trial=True)
    assert a.admit(0) == 0 and b.admit(0) == 0  # closed for everyone
    assert a.table.load(a.columns[0], 4) == 0  # the trial word is free
    # The failures that tripped it are not counted again: one more failure does not reopen.
    a.report(0, STATUS, 503, 0.01)
    assert a.admit(0) == 0


def test_a_call_sent_before_the_trip_that_ends_during_the_trial_does_not_decide_it():
    clock = Clock()
    a, b, _ = tripped(clock)
    clock.ms += 5000
    assert a.admit(0) == -1  # the trial, out
    # A call a sent before the breaker opened is answered now: success, then failure.
    a.report(0, OK, 200, 0.01)
    a.report(0, STATUS, 500, 0.01)
    assert adaptive.unpack(a.table.load(a.columns[0], 3)).state is adaptive.HALF_OPEN
    assert b.admit(0) == 1  # the trial is still out
    a.report(0, OK, 200, 0.01, trial=True)  # only its own answer decides
    assert b.admit(0) == 0


def test_a_trial_that_never_reports_is_given_back_and_the_next_call_is_the_trial():
    clock = Clock()
    a, b, _ = tripped(clock)
    clock.ms += 5000
    assert a.admit(0) == -1
    a.abandon(0)  # the client left before the endpoint answered
    assert b.admit(0) == -1


def test_a_dead_workers_trial_is_freed_by_reclaim():
    clock = Clock()
    a, b, _ = tripped(clock)
    clock.ms += 5000
    assert a.admit(0) == -1
    assert a.table.reclaim(a.pid) == 1  # the supervisor, after a died
    assert b.admit(0) == -1


OUTLIER = OutlierConfig(
    consecutive_5xx=3,
    consecutive_gateway_errors=2,
    base_ejection=30.0,
    max_ejection=300.0,
    max_ejection_percent=50,
    panic_threshold=0,
)


def test_consecutive_gateway_errors_from_several_workers_eject_for_growing_times():
    clock = Clock()
    a, b = workers(dest(3, outlier=OUTLIER), clock)
    a.report(1, STATUS, 503, 0.01)
    b.report(1, STATUS, 502, 0.01)
    assert 1 in a.excluded() and 1 in b.excluded()
    assert ("web", 1, "ejection", "EJECTED") in a.events  # type: ignore[attr-defined]
    clock.ms += 30_000
    assert 1 not in a.excluded()
    a.report(1, CONNECT_ERROR, 0, 0.01)
    a.report(1, CONNECT_ERROR, 0, 0.01)
    assert outlier.unpack(a.table.load(a.columns[1], 2)).until_ms == clock.ms + 60_000


def test_max_ejection_percent_keeps_one_of_two_failing_endpoints_in():
    clock = Clock()
    (a,) = workers(dest(2, outlier=OUTLIER), clock, k=1)
    for i in (0, 1):
        for _ in range(5):
            a.report(i, STATUS, 503, 0.01)
    ex = a.excluded()
    assert len([i for i in (0, 1) if i in ex]) == 1  # one ejected, the other always stays


def test_below_the_panic_threshold_every_endpoint_gets_traffic():
    clock = Clock()
    panicky = OutlierConfig(consecutive_gateway_errors=1, max_ejection_percent=100)
    (a,) = workers(dest(3, outlier=panicky), clock, k=1)
    a.report(0, STATUS, 503, 0.01)
    assert set(a.excluded()) == {0}  # 2 of 3 left: 66 % >= 50 %
    a.report(1, STATUS, 503, 0.01)
    assert set(a.excluded()) == set()  # 1 of 3: panic, balance over all


def test_unhealthy_and_degraded_endpoints_follow_probes_across_workers():
    clock = Clock()
    hc = HealthCheck(healthy_threshold=2, unhealthy_threshold=2)
    a, b = workers(dest(3, health=hc), clock)
    for _ in range(2):
        a.apply_probe(0, health.FAIL)
    assert 0 in b.excluded()
    # Degraded ones are used only when no Healthy one is left.
    b.report(1, OK, 200, 0.01, degraded=True)
    assert set(a.excluded()) == {0, 1}
    a.apply_probe(1, health.PASS)
    assert set(a.excluded()) == {0}
    old, new = a.apply_probe(0, health.PASS)
    assert (old, new) == (health.UNHEALTHY, health.UNHEALTHY)
    assert a.apply_probe(0, health.PASS) == (health.UNHEALTHY, health.HEALTHY)
    assert set(b.excluded()) == set()


def test_a_returning_endpoint_ramps_up_over_slow_start():
    clock = Clock()
    hc = HealthCheck(healthy_threshold=1, unhealthy_threshold=1)
    oc = OutlierConfig(slow_start=10.0)
    (a,) = workers(dest(2, health=hc, outlier=oc), clock, k=1)
    assert a.slow_start_factor(0) == 1.0  # never away: full weight
    a.apply_probe(0, health.FAIL)
    a.apply_probe(0, health.PASS)  # back now
    assert a.slow_start_factor(0) == pytest.approx(outlier.SLOW_START_FLOOR)
    clock.ms += 5000
    assert a.slow_start_factor(0) == pytest.approx(0.5)
    clock.ms += 5000
    assert a.slow_start_factor(0) == 1.0


def test_the_prober_lease_is_held_by_one_worker_until_it_expires():
    clock = Clock()
    a, b = workers(dest(1, health=HealthCheck()), clock)
    assert a.take_lease(0, 1500)
    assert not b.take_lease(0, 1500)
    clock.ms += 1000
    assert a.take_lease(0, 1500)  # renewed
    clock.ms += 1499
    assert not b.take_lease(0, 1500)
    clock.ms += 2
    assert b.take_lease(0, 1500)  # a stopped renewing
    assert snapshot(a.table, a.columns[0], clock.ms)["prober_pid"] == b.pid
    b.drop_lease(0)
    assert a.take_lease(0, 1500)


def test_slow_start_leaves_a_returning_endpoint_out_of_that_share_of_picks_and_keeps_rr_even():
    import random
    from collections import Counter

    from weft.dst import make_balancer

    clock = Clock()
    hc = HealthCheck(healthy_threshold=1, unhealthy_threshold=1)
    oc = OutlierConfig(slow_start=10.0, consecutive_5xx=0, consecutive_gateway_errors=0)
    (a,) = workers(dest(3, health=hc, outlier=oc), clock, k=1, rng=random.Random(7).random)
    a.apply_probe(1, health.FAIL)
    a.apply_probe(1, health.PASS)
    clock.ms += 2500  # a quarter of the way: factor 0.25
    rr = make_balancer("round_robin", [1, 1, 1])
    picks = Counter(rr.pick(excluded=a.excluded()) for _ in range(6000))
    # Endpoint 1 keeps about a quarter of its third; the other two split the rest evenly.
    assert 0.25 * 2000 * 0.8 < picks[1] < 0.25 * 2000 * 1.2, picks
    assert abs(picks[0] - picks[2]) < 0.1 * picks[0], picks
    # Never every endpoint out: a lone returning endpoint still gets every pick.
    (b,) = workers(dest(1, health=hc, outlier=oc), clock, k=1)
    b.apply_probe(0, health.FAIL)
    b.apply_probe(0, health.PASS)
    assert all(0 not in b.excluded() for _ in range(50))
