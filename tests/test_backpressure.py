"""Rate-limit decisions (`weft.backpressure`): GCRA and the leaky bucket as pure functions of a
word and a fake clock, the header fields, the limiter over a shared key table from two
"workers", and the client address the ``client_ip`` key uses."""

from __future__ import annotations

import ipaddress

import pytest

from weft.backpressure import (
    NS,
    SharedLimiter,
    leaky_bucket,
    policy_field,
    private_table,
    ratelimit_field,
    retry_after_seconds,
    sweep_idle_ns,
    token_bucket,
)
from weft.http.headers import client_address
from weft.schema import RateLimit

T = NS // 50  # 50/s


def run_token(arrivals: list[int], burst: int, interval: int = T) -> list[bool]:
    tat, out = 0, []
    for now in arrivals:
        v = token_bucket(tat, now, interval, burst)
        if v.admit:
            tat = v.tat
        out.append(v.admit)
    return out


def test_a_fresh_token_bucket_admits_one_plus_burst_at_once_then_one_per_interval():
    now = 10 * NS
    assert run_token([now] * 12, burst=10) == [True] * 11 + [False]
    # Over 5 s of requests every millisecond: 1 + 10 + 50 x 5 admitted (the count).
    arrivals = [now + i * NS // 1000 for i in range(5000)]
    assert sum(run_token(arrivals, burst=10)) == 1 + 10 + 250 - 1  # 5000 ms: [0, 5 s)


def test_a_refused_request_learns_when_the_next_is_admitted_and_how_many_remain():
    tat = 0
    now = 100 * NS
    for _ in range(11):
        v = token_bucket(tat, now, T, 10)
        tat = v.tat
    assert v.remaining == 0
    refused = token_bucket(tat, now, T, 10)
    assert not refused.admit and refused.retry_after_ns == T and refused.tat == tat
    later = token_bucket(tat, now + T, T, 10)
    assert later.admit and later.remaining == 0
    assert token_bucket(0, now, T, 10).remaining == 10


def test_the_leaky_bucket_spaces_queued_requests_and_refuses_past_the_queue():
    tat, delays, admitted = 0, [], []
    now = 5 * NS
    for _ in range(6):
        v = leaky_bucket(tat, now, T, 3, False)
        admitted.append(v.admit)
        if v.admit:
            tat = v.tat
            delays.append(v.delay_ns)
    assert admitted == [True] * 4 + [False] * 2  # 1 now + a queue of 3
    assert delays == [0, T, 2 * T, 3 * T]  # each waits for its slot at the rate


def test_nodelay_admits_the_queue_at_once_but_its_slots_stay_used():
    tat = 0
    now = 5 * NS
    out = []
    for _ in range(5):
        v = leaky_bucket(tat, now, T, 3, True)
        out.append((v.admit, v.delay_ns))
        if v.admit:
            tat = v.tat
    assert out == [(True, 0)] * 4 + [(False, 0)]
    assert leaky_bucket(tat, now + T, T, 3, True).admit  # one slot drained


def test_header_fields_follow_the_draft():
    limits = [RateLimit(count=100, per=60.0, burst=5), RateLimit(algorithm="leaky_bucket",
                                                                  count=2, per=1.0, queue=4)]
    assert policy_field(["a", "b"], limits) == (
        b'"a";q=100;w=60;weft-burst=5, "b";q=2;w=1;weft-queue=4'
    )
    v = token_bucket(0, 10 * NS, T, 10)
    assert ratelimit_field("a", v) == b'"a";r=10;t=1'
    assert retry_after_seconds(1) == 1 and retry_after_seconds(NS + 1) == 2
    assert retry_after_seconds(0) == 1


class Clock:
    def __init__(self) -> None:
        self.ns = 1000 * NS

    def __call__(self) -> int:
        return self.ns


def test_two_workers_over_one_table_admit_exactly_the_limit_together():
    table = private_table(64)
    clock = Clock()
    a, b = SharedLimiter(table, clock), SharedLimiter(table, clock)
    limit = RateLimit(count=50, per=1.0, burst=10)
    admitted = 0
    for i in range(2000):  # 2 s of a request every millisecond, alternating workers
        clock.ns += NS // 1000
        v = (a if i % 2 else b).decide(b"k", limit)
        assert v is not None
        admitted += v.admit
    assert admitted == 1 + 10 + 100 - 1


def test_a_full_table_answers_none_and_idle_keys_are_swept():
    table = private_table(16)
    clock = Clock()
    limiter = SharedLimiter(table, clock)
    limit = RateLimit(count=1, per=1.0, burst=0)
    results = [limiter.decide(f"k{i}".encode(), limit) for i in range(40)]
    assert any(r is None for r in results) and limiter.full > 0
    clock.ns += sweep_idle_ns([limit]) + 1
    assert limiter.sweep(sweep_idle_ns([limit])) == 16
    assert limiter.decide(b"new", limit) is not None


TRUSTED = [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", [b"1.2.3.4"], "203.0.113.9"),  # untrusted peer: its XFF is ignored
        ("10.0.0.1", [b"198.51.100.7"], "198.51.100.7"),
        ("10.0.0.1", [b"6.6.6.6, 198.51.100.7, 10.1.1.1"], "198.51.100.7"),  # forged left part
        ("10.0.0.1", [b"6.6.6.6", b"198.51.100.7"], "198.51.100.7"),  # two field lines
        ("10.0.0.1", [b"10.2.2.2"], "10.2.2.2"),  # all trusted: the left-most
        ("10.0.0.1", [b"nonsense, 10.2.2.2"], "10.2.2.2"),  # malformed ends the walk
        ("10.0.0.1", [], "10.0.0.1"),
    ],
)
def test_the_client_address_is_the_right_most_untrusted_hop(peer, xff, expected):
    headers = [(b"x-forwarded-for", v) for v in xff]
    assert client_address(headers, peer, TRUSTED) == expected
