"""Active health checks and passive outlier ejection, end to end: `python -m weft run` with
several workers in front of real upstreams that die, come back, or start failing.

What each test proves is in its docstring; the times are derived from the configured interval,
so every bound in an assertion says which rule of the issue it checks. The load is plain
`http.client` threads that record (time, status, upstream) for every answer; which endpoint weft
*tried* (including tries that failed to connect) comes from the access log.
"""

from __future__ import annotations

import datetime
import http.client
import itertools
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from support.config import base_config, destination, route, table
from support.procs import wait_for
from support.supervised import start_supervised

from weft.shm.endpoints import LEASE

pytestmark = pytest.mark.e2e

INTERVAL = 0.5  # seconds between probes of one endpoint
JITTER = 1.1  # the probe interval's +10 %


@dataclass
class Answer:
    at: float  # time.monotonic() when the answer came
    status: int
    upstream: str


@dataclass
class Timeline:
    """Client threads looping GET /echo over keep-alive connections, every answer recorded."""

    host: str
    port: int
    clients: int = 4
    answers: list[Answer] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Timeline:
        for i in range(self.clients):
            t = threading.Thread(target=self._run, name=f"timeline-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            while not self._stop.is_set():
                try:
                    conn.request("GET", "/echo")
                    resp = conn.getresponse()
                    resp.read()
                except (OSError, http.client.HTTPException):
                    with self._lock:
                        self.errors += 1
                    conn.close()
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                    continue
                with self._lock:
                    self.answers.append(
                        Answer(time.monotonic(), resp.status, resp.getheader("x-upstream") or "")
                    )
                self._stop.wait(0.002)  # about 2,000 requests a second over 4 clients at most
        finally:
            conn.close()

    def between(self, start: float, end: float) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if start <= a.at < end]


