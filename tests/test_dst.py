"""Unit tests for weft.dst: each balancing strategy's choice, told with plain values."""

from __future__ import annotations

import collections
import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from weft.dst import STRATEGIES, HashKeySource, make_balancer

KEYS = [b"user-%d" % i for i in range(10_000)]


def picks(balancer, count, **kwargs):
    return [balancer.pick(**kwargs) for _ in range(count)]


def homes(balancer, keys=KEYS, **kwargs):
    return [balancer.pick(key=k, **kwargs) for k in keys]


def moved_fraction(before, after):
    return sum(a != b for a, b in zip(before, after, strict=True)) / len(before)


# -- round robin ---------------------------------------------------------------------------------


def test_round_robin_visits_every_endpoint_in_turn():
    balancer = make_balancer("round_robin", [1, 5, 1, 1], rng=random.Random(1))
    sequence = picks(balancer, 400)
    # Weights are ignored: every endpoint gets exactly a quarter, in a fixed rotation.
    assert collections.Counter(sequence) == {0: 100, 1: 100, 2: 100, 3: 100}
    assert all((b - a) % 4 == 1 for a, b in itertools.pairwise(sequence))


def test_round_robin_skips_excluded_endpoints():
    balancer = make_balancer("round_robin", [1, 1, 1, 1], rng=random.Random(2))
    sequence = picks(balancer, 300, excluded={1, 3})
    assert collections.Counter(sequence) == {0: 150, 2: 150}
    assert all(a != b for a, b in itertools.pairwise(sequence))


def test_round_robin_start_differs_between_balancers():
    # Workers built at the same reload must not all send their first request to endpoint 0.
    firsts = {make_balancer("round_robin", [1] * 8, rng=random.Random(s)).pick() for s in range(20)}
    assert len(firsts) > 1


# -- smooth weighted round robin -----------------------------------------------------------------


def test_weighted_gives_nginx_smooth_sequence_for_5_1_1():
    balancer = make_balancer("weighted", [5, 1, 1])
    a, b, c = 0, 1, 2
    assert picks(balancer, 14) == [a, a, b, a, c, a, a] * 2


@pytest.mark.parametrize("weights", [[3, 2, 1, 4], [1, 1], [7, 3], [2, 9, 4, 1, 1]])
def test_weighted_picks_are_exactly_proportional_per_cycle(weights):
    balancer = make_balancer("weighted", weights)
    cycles = 100
    counts = collections.Counter(picks(balancer, cycles * sum(weights)))
    assert counts == {i: cycles * w for i, w in enumerate(weights)}


def test_weighted_excluded_endpoint_leaves_the_others_in_proportion():
    balancer = make_balancer("weighted", [5, 1, 1])
    # 1. Start a cycle normally, then exclude c mid-cycle.
    picks(balancer, 3)
    during = collections.Counter(picks(balancer, 600, excluded={2}))
    # 2. a and b keep their 5:1 share (within one pick for the interrupted cycle).
    assert 2 not in during
    assert abs(during[0] - 500) <= 1 and abs(during[1] - 100) <= 1
    # 3. c comes back and the three settle to 5:1:1 again.
    after = collections.Counter(picks(balancer, 700))
    assert abs(after[0] - 500) <= 2 and abs(after[1] - 100) <= 2 and abs(after[2] - 100) <= 2


# -- least connections (power of two choices) ----------------------------------------------------


def test_least_conn_never_picks_the_busier_of_two():
    balancer = make_balancer("least_conn", [1, 1], rng=random.Random(3))
    assert set(picks(balancer, 1000, inflight=[100, 0])) == {1}


def test_least_conn_compares_load_per_unit_of_weight():
    # 50/10 = 5 per weight on endpoint 0 beats 10/1 = 10 on endpoint 1.
    balancer = make_balancer("least_conn", [10, 1], rng=random.Random(4))
    assert set(picks(balancer, 500, inflight=[50, 10])) == {0}


def test_least_conn_never_picks_the_busiest_of_many():
    # The busiest endpoint loses every pair it is drawn into.
    balancer = make_balancer("least_conn", [1] * 5, rng=random.Random(5))
    counts = collections.Counter(picks(balancer, 5000, inflight=[1, 2, 3, 4, 50]))
    assert 4 not in counts
    assert counts[0] > counts[1] > counts[2] > counts[3]


@pytest.mark.parametrize("inflight", [(), (3, 3, 3, 3)])
def test_least_conn_spreads_evenly_when_loads_are_equal(inflight):
    balancer = make_balancer("least_conn", [1, 1, 1, 1], rng=random.Random(6))
    counts = collections.Counter(picks(balancer, 8000, inflight=inflight))
    assert all(1800 <= counts[i] <= 2200 for i in range(4)), counts


