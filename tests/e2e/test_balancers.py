"""Balancing strategies over real requests and real upstreams.

Every upstream stamps its name on the response (``x-upstream``), so the distribution is counted
from what the client received. Requests go over one keep-alive client connection, so one weft
worker (one balancer state) makes every choice.
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from support.clients import run_concurrently
from support.config import simple_config
from support.procs import wait_for

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
