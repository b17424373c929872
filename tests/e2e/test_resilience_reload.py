"""What `weft reload` does to the resilience state of endpoints: outlier ejections and open
circuit breakers live in the instance's shared memory, one record per endpoint column
(`weft.shm.endpoints`), and a reload keeps the column of every endpoint that still exists.

So a reload must not forgive an endpoint: an ejected one stays ejected and an open breaker stays
open, with the same words, for the new generation of workers. And a column that a reload hands
to a new endpoint must not pass on what its last endpoint did: the record is zeroed first.

The judges: the upstreams' request counters (``/stats``) say who was contacted, the clients see
the answers, and the shared words (read as ``weft status`` reads the segment) say what weft
believes. Columns are given in config order from 0 in a fresh instance, and a freed column is
given to the next new endpoint (`weft.workers.shared.ColumnMap`).
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from pathlib import Path

import pytest
from support.config import base_config, destination, route, table
from support.procs import Upstream, unique_instance, wait_for
from support.supervised import Supervised, start_supervised

from weft import adaptive, outlier
from weft.observer import monotonic_ms
from weft.shm.endpoints import BREAKER, OUTLIER

pytestmark = pytest.mark.e2e

WORKERS = 2
OUTLIER_SECTION = {"consecutive_gateway_errors": 1, "consecutive_5xx": 0,
                   "base_ejection": "60s", "max_ejection_percent": 50}
# A 60 s window: what an endpoint's window counted stays in it for the whole test.
BREAKER_SECTION = {"minimum_calls": 5, "open_for": "60s", "max_open_for": "60s",
                   "window": "60s"}


def config(port: int, instance: str, endpoints: list[Upstream], access_log: Path, *,
           upstream_header: str = "10s") -> str:
    """Destination "app" over `endpoints` (round robin) with an [outlier] section that ejects
    on one gateway error and a breaker that opens on 5 calls for 60 s (60 s window)."""
    return (base_config(port, instance=instance, server={"workers": WORKERS},
                        access_log=access_log)
            + destination("app", [u.address for u in endpoints])
            + table("[destinations.app.outlier]", OUTLIER_SECTION)
            + table("[destinations.app.breaker]", BREAKER_SECTION)
            + route("app", timeouts={"upstream_header": upstream_header}))


# What a client saw: (status, x-upstream, retry-after, body start).
Answer = tuple[int, str | None, str | None, str]


def get(port: int) -> Answer:
    """GET /echo on a fresh connection: (status, x-upstream, retry-after, body start)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    try:
        conn.request("GET", "/echo", headers={"Host": "weft-test", "Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        return (resp.status, resp.getheader("x-upstream"), resp.getheader("retry-after"),
                body[:120].decode("latin-1"))
    finally:
        conn.close()


def send_until(port: int, done: Callable[[], bool], what: str, limit: int = 60
               ) -> list[Answer]:
    """Send requests one at a time until `done()` holds; the answers. AssertionError after
    `limit` requests."""
    answers = []
    for _ in range(limit):
        answers.append(get(port))
        if done():
            return answers
    raise AssertionError(f"{what}: not after {limit} requests; answers: {answers}")


def reload_to(sup: Supervised, text: str, generation: int) -> None:
    """Write the config, `weft reload`, and wait until only the new generation runs (the old
    one has exited: what it held is released)."""
    assert sup.weft.config_path is not None
    sup.weft.config_path.write_text(text)
    result = sup.reload(timeout=15.0)
    assert result.returncode == 0, result.stdout + result.stderr + sup.weft.diagnostics()
    sup.wait_workers(WORKERS, generation=generation, timeout=10.0)


def test_an_ejection_and_an_open_breaker_survive_a_reload(upstream, weft, free_port,
                                                          tmp_path):
    """1. endpoints A (column 0) and B (column 1) serve 200s;
    2. A answers 503: one gateway error ejects it for 60 s;
    3. B answers 500 (it is not ejected: consecutive_5xx is off) until its breaker opens;
       now no endpoint is left: 503 breaker_open, no upstream contact;
    4. `weft reload` with a changed route timeout; only the new generation runs;
    5. it is still so: 503 breaker_open with Retry-After, neither upstream hears a request,
       A's outlier word and B's breaker word are the very words of before the reload."""
    a, b = upstream("A"), upstream("B")
    port, instance, access_log = free_port(), unique_instance(), tmp_path / "access.log"
    sup = start_supervised(weft, tmp_path, config(port, instance, [a, b], access_log),
                           workers=WORKERS)

    with sup.shared_state() as state:
        def ejected_a() -> bool:
            return outlier.is_ejected(state.endpoints.load(0, OUTLIER), monotonic_ms())

        def open_b() -> bool:
            return adaptive.unpack(state.endpoints.load(1, BREAKER)).state is adaptive.OPEN

        # 1. both serve
        served = {get(port)[1] for _ in range(4)}
        assert served == {"A", "B"}
        # 2. A's first 503 ejects it
        a.control(mode="status", code=503)
        answers = send_until(port, ejected_a, "A ejected")
        assert answers[-1][:2] == (503, "A"), answers
        assert {x[:2] for x in answers[:-1]} <= {(200, "B")}, answers
        # 3. B fails until its breaker opens; A stays ejected meanwhile
        b.control(mode="status", code=500)
        answers = send_until(port, open_b, "B's breaker open")
        assert {(s, u) for s, u, _, _ in answers} == {(500, "B")}
        assert ejected_a()
        status, _, retry_after, body = get(port)
        assert status == 503 and "circuit breaker" in body, body
        assert retry_after is not None and 55 <= int(retry_after) <= 60, retry_after
        words = (state.endpoints.load(0, OUTLIER), state.endpoints.load(1, BREAKER))
        # 4. reload with a changed config
        a.reset_stats()
        b.reset_stats()
        reload_to(sup, config(port, instance, [a, b], access_log, upstream_header="20s"),
                  generation=2)
        # 5. the new generation refuses as the old one did
        after = [get(port) for _ in range(10)]
        assert {s for s, _, _, _ in after} == {503}, after
        for _, _, retry_after, body in after:
            assert retry_after is not None and 40 <= int(retry_after) <= 60, after
            assert "circuit breaker" in body
        assert a.stats()["requests"] == 0
        assert b.stats()["requests"] == 0
        assert (state.endpoints.load(0, OUTLIER), state.endpoints.load(1, BREAKER)) == words
        assert ejected_a() and open_b()
        assert adaptive.unpack(words[1]).trips == 1

    # the access log says why: the 503s of weft's own (not A's) are all breaker_open
    def refusals() -> list[dict[str, object]] | None:
        out = [r for r in sup.weft.access_log_records() if r["status"] == 503 and r["error"]]
        return out if len(out) >= 11 else None

    records = wait_for(refusals, 5.0, "the 11 refusals in the access log")
    assert {r["error"] for r in records} == {"breaker_open"}
    assert {r["endpoint"] for r in records} == {None}


def test_a_new_endpoint_in_a_removed_ones_column_does_not_inherit_its_open_breaker(
        upstream, weft, free_port, tmp_path):
    """1. endpoints A (column 0) and B (column 1); B answers 500 until its breaker opens for
       60 s; A serves everything;
    2. a reload removes B; once B's workers have exited its column is free again, and still
       holds B's open breaker;
    3. a reload adds C, a healthy upstream: it takes the first free column, B's;
    4. that record was zeroed for it: C is served (half of the requests, round robin), and
       the breaker word of column 1 is CLOSED; A, which kept column 0, kept its record (its
       breaker window still counts every call it served)."""
    a, b, c = upstream("A"), upstream("B"), upstream("C")
    port, instance, access_log = free_port(), unique_instance(), tmp_path / "access.log"
    sup = start_supervised(weft, tmp_path, config(port, instance, [a, b], access_log),
                           workers=WORKERS)

    with sup.shared_state() as state:
        def breaker_of(column: int) -> adaptive.Breaker:
            return adaptive.unpack(state.endpoints.load(column, BREAKER))

        def calls_of(column: int) -> int:
            """Calls counted in the column's breaker window (since it last closed)."""
            return adaptive.window_totals(state.endpoints.window(column), monotonic_ms(),
                                          60_000, breaker_of(column).since_ms)[0]

        # 1. B's breaker opens; A's 200s go on
        b.control(mode="status", code=500)
        answers = send_until(port, lambda: breaker_of(1).state is adaptive.OPEN,
                             "B's breaker open")
        assert {(s, u) for s, u, _, _ in answers} <= {(200, "A"), (500, "B")}
        assert {get(port)[:2] for _ in range(4)} == {(200, "A")}
        a_calls = calls_of(0)
        # 2. B removed
        reload_to(sup, config(port, instance, [a], access_log), generation=2)
        assert {get(port)[:2] for _ in range(4)} == {(200, "A")}
        assert breaker_of(1).state is adaptive.OPEN  # a retired column is left as it was
        # 3. C added
        c.reset_stats()
        reload_to(sup, config(port, instance, [a, c], access_log), generation=3)
        # 4. C is served: it did not inherit B's open breaker
        served = [get(port)[:2] for _ in range(10)]
        assert sorted(served) == [(200, "A")] * 5 + [(200, "C")] * 5, served
        assert c.stats()["requests"] == 5
        assert breaker_of(1) == adaptive.Breaker(adaptive.CLOSED, 0, 0)
        # A's window kept counting across both reloads: 4 calls after reload 2, 5 after 3
        assert calls_of(0) == a_calls + 4 + 5