class ScriptedDraws(random.Random):
    """An rng whose randrange answers from a script, to steer which two endpoints are drawn."""

    def __init__(self, draws):
        super().__init__(0)
        self.draws = iter(draws)

    def randrange(self, stop):
        draw = next(self.draws)
        assert 0 <= draw < stop
        return draw


def test_least_conn_draws_two_distinct_endpoints_and_ties_go_to_the_first():
    # Draws (2, 0): a=2, b=0; a tie keeps a. Draws (0, 0): the second draw shifts past a to 1.
    balancer = make_balancer("least_conn", [1, 1, 1], rng=ScriptedDraws([2, 0, 0, 0, 0, 0]))
    assert balancer.pick(inflight=[4, 4, 4]) == 2
    assert balancer.pick(inflight=[4, 4, 4]) == 0
    assert balancer.pick(inflight=[4, 3, 4]) == 1


def test_least_conn_is_reproducible_with_a_seeded_rng():
    def run(seed):
        balancer = make_balancer("least_conn", [1, 2, 3], rng=random.Random(seed))
        return picks(balancer, 200, inflight=[2, 2, 2])

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_least_conn_skips_excluded_and_returns_a_lone_candidate():
    balancer = make_balancer("least_conn", [1, 1, 1, 1], rng=random.Random(9))
    assert set(picks(balancer, 200, excluded={0, 2})) == {1, 3}
    assert set(picks(balancer, 50, inflight=[0, 9, 0, 0], excluded={0, 2, 3})) == {1}


# -- consistent hash (Maglev) --------------------------------------------------------------------


def test_consistent_hash_same_key_same_endpoint_across_balancers():
    first = make_balancer("consistent_hash", [1] * 7, rng=random.Random(10))
    second = make_balancer("consistent_hash", [1] * 7, rng=random.Random(11))
    assert homes(first) == homes(second)


def test_consistent_hash_is_stable_across_processes():
    # A different PYTHONHASHSEED proves the table and key hashes never go through hash().
    keys = KEYS[:200]
    script = (
        "import sys; from weft.dst import make_balancer\n"
        "b = make_balancer('consistent_hash', [1, 2, 3, 1, 1])\n"
        f"print([b.pick(key=k) for k in {keys!r}])\n"
    )
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(repo)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, check=True, timeout=60
    )
    here = make_balancer("consistent_hash", [1, 2, 3, 1, 1])
    assert out.stdout.decode().strip() == str(homes(here, keys))


def test_consistent_hash_spreads_keys_within_20_percent_of_fair_share():
    counts = collections.Counter(homes(make_balancer("consistent_hash", [1] * 10)))
    assert all(800 <= counts[i] <= 1200 for i in range(10)), counts


def test_consistent_hash_shares_keys_in_proportion_to_weights():
    weights = [1, 2, 3, 4]
    counts = collections.Counter(homes(make_balancer("consistent_hash", weights)))
    for i, w in enumerate(weights):
        fair = len(KEYS) * w / sum(weights)
        assert 0.8 * fair <= counts[i] <= 1.2 * fair, counts


def test_consistent_hash_lightest_endpoint_still_owns_slots_at_extreme_weights():
    # 1 against 100000: it must still be reachable when the heavy endpoint is excluded.
    balancer = make_balancer("consistent_hash", [100_000, 1])
    assert set(homes(balancer, KEYS[:100], excluded={0})) == {1}
    assert collections.Counter(homes(balancer, KEYS[:1000]))[0] >= 995


def test_consistent_hash_adding_an_endpoint_remaps_about_one_in_n_plus_one():
    before = homes(make_balancer("consistent_hash", [1] * 10))
    after = homes(make_balancer("consistent_hash", [1] * 11))
    assert 0.5 / 11 < moved_fraction(before, after) < 1.5 / 11
    # Most of the moved keys went to the newcomer, not between old endpoints.
    to_new = sum(a == 10 for b, a in zip(before, after, strict=True) if a != b)
    assert to_new / len(KEYS) > 0.8 / 11


@pytest.mark.parametrize("removed", [9, 4])
def test_consistent_hash_removing_an_endpoint_remaps_only_its_keys_plus_little(removed):
    names = [f"10.0.0.{i}:80" for i in range(10)]
    kept = [n for n in names if n != names[removed]]
    before = [names[i] for i in homes(make_balancer("consistent_hash", [1] * 10, names=names))]
    after = [kept[i] for i in homes(make_balancer("consistent_hash", [1] * 9, names=kept))]
    assert moved_fraction(before, after) <= 1.5 / 10
    assert all(a != names[removed] for a in after)


def test_consistent_hash_removing_the_last_endpoint_without_names():
    # Without names the index is the identity, so dropping the last endpoint is the stable case.
    before = homes(make_balancer("consistent_hash", [1] * 10))
    after = homes(make_balancer("consistent_hash", [1] * 9))
    assert moved_fraction(before, after) <= 1.5 / 10


