"""The per-endpoint circuit breaker (`weft.adaptive`, `weft.observer`) in the real proxy: four
workers, one shared breaker, 64 keep-alive clients.

The judges are the peers, not weft's word: the upstream records the arrival time of every request
it gets (``requests_times``, on CLOCK_MONOTONIC, the clock of this test and of weft's shared
words), the clients record every answer with its status and Retry-After, and the access log says
why weft answered what it did. The breaker's state word, read from the instance's shared memory
as ``weft status`` reads it, only says *when* the breaker opened, so that the upstream's
timeline can be cut into the open periods it must be silent in.

One destination with one endpoint (column 0 of a fresh instance) throughout: when its breaker is
open no endpoint is left, so every refused request is a 503 ``breaker_open`` the client sees.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.config import base_config, destination, route, table
from support.loads import ClientThreads
from support.procs import Upstream, pid_alive, wait_for
from support.supervised import Supervised, start_supervised

from weft import adaptive
from weft.shm.endpoints import BREAKER, TRIAL
from weft.workers.shared import SharedState

pytestmark = pytest.mark.e2e

WORKERS = 4
CLIENTS = 64
OPEN_FOR = 1.0
# The only endpoint of the only destination: the first column of a fresh instance.
COLUMN = 0
# Requests weft had already admitted when the breaker tripped may reach the upstream just
# after the trip: 64 clients can have that many in flight. They arrive within a few ms; this
# bound is for a loaded 2-core machine.
IN_FLIGHT_AT_TRIP = 0.25


@dataclass(frozen=True)
class Answer:
    """One request of a client, as the client saw it."""

    sent: float  # time.monotonic() before the request was written
    received: float  # ... once the whole response (or the error) was in
    status: int  # 0: no response (connection error)
    retry_after: str | None
    detail: str  # the body's start, or the error


class RecordingLoad(ClientThreads):
    """`clients` threads, each looping ``GET /echo`` on one keep-alive `http.client`
    connection, recording every answer. After a connection error a client reconnects and goes
    on (a worker killed under it is part of a story)."""

    name = "breaker-client"

    def __init__(self, host: str, port: int, *, clients: int = CLIENTS, pause: float = 0.005,
                 timeout: float = 10.0) -> None:
        super().__init__(clients)
        self.host, self.port = host, port
        self.pause = pause
        self.timeout = timeout
        self._lock = threading.Lock()
        self._answers: list[Answer] = []

    def answers(self, since: float = 0.0, until: float = math.inf) -> list[Answer]:
        """Answers received in [since, until)."""
        with self._lock:
            return [a for a in self._answers if since <= a.received < until]

    def count(self, status: int, since: float = 0.0) -> int:
        return sum(1 for a in self.answers(since) if a.status == status)

    def wait_status(self, status: int, n: int, *, since: float = 0.0,
                    timeout: float = 5.0) -> None:
        wait_for(lambda: self.count(status, since) >= n, timeout,
                 f"{n} answers with status {status} since {since:.3f}")

    def _run(self, client: int) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    conn.request("GET", "/echo", headers={"Host": "weft-test"})
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    answer = Answer(sent, time.monotonic(), 0, None, repr(e))
                    conn.close()
                else:
                    answer = Answer(sent, time.monotonic(), resp.status,
                                    resp.getheader("retry-after"),
                                    body[:120].decode("latin-1"))
                with self._lock:
                    self._answers.append(answer)
                self._stop.wait(self.pause)
        finally:
            conn.close()


def breaker_config(port: int, up: Upstream, access_log: Path, **breaker: object) -> str:
    values: dict[str, object] = {"failure_rate": 50, "minimum_calls": 20, "window": "10s",
                                 "open_for": f"{OPEN_FOR:g}s", "max_open_for": "60s"}
    values.update(breaker)
    return (base_config(port, server={"workers": WORKERS}, access_log=access_log)
            + destination("app", [up.address])
            + table("[destinations.app.breaker]", values)
            + route("app"))


def failing_behind_breaker(upstream, weft, free_port, tmp_path, **breaker: object
                           ) -> tuple[Upstream, int, Supervised]:
    """An upstream answering 500, and `WORKERS` workers in front of it with a breaker (keys
    of `breaker_config`, overridden by `breaker`), all READY: (upstream, port, supervised)."""
    up = upstream("up")
    up.control(mode="status", code=500)
    port = free_port()
    sup = start_supervised(weft, tmp_path, breaker_config(port, up, tmp_path / "access.log",
                                                          **breaker), workers=WORKERS)
    return up, port, sup


def breaker(state: SharedState) -> adaptive.Breaker:
    return adaptive.unpack(state.endpoints.load(COLUMN, BREAKER))


def wait_opened(state: SharedState, trips: int = 1, timeout: float = 5.0) -> float:
    """Wait until the breaker is OPEN for the `trips`-th time in a row; return when it opened
    (seconds on time.monotonic()'s clock)."""
    def opened() -> adaptive.Breaker | None:
        b = breaker(state)
        return b if b.state is adaptive.OPEN and b.trips == trips else None

    b = wait_for(opened, timeout, f"the breaker to open (trips={trips}); word now {breaker(state)}")
    return b.since_ms / 1000


def arrivals(up: Upstream, since: float, until: float = math.inf) -> list[float]:
    """When the upstream received the requests that arrived in (since, until)."""
    return [t for t in up.stats()["requests_times"] if since < t < until]


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def test_a_tripped_breaker_answers_503_with_retry_after_and_the_upstream_hears_nothing(
        upstream, weft, free_port, tmp_path):
    """1. four workers, one endpoint whose upstream answers 500 to everything;
    2. 64 keep-alive clients loop requests: the first answers are the upstream's 500s, and
       after 20 calls (100 % failed) the breaker, shared by the workers, trips;
    3. for open_for the clients get 503 with a Retry-After, the access log says
       ``breaker_open`` with no endpoint, and the upstream receives nothing (but what weft had
       already sent when it tripped)."""
    up, port, sup = failing_behind_breaker(upstream, weft, free_port, tmp_path)

    with sup.shared_state() as state, RecordingLoad(sup.weft.host, port) as load:
        # 2. the upstream's 500s reach the clients until the breaker trips
        load.wait_status(500, 1)
        opened = wait_opened(state)
        # 3. the whole open period passes under the load
        closes = opened + OPEN_FOR
        sleep_until(closes)
        load.wait_status(503, 1, since=closes)  # (the load was flowing all along)
    answers = load.answers()

    # 2. it took minimum_calls failed calls to trip it (the trip's time is in whole
    #    milliseconds, so calls that arrived in its last millisecond count too)
    assert len(arrivals(up, 0.0, opened + 0.001)) >= 20
    # 3. the upstream heard nothing from just after the trip to the end of the open period
    silent_from = opened + IN_FLIGHT_AT_TRIP
    late = arrivals(up, opened, silent_from)
    assert len(late) <= CLIENTS, f"{len(late)} requests right after the trip"
    assert arrivals(up, silent_from, closes) == []
    # 3. while it was open, every answer was weft's 503 with a Retry-After within open_for
    during = [a for a in answers if silent_from <= a.sent and a.received < closes]
    assert len(during) >= CLIENTS, f"only {len(during)} answers in the open period"
    assert {a.status for a in during} == {503}, sorted({a.status for a in during})
    for a in during:
        assert a.retry_after is not None and a.retry_after.isdigit(), a
        assert 1 <= int(a.retry_after) <= math.ceil(OPEN_FOR), a
        assert "circuit breaker" in a.detail, a
    # 3. the access log has every 503 the clients got, each one breaker_open, none of them
    #    sent to an endpoint
    refused = sum(1 for a in answers if a.status == 503)

    def logged_503s() -> list[dict[str, object]] | None:
        records = [r for r in sup.weft.access_log_records() if r["status"] == 503]
        return records if len(records) >= refused else None

    records = wait_for(logged_503s, 5.0, f"{refused} 503s in the access log")
    assert {r["error"] for r in records} == {"breaker_open"}
    assert {r["endpoint"] for r in records} == {None}
    assert {r["upstream_ms"] for r in records} == {None}


def test_after_open_for_exactly_one_trial_reaches_the_upstream_and_its_success_closes_it(
        upstream, weft, free_port, tmp_path):
    """1. the breaker trips on the upstream's 500s, under 64 clients and four workers;
    2. while it is open the upstream recovers, but slowly: it answers 200 after 1 s;
    3. once open_for is over, one request, the half-open trial, reaches the upstream; for the
       whole second the trial takes, it is the only one (the other 63 clients and 3 workers
       are refused), and the trial is held by one of the workers (the shared TRIAL word);
    4. its success closes the breaker, and the traffic flows again: 200s."""
    delay = 1.0
    up, port, sup = failing_behind_breaker(upstream, weft, free_port, tmp_path)
    workers = set(sup.weft.worker_pids())

    with sup.shared_state() as state, RecordingLoad(sup.weft.host, port) as load:
        # 1. tripped
        opened = wait_opened(state)
        # 2. the upstream recovers during the open period (once the requests weft had sent
        #    before the trip got their 500s; the trial cannot have begun)
        sleep_until(opened + IN_FLIGHT_AT_TRIP)
        up.control(mode="slow", delay=delay)
        assert time.monotonic() < opened + OPEN_FOR, "too late: the open period is over"
        # 3. the trial arrives once open_for is over ...
        first = wait_for(lambda: arrivals(up, opened + IN_FLIGHT_AT_TRIP), OPEN_FOR + 3.0,
                         "the half-open trial to reach the upstream")
        trial = first[0]
        assert opened + OPEN_FOR <= trial < opened + OPEN_FOR + 0.5, trial - opened
        # ... and is held, while the upstream sleeps on it, by one worker, in HALF_OPEN
        held_by = state.endpoints.load(COLUMN, TRIAL)
        assert held_by in workers, (held_by, workers)
        assert breaker(state).state is adaptive.HALF_OPEN
        # 4. it succeeds: the breaker closes and 200s come back
        closed = wait_for(lambda: breaker(state).state is adaptive.CLOSED and breaker(state),
                          delay + 3.0, "the breaker to close after the trial")
        assert closed.trips == 0
        assert state.endpoints.load(COLUMN, TRIAL) == 0
        up.control()
        load.wait_status(200, 2 * CLIENTS, since=trial + delay, timeout=10.0)
    answers = load.answers()

    # 3. in the trial's second the upstream got exactly one request: the trial
    seen = arrivals(up, opened, trial + delay)
    assert arrivals(up, opened + IN_FLIGHT_AT_TRIP, trial + delay) == [trial], (
        [round(t - opened, 4) for t in seen])
    # every other client was refused meanwhile, and exactly one was answered by the trial
    during = [a for a in answers if trial < a.sent and a.received < trial + delay]
    assert len(during) >= CLIENTS
    assert {a.status for a in during} == {503}
    assert sum(1 for a in answers if a.status == 200 and a.sent < trial < a.received) == 1
    # 4. after the trial, traffic reached the upstream again
    assert len(arrivals(up, trial + delay)) >= 2 * CLIENTS
    assert closed.since_ms / 1000 >= trial + delay - 0.001  # (whole milliseconds)


def test_a_failed_trial_reopens_the_breaker_for_twice_as_long_up_to_max_open_for(
        upstream, weft, free_port, tmp_path):
    """1. the breaker trips on the upstream's 500s (open_for 1 s, max_open_for 3 s);
    2. the upstream keeps failing, so each trial fails: the upstream sees one request after
       1 s, the next 2 s after that, the next 3 s after that (not 4 s: max_open_for);
    3. and nothing in between: each reopening is an open period of its own."""
    max_open_for = 3.0
    up, port, sup = failing_behind_breaker(upstream, weft, free_port, tmp_path,
                                           max_open_for=f"{max_open_for:g}s")

    with sup.shared_state() as state, RecordingLoad(sup.weft.host, port):
        # 1. tripped
        opened = wait_opened(state)
        # 2. three trials, each failing
        def three_trials() -> list[float] | None:
            seen = arrivals(up, opened + IN_FLIGHT_AT_TRIP)
            return seen if len(seen) >= 3 else None

        trials = wait_for(three_trials, OPEN_FOR + 2 * OPEN_FOR + max_open_for + 4.0,
                          "three trials")
        # each failed trial reopened it, one opening more in a row
        wait_opened(state, trips=4, timeout=2.0)
        # look again a second after the third trial: nothing more came in the meantime
        sleep_until(trials[2] + 1.0)
        trials = arrivals(up, opened + IN_FLIGHT_AT_TRIP)

    assert len(trials) == 3, [round(t - opened, 3) for t in trials]
    gaps = [trials[0] - opened, trials[1] - trials[0], trials[2] - trials[1]]
    shown = [round(g, 3) for g in gaps]
    # 2. after open_for; after 2 x open_for; after max_open_for, not 4 x open_for
    assert OPEN_FOR <= gaps[0] < OPEN_FOR + 0.5, shown
    assert 1.8 * OPEN_FOR <= gaps[1] < 2 * OPEN_FOR + 0.5, shown
    assert 0.9 * max_open_for <= gaps[2] < max_open_for + 0.5, shown
    assert up.stats()["status_counts"].keys() == {"500"}


def test_a_sigkilled_worker_holding_the_trial_does_not_stall_the_breaker(
        upstream, weft, free_port, tmp_path):
    """1. the breaker trips on the upstream's 500s; while it is open the upstream starts to
       hang (reads requests, answers nothing);
    2. the trial comes and hangs: one request in flight at the upstream, none other, and the
       shared TRIAL word names the worker that holds it;
    3. SIGKILL that worker; the upstream recovers;
    4. the supervisor frees the dead worker's trial, so the next request is a new trial: the
       upstream hears it within a second or two, it succeeds, and every client gets 200s."""
    up, port, sup = failing_behind_breaker(upstream, weft, free_port, tmp_path)
    workers = set(sup.weft.worker_pids())

    with sup.shared_state() as state, RecordingLoad(sup.weft.host, port) as load:
        # 1. tripped; the upstream hangs from now on (once the requests weft had sent before
        #    the trip got their 500s)
        opened = wait_opened(state)
        sleep_until(opened + IN_FLIGHT_AT_TRIP)
        up.control(mode="hang")
        assert time.monotonic() < opened + OPEN_FOR, "too late: the open period is over"
        # 2. the trial is out, and hangs
        trial = wait_for(lambda: arrivals(up, opened + IN_FLIGHT_AT_TRIP), OPEN_FOR + 3.0,
                         "the half-open trial to reach the upstream")[0]
        holder = wait_for(lambda: state.endpoints.load(COLUMN, TRIAL), 2.0,
                          "the trial's holder in the TRIAL word")
        assert holder in workers, (holder, workers)
        assert breaker(state).state is adaptive.HALF_OPEN
        time.sleep(0.5)  # the trial hangs: nobody else gets through meanwhile
        stats = up.stats()
        assert stats["in_flight"] == 1, stats["in_flight"]
        assert arrivals(up, opened + IN_FLIGHT_AT_TRIP) == [trial]
        assert state.endpoints.load(COLUMN, TRIAL) == holder
        # 3. kill the holder; the upstream is well again
        kill_at = time.monotonic()
        os.kill(holder, signal.SIGKILL)
        up.control()
        wait_for(lambda: not pid_alive(holder), 2.0, "the killed worker to be gone")
        # 4. the trial word is freed, and the next request is the next trial
        wait_for(lambda: state.endpoints.load(COLUMN, TRIAL) != holder, 2.0,
                 "the supervisor to free the dead worker's trial")
        nxt = wait_for(lambda: arrivals(up, trial), 3.0,
                       "a new trial to reach the upstream after the kill")[0]
        wait_for(lambda: breaker(state).state is adaptive.CLOSED, 3.0,
                 "the breaker to close after the new trial")
        load.wait_status(200, 2 * CLIENTS, since=nxt, timeout=10.0)
        sup.wait_workers(WORKERS, timeout=5.0, exclude=[holder])

    assert nxt - kill_at < 2.0, nxt - kill_at
    # before the kill the hung trial was the only request the upstream got since the trip
    assert arrivals(up, opened + IN_FLIGHT_AT_TRIP, kill_at) == [trial]


def test_an_answer_to_a_request_sent_before_the_trip_does_not_decide_the_trial(
        upstream, weft, free_port, tmp_path):
    """One worker, so that the late answer and the trial are in the same process.

    1. a slow request is in flight (the upstream answers it 200 after 2.5 s);
    2. the upstream fails: five 500s trip the breaker (minimum_calls 5);
    3. the upstream hangs from now on; after open_for the trial goes out and hangs;
    4. the slow request, sent before the trip, gets its 200 while the trial is out. It is not
       the trial: the breaker stays HALF_OPEN with the trial out, the next requests are
       refused (503 breaker_open), and the hanging upstream gets no second request."""
    up = upstream("up")
    port = free_port()
    sup = start_supervised(weft, tmp_path, (
        base_config(port, server={"workers": 1})
        + destination("app", [up.address])
        + table("[destinations.app.breaker]", {"minimum_calls": 5, "open_for": f"{OPEN_FOR:g}s"})
        + route("app")), workers=1)
    worker = sup.weft.worker_pids()[0]

    def get(path: str, timeout: float = 5.0) -> tuple[int, str | None]:
        conn = http.client.HTTPConnection(sup.weft.host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Host": "weft-test"})
            resp = conn.getresponse()
            resp.read()
            return resp.status, resp.getheader("retry-after")
        finally:
            conn.close()

    with sup.shared_state() as state, contextlib.ExitStack() as stack:
        def in_background(path: str) -> list[object]:
            out: list[object] = []

            def run() -> None:
                try:
                    out.append(get(path, timeout=10.0))
                except OSError as e:
                    out.append(e)

            t = threading.Thread(target=run, daemon=True)
            t.start()
            stack.callback(t.join, 12.0)
            return out

        # 1. the slow request is in flight
        slow = in_background("/slow?delay=2.5")
        wait_for(lambda: up.stats()["in_flight"] == 1, 2.0, "the slow request at the upstream")
        # 2. five failures trip the breaker
        up.control(mode="status", code=500)
        assert [get("/echo")[0] for _ in range(5)] == [500] * 5
        opened = wait_opened(state, timeout=1.0)
        assert get("/echo")[0] == 503
        # 3. the trial hangs
        up.control(mode="hang")
        sleep_until(opened + OPEN_FOR)
        in_background("/echo")
        stack.callback(up.control)  # first thing on the way out: the hung trial ends
        wait_for(lambda: state.endpoints.load(COLUMN, TRIAL) == worker, 2.0, "the trial out")
        wait_for(lambda: up.stats()["in_flight"] == 2, 2.0, "the trial at the upstream")
        # 4. the slow request is answered while the trial hangs
        wait_for(lambda: slow, 5.0, "the answer to the slow request")
        assert slow == [(200, None)]
        time.sleep(0.2)
        assert breaker(state).state is adaptive.HALF_OPEN, breaker(state)
        assert state.endpoints.load(COLUMN, TRIAL) == worker
        status, retry_after = get("/echo", timeout=2.0)
        assert status == 503 and retry_after == "1"
        assert up.stats()["in_flight"] == 1  # the trial alone