def _wall(record: dict[str, object]) -> float:
    text = str(record["time"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(text).timestamp()


def _health_config(
    port: int, endpoints: list[str], workers: int, access_log: object, **outlier: object
) -> str:
    text = base_config(port, server={"workers": workers}, access_log=access_log)
    text += destination("app", endpoints)
    text += table(
        "[destinations.app.health]",
        {
            "path": "/healthz",
            "interval": f"{INTERVAL}s",
            "timeout": "250ms",
            "healthy_threshold": 2,
            "unhealthy_threshold": 2,
        },
    )
    if outlier:
        text += table("[destinations.app.outlier]", outlier)
    return text + route("app")


@pytest.mark.parametrize("workers", [2, 4])
def test_a_killed_endpoint_stops_getting_requests_and_returns_with_slow_start(
    upstream, weft, free_port, tmp_path, workers
):
    """1. Three endpoints, probes every 0.5 s, 2 failures make Unhealthy, 2 passes Healthy,
       slow start 3 s, `workers` workers, steady load.
    2. Kill endpoint u1: weft stops trying it within unhealthy_threshold x interval plus one
       interval (the access log's last try at it, against the kill time).
    3. Restart it on the same port: it gets traffic again after healthy_threshold passes, and
       its share ramps up (slow start): in its first second back it gets a clearly smaller
       share than two seconds later."""
    ups = [upstream(f"u{i}") for i in range(3)]
    log = tmp_path / "access.log"
    # The outlier section is here for slow start; its runs are off (0), so that what takes
    # the dead endpoint out is the probes alone.
    proxy = weft(
        _health_config(
            free_port(),
            [u.address for u in ups],
            workers,
            log,
            slow_start="3s",
            consecutive_5xx=0,
            consecutive_gateway_errors=0,
        )
    )
    with Timeline(proxy.host, proxy.port) as load:
        wait_for(lambda: len(load.answers) > 200, 10, "the first answers")
        port = ups[1].port
        killed_wall = time.time()
        ups[1].stop()
        time.sleep(3 * INTERVAL * JITTER + 0.5)
        # 2. No try at the dead endpoint after the detection bound.
        bound = 2 * INTERVAL * JITTER + INTERVAL * JITTER + 0.25  # + one probe timeout
        tries = [
            r
            for r in proxy.access_log_records()
            if r.get("endpoint") == ups[1].address and _wall(r) > killed_wall
        ]
        last = max((_wall(r) - killed_wall for r in tries), default=0.0)
        assert last <= bound, f"the dead endpoint was tried {last:.2f}s after the kill"
        # 3. Back on the same port.
        revived = upstream("u1", port=port)
        back_at = time.monotonic()
        wait_for(
            lambda: any(a.upstream == "u1" for a in load.between(back_at, 1e12)),
            10,
            "traffic to the revived endpoint",
        )
        first_seen = min(a.at for a in load.between(back_at, 1e12) if a.upstream == "u1")
        assert first_seen - back_at <= 2 * INTERVAL * JITTER + INTERVAL * JITTER + 0.5
        time.sleep(3.5)
        early = Counter(a.upstream for a in load.between(first_seen, first_seen + 1.0))
        late = Counter(a.upstream for a in load.between(first_seen + 2.0, first_seen + 3.0))
    share = lambda c: c["u1"] / max(1, sum(c.values()))  # noqa: E731
    assert share(early) < 0.6 * share(late), (early, late)
    assert share(late) > 0.2, late  # ramped up to about a third
    assert revived.stats()["requests"] > 0


def test_one_prober_per_endpoint_across_four_workers_and_a_killed_holder_is_replaced(
    upstream, weft, free_port, tmp_path
):
    """1. Four workers, one endpoint probed every 0.5 s: the upstream sees one probe per
       interval (about 10 in 5 s, not 40).
    2. SIGKILL the worker holding the endpoint's prober lease (read from the shared segment):
       probing goes on, the longest gap between probes stays within two intervals, and the
       lease now has another holder."""
    up = upstream("only")
    text = _health_config(free_port(), [up.address], 4, tmp_path / "access.log")
    sup = start_supervised(weft, tmp_path, text, workers=4)
    time.sleep(1.0)  # every worker's first probe tick has come
    up.reset_stats()
    time.sleep(5.0)
    probes = up.stats()["by_path"].get("/healthz", 0)
    assert 7 <= probes <= 12, f"{probes} probes in 5 s at one per {INTERVAL}s"
    with sup.shared_state() as shared:
        holder = shared.endpoints.load(0, LEASE) >> 40
        pids = [w["pid"] for w in sup.workers()]
        assert holder in pids, (holder, pids)
        killed_at = time.monotonic()
        os.kill(holder, signal.SIGKILL)
        time.sleep(4 * INTERVAL)
        times = [t for t in up.stats()["healthz_times"] if t > killed_at - INTERVAL * JITTER]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert times and times[-1] > killed_at, "no probe after the kill"
        assert max(gaps) <= 2 * INTERVAL * JITTER + 0.1, gaps
        wait_for(lambda: (shared.endpoints.load(0, LEASE) >> 40) not in (0, holder), 5,
                 "a new lease holder")


def test_outlier_ejection_honours_max_ejection_percent_and_the_panic_threshold(
    upstream, weft, free_port, tmp_path
):
    """1. Two endpoints both answering 503, consecutive_gateway_errors 2,
       max_ejection_percent 50: one is ejected and the other always stays in (Envoy's bug of
       ejecting one host whatever the percentage is the case this guards).
    2. Three endpoints, 2 failing, max_ejection_percent 100, panic_threshold 50: once both are
       ejected a third of the destination is usable, below the threshold, so every endpoint
       gets traffic again."""
    a, b = upstream("a"), upstream("b")
    outlier = {
        "consecutive_5xx": 0,
        "consecutive_gateway_errors": 2,
        "base_ejection": "30s",
        "max_ejection_percent": 50,
    }
    text = base_config(free_port(), server={"workers": 2})
    text += destination("app", [a.address, b.address])
    text += table("[destinations.app.outlier]", outlier) + route("app")
    proxy = weft(text)
    a.control(mode="status", code=503)
    b.control(mode="status", code=503)
    with Timeline(proxy.host, proxy.port, clients=2) as load:
        wait_for(lambda: len(load.answers) > 100, 10, "answers")
        time.sleep(0.5)
        mark = time.monotonic()
        time.sleep(1.0)
        after = Counter(x.upstream for x in load.between(mark, 1e12))
    assert len(after) == 1, f"exactly one endpoint stays in: {after}"

    c, d, e = upstream("c"), upstream("d"), upstream("e")
    outlier.update(max_ejection_percent=100, panic_threshold=50)
    text = base_config(free_port(), server={"workers": 2})
    text += destination("app", [c.address, d.address, e.address])
    text += table("[destinations.app.outlier]", outlier) + route("app")
    proxy = weft(text, name="panic")
    c.control(mode="status", code=503)
    d.control(mode="status", code=503)
    with Timeline(proxy.host, proxy.port, clients=2) as load:
        wait_for(lambda: len(load.answers) > 300, 10, "answers")
        mark = time.monotonic()
        time.sleep(1.0)
        after = Counter(x.upstream for x in load.between(mark, 1e12))
    assert set(after) == {"c", "d", "e"}, f"in panic every endpoint gets traffic: {after}"
    assert c.stats()["requests"] > 10 and d.stats()["requests"] > 10


def test_an_endpoint_turning_unhealthy_loses_its_idle_connections_in_every_worker(
    upstream, weft, free_port, tmp_path
):
    """1. Two workers, two endpoints, probes every 0.5 s; load opens pooled keep-alive
       connections from both workers to endpoint `sick`.
    2. A slow request (1.5 s) is in flight on `sick` when its probes start failing (the fault
       applies to /healthz only, so real traffic would still be answered).
    3. Once it is Unhealthy, `sick` has no idle connection left from weft: every worker closed
       its own. The request in flight still finishes with 200."""
    sick, well = upstream("sick"), upstream("well")
    text = _health_config(free_port(), [sick.address, well.address], 2, tmp_path / "access.log")
    proxy = weft(text)
    with Timeline(proxy.host, proxy.port, clients=8) as load:
        wait_for(lambda: len(load.answers) > 400, 10, "answers")
    assert sick.stats()["open_connections"] >= 2
    slow: dict[str, object] = {}

    def slow_request() -> None:
        conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
        slow["tries"] = []
        try:
            # Until one reaches `sick` (round robin): each answer says which endpoint it came from.
            for _ in range(4):
                conn.request("GET", "/slow?delay=1.5")
                resp = conn.getresponse()
                resp.read()
                slow["tries"].append((resp.status, resp.getheader("x-upstream")))  # type: ignore[attr-defined]
                if resp.getheader("x-upstream") == "sick":
                    slow["status"] = resp.status
                    return
        except Exception as e:
            slow["error"] = repr(e)
        finally:
            conn.close()

    t = threading.Thread(target=slow_request, daemon=True)
    t.start()
    wait_for(lambda: sick.stats()["in_flight"] >= 1, 10, "the slow request on sick")
    sick.control(mode="status", code=500, scope="health")
    wait_for(lambda: sick.stats()["open_connections"] <= 1, 2 * INTERVAL * JITTER + 2,
             "weft closing its idle connections to the unhealthy endpoint")
    t.join(timeout=10)
    assert slow.get("status") == 200, slow
    wait_for(lambda: sick.stats()["open_connections"] == 0, 5, "the last connection closing")