def test_consistent_hash_excluding_an_endpoint_moves_only_its_keys():
    balancer = make_balancer("consistent_hash", [1] * 10)
    before = homes(balancer)
    after = homes(balancer, excluded={3})
    for b, a in zip(before, after, strict=True):
        assert a == b if b != 3 else a != 3
    # Its keys spread over the others rather than piling onto one neighbour.
    assert len({a for b, a in zip(before, after, strict=True) if b == 3}) >= 6


def test_consistent_hash_second_exclusion_leaves_earlier_displaced_keys_alone():
    # A second endpoint failing must not reshuffle the keys already moved off the first.
    balancer = make_balancer("consistent_hash", [1] * 10)
    one = homes(balancer, excluded={3})
    two = homes(balancer, excluded={3, 7})
    assert all(b == a for a, b in zip(one, two, strict=True) if a != 7)


def test_bounded_load_moves_keys_off_an_overloaded_endpoint():
    balancer = make_balancer("consistent_hash", [1, 1, 1, 1], balance_factor=1.25)
    inflight = [40, 0, 0, 0]  # capacity is ceil(1.25 * 41 / 4) = 13: endpoint 0 is over it
    before = homes(balancer)
    after = homes(balancer, inflight=inflight)
    for b, a in zip(before, after, strict=True):
        assert a == b if b != 0 else a != 0
    # With bounded load off, the key's home wins regardless of load.
    unbounded = make_balancer("consistent_hash", [1, 1, 1, 1], balance_factor=0)
    assert homes(unbounded, inflight=inflight) == before


def test_bounded_load_gives_heavier_endpoints_proportionally_more_capacity():
    # An 8th request on the weight-3 endpoint is within its share ceil(1.25 * 10 * 3/4) = 10,
    # though above the unweighted capacity ceil(1.25 * 10 / 2) = 7.
    balancer = make_balancer("consistent_hash", [3, 1])
    assert homes(balancer, inflight=[7, 2]) == homes(balancer)
    # Past its share it sheds keys to the light endpoint.
    assert 0 not in homes(balancer, KEYS[:2000], inflight=[30, 0])


def test_bounded_load_and_exclusion_together_pick_a_candidate_under_capacity():
    balancer = make_balancer("consistent_hash", [1] * 5)
    inflight = [0, 20, 0, 0, 0]  # capacity ceil(1.25 * 21 / 4) = 7 over the four candidates
    assert set(homes(balancer, inflight=inflight, excluded={0})) == {2, 3, 4}


def test_consistent_hash_without_a_key_falls_back_to_round_robin():
    balancer = make_balancer("consistent_hash", [1, 1, 1], rng=random.Random(12))
    assert collections.Counter(picks(balancer, 300, key=None)) == {0: 100, 1: 100, 2: 100}
    assert collections.Counter(picks(balancer, 300, key=None, excluded={1})) == {0: 150, 2: 150}


# -- shared contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("key", [None, b"some-key"])
def test_every_strategy_returns_none_when_all_endpoints_are_excluded(strategy, key):
    balancer = make_balancer(strategy, [1, 2, 3], rng=random.Random(13))
    assert balancer.pick(key=key, inflight=[1, 1, 1], excluded={0, 1, 2}) is None
    assert balancer.pick(key=key, excluded={0, 1, 2}) is None
    assert balancer.pick(key=key, excluded={1, 2}) == 0


class OnlyContains:
    """A Container and nothing more (no len, no iteration): all `pick` may assume."""

    def __init__(self, *members):
        self.members = frozenset(members)

    def __contains__(self, item):
        return item in self.members


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("key", [None, b"some-key"])
def test_excluded_may_be_any_container(strategy, key):
    balancer = make_balancer(strategy, [1, 2, 3, 4], rng=random.Random(14))
    chosen = {balancer.pick(key=key, inflight=[0, 1, 0, 1], excluded=OnlyContains(0, 2))
              for _ in range(200)}
    assert chosen <= {1, 3} and chosen
    assert balancer.pick(key=key, excluded=OnlyContains(0, 1, 2, 3)) is None
    assert balancer.pick(key=key, excluded=range(1, 4)) == 0


# -- one schedule shared by workers --------------------------------------------------------------


def test_the_smooth_wrr_schedule_is_one_period_of_nginx_sequence():
    from weft.dst import smooth_wrr_schedule

    assert smooth_wrr_schedule([3, 1, 1]) == [0, 1, 0, 2, 0]
    assert smooth_wrr_schedule([5, 1, 1]) == [0, 0, 1, 0, 2, 0, 0]
    # weights with a common factor: the same period, not a longer one
    assert smooth_wrr_schedule([30, 10, 10]) == [0, 1, 0, 2, 0]
    assert smooth_wrr_schedule([1, 1, 1]) == [0, 1, 2]
    assert smooth_wrr_schedule([3, 1, 1], excluded={0}) == [1, 2]
    assert smooth_wrr_schedule([3, 1, 1], excluded={0, 1, 2}) == []


