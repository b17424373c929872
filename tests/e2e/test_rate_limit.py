"""Rate limits end to end: `python -m weft run` with ``[[routes.rate_limit]]``, real clients
and a real upstream that counts what reaches it.

The exactness test counts at the upstream, over the span the upstream saw: a GCRA bucket of
``rate = "50/s"``, ``burst = 10`` admits 1 + 10 at once and then 50 a second, whatever the
number of workers, because every worker decides on the same shared word.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from support.config import table
from support.procs import wait_for
from support.prometheus import scrape, total
from support.ratelimit import get, hammer, rate_limit_config

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("workers", [4, 1])
def test_a_token_bucket_admits_exactly_its_rate_across_workers(upstream, weft, free_port,
                                                                workers):
    """1. One key (the route) at 50/s with a burst of 10; `workers` workers; 20 clients for
       5 s.
    2. The upstream received 1 + 10 + 50 x (the span it saw) requests, within 2 %: the same
       number whatever the number of workers; everything else was answered 429."""
    up = upstream("up")
    admin_port = free_port()
    proxy = weft(rate_limit_config(free_port(), up.address, workers,
                         [{"key": "route", "rate": "50/s", "burst": 10}])
                 + table("[admin]", {"port": admin_port}))
    up.reset_stats()
    counts = hammer(proxy.host, proxy.port, 20, 5.0)
    stats = up.stats()
    times = stats["requests_times"]
    admitted = stats["requests"]
    expected = 1 + 10 + 50 * (times[-1] - times[0])
    assert abs(admitted - expected) <= 0.02 * expected, (admitted, expected)
    assert counts[200] == admitted
    assert counts.get(429, 0) > 1000  # the clients really asked for far more
    assert set(counts) == {200, 429}
    # 3. the decisions, summed over the workers (each adds its own once a second)
    wanted = {"admitted": counts[200], "rejected": counts[429]}

    def decisions() -> dict[str, float]:
        got = scrape(admin_port)
        return {d: total(got, "weft_rate_limit_decisions_total", route="route0", decision=d)
                for d in wanted}

    wait_for(lambda: decisions() == wanted, 5.0, f"the decision counters to reach {wanted}")


def test_a_refusal_carries_retry_after_and_the_ratelimit_fields(upstream, weft, free_port,
                                                                  tmp_path):
    """Past the burst: 503 (the configured status) with Retry-After and RateLimit fields, and
    the access log says rate_limited; admitted answers carry the fields too."""
    up = upstream("up")
    proxy = weft(rate_limit_config(free_port(), up.address, 1,
                         [{"key": "route", "rate": "1/m", "burst": 1, "status": 503}],
                         access_log=tmp_path / "access.log"))
    first = get(proxy.host, proxy.port)
    assert first[0] == 200
    assert first[1]["ratelimit-policy"] == '"route0.0";q=1;w=60;weft-burst=1'
    assert first[1]["ratelimit"] == '"route0.0";r=1;t=60'
    assert get(proxy.host, proxy.port)[0] == 200
    status, headers = get(proxy.host, proxy.port)
    assert status == 503
    assert 55 <= int(headers["retry-after"]) <= 60
    assert headers["ratelimit"].startswith('"route0.0";r=0;t=')
    assert up.stats()["requests"] == 2
    time.sleep(0.5)
    assert any(r.get("error") == "rate_limited" for r in proxy.access_log_records())


def test_the_leaky_bucket_spaces_queued_requests_at_the_rate(upstream, weft, free_port):
    """10/s with a queue of 4: 8 requests at once. 5 go (one now, four queued), each reaching
    the upstream about 100 ms after the one before; the other 3 are refused at once."""
    up = upstream("up")
    proxy = weft(rate_limit_config(free_port(), up.address, 2,
                         [{"key": "route", "algorithm": "leaky_bucket", "rate": "10/s",
                           "queue": 4}]))
    up.reset_stats()
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(get(proxy.host, proxy.port)[0]))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(results) == [200] * 5 + [429] * 3
    times = up.stats()["requests_times"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 5 and all(0.07 <= g <= 0.2 for g in gaps), gaps


def test_client_ip_keys_come_from_a_trusted_proxy_and_forged_headers_are_ignored(
    upstream, weft, free_port
):
    """1. The loopback peer is a trusted proxy: X-Forwarded-For names the client, so two
       clients behind it have a bucket each.
    2. With the loopback peer untrusted, a forged X-Forwarded-For changes nothing: one bucket.
    3. A header key: each value its own bucket; without the header, the client address."""
    up = upstream("up")
    limit = [{"key": "client_ip", "rate": "1/m", "burst": 0}]
    proxy = weft(rate_limit_config(free_port(), up.address, 1, limit,
                         server={"trusted_proxies": ["127.0.0.0/8"]}))
    a = {"x-forwarded-for": "198.51.100.1"}
    b = {"x-forwarded-for": "198.51.100.2"}
    assert [get(proxy.host, proxy.port, h)[0] for h in (a, b, a, b)] == [200, 200, 429, 429]

    proxy = weft(rate_limit_config(free_port(), up.address, 1, limit,
                         server={"trusted_proxies": ["10.0.0.0/8"]}), name="untrusted")
    assert [get(proxy.host, proxy.port, h)[0] for h in (a, b)] == [200, 429]

    proxy = weft(rate_limit_config(free_port(), up.address, 1,
                         [{"key": "header:x-user", "rate": "1/m", "burst": 0}]), name="header")
    statuses = [get(proxy.host, proxy.port, h)[0]
                for h in ({"x-user": "ann"}, {"x-user": "bob"}, {"x-user": "ann"}, {}, {})]
    assert statuses == [200, 200, 429, 200, 429]


def test_a_full_key_table_is_decided_by_on_full(upstream, weft, free_port):
    """A table of 16 keys and 40 distinct header values: with on_full = "deny" the keys that
    find no room are refused (never a 5xx), with "allow" they go through."""
    up = upstream("up")
    limit = [{"key": "header:x-user", "rate": "100/s", "burst": 10}]
    for on_full, refused in (("deny", True), ("allow", False)):
        proxy = weft(rate_limit_config(free_port(), up.address, 1, limit,
                             rate_table={"capacity": 16, "on_full": on_full}), name=on_full)
        statuses = [get(proxy.host, proxy.port, {"x-user": f"u{i}"})[0] for i in range(40)]
        assert statuses.count(200) >= 16
        assert (429 in statuses) is refused, statuses
        assert set(statuses) <= {200, 429}


def test_buckets_survive_a_reload(upstream, weft, free_port, tmp_path):
    """A key's bucket is a word in the shared table, not in a worker: a client that used its
    burst before `weft reload` is still refused after it, by the new generation."""
    from support.supervised import start_supervised

    up = upstream("up")
    port = free_port()
    text = rate_limit_config(port, up.address, 2, [{"key": "route", "rate": "1/m", "burst": 1}])
    sup = start_supervised(weft, tmp_path, text, workers=2)
    assert [get("127.0.0.1", port)[0] for _ in range(3)] == [200, 200, 429]
    sup.weft.config_path.write_text(text.replace('drain = "2s"', 'drain = "3s"'))
    assert sup.reload().returncode == 0
    sup.wait_workers(2, generation=2)
    assert get("127.0.0.1", port)[0] == 429
    assert up.stats()["requests"] == 2


def test_a_request_waiting_for_its_slot_is_dropped_when_its_client_leaves(
    upstream, weft, free_port, tmp_path
):
    """A leaky bucket at 1/m with a queue: the second request waits for its slot (a minute),
    counted in flight by its worker and holding no upstream connection; its client closes,
    and the wait ends at once (the worker's in-flight count drops to 0 within its heartbeat),
    and the request never reaches the upstream."""
    import socket

    from support.supervised import start_supervised

    up = upstream("up")
    port = free_port()
    text = rate_limit_config(port, up.address, 1, [{"key": "route", "algorithm": "leaky_bucket",
                                                    "rate": "1/m", "queue": 5}])
    sup = start_supervised(weft, tmp_path, text, workers=1)
    assert get("127.0.0.1", port)[0] == 200
    in_flight = lambda: sup.workers()[0]["in_flight"]  # noqa: E731
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: in_flight() == 1, 5, "the request waiting for its slot")
        assert up.stats()["open_connections"] <= 1  # only the first request's, now idle
    wait_for(lambda: in_flight() == 0, 5, "the wait ending when the client left")
    assert up.stats()["requests"] == 1
