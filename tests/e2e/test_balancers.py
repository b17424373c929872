"""Balancing strategies over real requests and real upstreams.

Every upstream stamps its name on the response (``x-upstream``), so the distribution is counted
from what the client received. Requests go over one keep-alive client connection, so one weft
worker makes every choice, except in the tests of positions shared by two workers, which
alternate between connections the kernel gave to each worker.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import httpx
import pytest
from support.clients import run_concurrently
from support.config import simple_config
from support.procs import wait_for
from support.supervised import connections_by_worker, start_supervised

pytestmark = pytest.mark.e2e


def _names(client: httpx.Client, n: int, **kwargs) -> list[str]:
    out = []
    for _ in range(n):
        resp = client.get("/echo", **kwargs)
        assert resp.status_code == 200
        out.append(resp.headers["x-upstream"])
    return out


def test_round_robin_spreads_evenly_over_three_upstreams(upstream, weft, free_port):
    ups = [upstream(f"rr{i}") for i in range(3)]
    proxy = weft(simple_config(free_port(), [u.address for u in ups], strategy="round_robin"))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        names = _names(client, 30)
    assert Counter(names) == {"rr0": 10, "rr1": 10, "rr2": 10}
    # and in rotation: every window of three consecutive requests hits all three
    for i in range(0, 30, 3):
        assert len(set(names[i : i + 3])) == 3, names


def test_weighted_follows_the_weights(upstream, weft, free_port):
    ups = [upstream(f"w{i}") for i in range(3)]
    endpoints = [{"address": u.address, "weight": w} for u, w in zip(ups, (1, 2, 3), strict=True)]
    proxy = weft(simple_config(free_port(), endpoints, strategy="weighted"))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        counts = Counter(_names(client, 60))
    for name, expected in (("w0", 10), ("w1", 20), ("w2", 30)):
        assert abs(counts[name] - expected) <= 1, counts


def test_consistent_hash_keeps_each_key_on_one_upstream(upstream, weft, free_port):
    ups = [upstream(f"ch{i}") for i in range(3)]
    proxy = weft(simple_config(free_port(), [u.address for u in ups],
                               strategy="consistent_hash",
                               destination_keys={"hash_key": "header:x-user-id",
                                                 "hash_balance_factor": 0}))
    placement: dict[str, set[str]] = {}
    for round_ in range(3):
        # A new client connection each round: stickiness comes from the key, not the connection.
        with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
            for user in range(12):
                resp = client.get("/echo", headers={"x-user-id": f"user-{user}"},
                                  params={"round": round_})
                placement.setdefault(f"user-{user}", set()).add(resp.headers["x-upstream"])
    assert all(len(where) == 1 for where in placement.values()), placement
    used = {next(iter(where)) for where in placement.values()}
    # 12 keys all on one of 3 endpoints has probability 3 * (1/3)^12: the hash spreads keys
    assert len(used) >= 2, placement


def test_consistent_hash_without_the_key_still_answers(upstream, weft, free_port):
    ups = [upstream(f"nk{i}") for i in range(2)]
    proxy = weft(simple_config(free_port(), [u.address for u in ups],
                               strategy="consistent_hash",
                               destination_keys={"hash_key": "header:x-user-id"}))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        assert all(client.get("/echo").status_code == 200 for _ in range(4))


def test_least_conn_avoids_the_upstream_holding_a_slow_request(upstream, weft, free_port):
    # Several client connections: assumes one weft worker (pools are per worker).
    ups = [upstream(f"lc{i}") for i in range(3)]
    proxy = weft(simple_config(free_port(), [u.address for u in ups], strategy="least_conn"))

    def slow() -> httpx.Response:
        with httpx.Client(base_url=proxy.url, timeout=15.0) as client:
            return client.get("/slow", params={"delay": 2.5})

    def fast_while_slow_is_in_flight() -> tuple[str, list[str]]:
        # 1. find the upstream that holds the slow request
        busy = wait_for(lambda: [u.name for u in ups if u.stats()["in_flight"] == 1], 5.0,
                        "the slow request at an upstream")
        # 2. everything sent meanwhile goes elsewhere
        with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
            names = _names(client, 20)
        return busy[0], names

    slow_resp, (busy, names) = run_concurrently([slow, fast_while_slow_is_in_flight], timeout=20)
    assert slow_resp.headers["x-upstream"] == busy
    assert busy not in names, f"least_conn sent requests to {busy}, which was busy: {names}"
    assert len(set(names)) == 2, names


# -- one schedule across workers --------------------------------------------------------------


def _names_over_two_workers(sup, port: int, n: int) -> list[str]:
    """`n` sequential requests over a connection on each of the 2 workers, the first worker
    serving two of every three (so no worker's own rotation can line up with the period)."""
    pids = [w["pid"] for w in sup.workers()]
    with contextlib.ExitStack() as stack:
        # 1. a keep-alive connection on each worker (the kernel picks the worker per connection)
        groups = connections_by_worker(sup.weft.host, port, pids,
                                       lambda g: all(len(c) >= 1 for c in g.values()))
        for conns in groups.values():
            for c in conns:
                stack.callback(c.close)
        conns = [groups[pid][0] for pid in pids]
        # 2. worker 1, worker 1, worker 2, worker 1, worker 1, worker 2, ...
        names = []
        for i in range(n):
            conn = conns[0 if i % 3 < 2 else 1]
            conn.send(b"GET /echo HTTP/1.1\r\nHost: weft-test\r\n\r\n")
            resp = conn.read_response()
            assert resp.status == 200, resp
            names.append(resp.header("x-upstream"))
        return names


@pytest.mark.parametrize(
    ("strategy", "weights", "period"),
    [("weighted", (3, 1, 1), 5), ("round_robin", (1, 1, 1), 3)],
    ids=["weighted-3-1-1", "round-robin"],
)
def test_two_workers_follow_one_schedule(upstream, weft, free_port, tmp_path,
                                         strategy, weights, period):
    """With a schedule per worker the requests of each worker follow its own sequence and
    the runs of `period` consecutive requests do not split by the weights (for round robin:
    the first worker has moved on by two, not three, when a request comes back to it). One
    shared position makes every such run one whole period, whichever worker serves it."""
    ups = [upstream(name) for name in ("A", "B", "C")]
    port = free_port()
    endpoints = [{"address": u.address, "weight": w} for u, w in zip(ups, weights, strict=True)]
    sup = start_supervised(weft, tmp_path, simple_config(
        port, endpoints, strategy=strategy, server={"workers": 2}), workers=2)

    names = _names_over_two_workers(sup, port, 8 * period)
    expected = {name: w for name, w in zip("ABC", weights, strict=True)}
    assert Counter(names) == {name: 8 * w for name, w in expected.items()}, names
    for i in range(len(names) - period + 1):
        window = Counter(names[i : i + period])
        assert window == expected, f"requests {i}..{i + period - 1}: {window}; all: {names}"