@pytest.mark.parametrize(("strategy", "weights"), [("weighted", [3, 1, 1]),
                                                   ("round_robin", [1, 1, 1])])
def test_balancers_sharing_a_position_follow_one_sequence(strategy, weights):
    from weft.dst import LocalPosition

    # 1. two workers' balancers and one position (in weft, a word in shared memory)
    shared = LocalPosition()
    workers = [make_balancer(strategy, weights, position=shared) for _ in range(2)]
    alone = make_balancer(strategy, weights, position=LocalPosition())
    # 2. whichever worker picks, in any order, the picks are the one balancer's sequence
    order = [0, 0, 1, 0, 1, 1, 1, 0, 0, 1] * 10
    together = [workers[w].pick() for w in order]
    assert together == [alone.pick() for _ in order]
    # 3. so every run of one period splits by the weights
    period = sum(weights)
    for i in range(len(together) - period + 1):
        assert collections.Counter(together[i : i + period]) == dict(enumerate(weights))


def test_a_shared_position_keeps_the_others_in_proportion_while_one_is_excluded():
    from weft.dst import LocalPosition

    shared = LocalPosition()
    workers = [make_balancer("weighted", [3, 1, 1], position=shared) for _ in range(2)]
    during = [workers[i % 2].pick(excluded={0}) for i in range(40)]
    assert collections.Counter(during) == {1: 20, 2: 20}
    after = [workers[i % 2].pick() for i in range(50)]
    assert collections.Counter(after) == {0: 30, 1: 10, 2: 10}


@pytest.mark.parametrize(
    ("strategy", "weights", "kwargs", "message"),
    [
        ("random", [1], {}, "unknown strategy 'random'"),
        ("round_robin", [], {}, "at least one endpoint"),
        ("weighted", [1, 0], {}, "endpoint 1 weight must be an integer >= 1"),
        ("weighted", [-2], {}, "endpoint 0 weight"),
        ("least_conn", [1.5], {}, "endpoint 0 weight"),
        ("consistent_hash", [1], {"balance_factor": 0.5}, "balance_factor must be 0"),
        ("consistent_hash", [1, 1], {"names": ["a"]}, "one distinct name per endpoint"),
        ("consistent_hash", [1, 1], {"names": ["a", "a"]}, "one distinct name per endpoint"),
    ],
)
def test_make_balancer_rejects_bad_input(strategy, weights, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_balancer(strategy, weights, **kwargs)


# -- hash key sources ----------------------------------------------------------------------------

HEADERS = [
    (b"host", b"example.com"),
    (b"x-tenant", b"acme"),
    (b"cookie", b"theme=dark; sid=abc123"),
    (b"cookie", b"lang=en"),
    (b"x-empty", b""),
]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("client_ip", HashKeySource("client_ip")),
        ("path", HashKeySource("path")),
        ("header:X-Tenant", HashKeySource("header", b"x-tenant")),
        ("cookie:SID", HashKeySource("cookie", b"SID")),
    ],
)
def test_hash_key_source_parses_each_form(spec, expected):
    assert HashKeySource.parse(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "ip", "Path", "query:x", "header", "header:", "cookie:", "header:a b", "cookie:é"]
)
def test_hash_key_source_rejects_bad_specs_with_a_clear_message(spec):
    with pytest.raises(ValueError, match="hash key") as info:
        HashKeySource.parse(spec)
    assert repr(spec) in str(info.value)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("client_ip", b"192.0.2.7"),
        ("path", b"/api/v1/items"),
        ("header:x-tenant", b"acme"),
        ("header:host", b"example.com"),
        ("cookie:sid", b"abc123"),
        ("cookie:lang", b"en"),  # from the second cookie header
        ("cookie:theme", b"dark"),
        ("header:x-missing", None),
        ("header:x-empty", None),
        ("cookie:missing", None),
        ("cookie:id", None),  # no prefix match on "sid"
    ],
)
def test_hash_key_source_extracts_the_request_key(spec, expected):
    source = HashKeySource.parse(spec)
    assert source.extract(HEADERS, "192.0.2.7", b"/api/v1/items") == expected


def test_hash_key_source_joins_repeated_headers():
    headers = [(b"x-tenant", b"acme"), (b"x-tenant", b"beta")]
    assert HashKeySource.parse("header:x-tenant").extract(headers, "", b"/") == b"acme, beta"


def test_hash_key_source_without_cookies_or_address_gives_none():
    assert HashKeySource.parse("cookie:sid").extract([], "10.0.0.1", b"/") is None
    assert HashKeySource.parse("client_ip").extract([], "", b"/") is None
