"""Stopping weft: SIGTERM drains (in-flight requests finish, within ``[timeouts] drain``), then
weft exits 0 and leaves nothing behind: no process, no listening socket, no shm segment."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest
from support.clients import run_concurrently
from support.config import simple_config
from support.procs import pid_alive, port_accepts, wait_for
from support.rawhttp import RawConnection

pytestmark = pytest.mark.e2e


def _slow(url: str, delay: float) -> httpx.Response | Exception:
    try:
        with httpx.Client(timeout=20.0) as client:
            return client.get(f"{url}/slow", params={"delay": delay})
    except httpx.HTTPError as e:
        return e


def test_sigterm_lets_an_in_flight_request_finish(upstream, weft, free_port):
    up = upstream("drain")
    proxy = weft(simple_config(free_port(), [up.address], timeouts={"drain": "10s"}))

    def terminate_while_in_flight() -> tuple[int, float]:
        wait_for(lambda: up.stats()["in_flight"] == 1, 5.0, "the slow request at the upstream")
        start = time.monotonic()
        proxy.signal(signal.SIGTERM)
        # 2. no new connections once draining (bounded poll for the listener to go away)
        wait_for(lambda: not port_accepts(proxy.host, proxy.port) or not proxy.alive(), 5.0,
                 "the listener to close")
        rc = proxy.proc.wait(timeout=15.0)
        return rc, time.monotonic() - start

    # 1. a request that needs 1.5 s is in flight when SIGTERM arrives
    resp, (rc, exit_after) = run_concurrently([lambda: _slow(proxy.url, 1.5),
                                                terminate_while_in_flight], timeout=30.0)
    assert isinstance(resp, httpx.Response), f"the in-flight request failed: {resp!r}"
    assert resp.status_code == 200
    # 3. weft exits cleanly once the last request is done, well before the drain deadline
    assert rc == 0, proxy.diagnostics()
    assert exit_after < 8.0


GET = b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n"


def _drain_config(port: int, up: str, **timeouts: str) -> str:
    return simple_config(port, [up], timeouts={"drain": "10s", "client_keepalive": "60s",
                                                "drain_idle": "2s", **timeouts})


def test_a_draining_worker_answers_a_request_on_an_idle_connection(upstream, weft, free_port):
    """A client that reuses its keep-alive connection just after the drain began (without
    checking it first, as http.client and wrk do) gets its answer, with Connection: close, and
    then a clean close (FIN, not a reset)."""
    up = upstream("late")
    proxy = weft(_drain_config(free_port(), up.address))
    with RawConnection(proxy.port) as conn:
        conn.send(GET)
        first = conn.read_response()
        assert first.status == 200 and not first.connection_close
        proxy.signal(signal.SIGTERM)
        time.sleep(1.3)  # the drain is under way; the connection has been idle < drain_idle
        assert not conn.peer_closed(timeout=0.0)
        conn.send(GET)
        second = conn.read_response(timeout=5.0)
        assert second.status == 200
        assert second.connection_close, second.headers
        assert conn.how_closed(timeout=5.0) == "fin"
    assert proxy.proc.wait(timeout=10.0) == 0


def test_a_draining_worker_closes_an_idle_connection_after_drain_idle(upstream, weft,
                                                                      free_port):
    """Idle time counts from the connection's last response: a connection that has been idle
    for less than drain_idle is closed when it reaches drain_idle, one idle longer at once;
    both with a FIN."""
    up = upstream("idle")
    proxy = weft(_drain_config(free_port(), up.address))
    with RawConnection(proxy.port) as old, RawConnection(proxy.port) as recent:
        old.send(GET)
        assert old.read_response().status == 200
        time.sleep(2.5)  # longer than drain_idle
        recent.send(GET)
        assert recent.read_response().status == 200
        start = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert old.how_closed(timeout=1.0) == "fin"
        assert time.monotonic() - start < 1.0
        assert recent.how_closed(timeout=5.0) == "fin"
        closed_after = time.monotonic() - start
    assert 1.5 <= closed_after < 3.5, f"closed {closed_after:.2f}s after SIGTERM, drain_idle 2s"
    assert proxy.proc.wait(timeout=10.0) == 0


@pytest.mark.parametrize(
    ("timeouts", "bound"),
    [
        # an idle connection does not hold the drain for its whole deadline: drain_idle ends it
        pytest.param({}, 5.0, id="drain-idle"),
        # timeouts.drain bounds everything, drain_idle included
        pytest.param({"drain": "1s", "drain_idle": "30s"}, 3.0, id="drain-deadline"),
    ],
)
def test_an_idle_keepalive_connection_does_not_hold_the_stop(upstream, weft, free_port,
                                                             timeouts, bound):
    up = upstream("idle")
    proxy = weft(_drain_config(free_port(), up.address, **timeouts))
    with RawConnection(proxy.port) as conn:
        conn.send(GET)
        assert conn.read_response().status == 200
        start = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert conn.peer_closed(timeout=5.0)
        rc = proxy.proc.wait(timeout=10.0)
    assert rc == 0
    assert time.monotonic() - start < bound


def test_drain_deadline_bounds_the_stop(upstream, weft, free_port):
    up = upstream("stuck")
    proxy = weft(simple_config(free_port(), [up.address], timeouts={"drain": "700ms"}))

    def terminate() -> float:
        wait_for(lambda: up.stats()["in_flight"] == 1, 5.0, "the slow request at the upstream")
        start = time.monotonic()
        proxy.signal(signal.SIGTERM)
        try:
            proxy.proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            return float("inf")
        return time.monotonic() - start

    resp, exit_after = run_concurrently([lambda: _slow(proxy.url, 8.0), terminate], timeout=30.0)
    assert exit_after < 3.0, f"weft took {exit_after:.2f}s to stop with drain = 700ms"
    # the request could not finish: it was answered with an error or its connection closed
    assert not (isinstance(resp, httpx.Response) and resp.status_code == 200)


def test_stop_leaves_nothing_behind(upstream, weft, free_port):
    up = upstream("clean")
    proxy = weft(simple_config(free_port(), [up.address]))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        assert client.get("/echo").status_code == 200
    pids = proxy.pids()
    assert proxy.stop() == 0
    assert not any(pid_alive(p) for p in pids)
    assert not port_accepts(proxy.host, proxy.port)
    assert proxy.leftover_shm() == []


def test_sigint_stops_too(upstream, weft, free_port):
    up = upstream("int")
    proxy = weft(simple_config(free_port(), [up.address]))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        assert client.get("/echo").status_code == 200
    proxy.signal(signal.SIGINT)
    assert proxy.proc.wait(timeout=10.0) == 0, proxy.diagnostics()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_right_after_the_listener_opens_still_stops_cleanly(upstream, weft, free_port,
                                                                      signum):
    # The moment the port accepts, weft is visible to clients and to a supervisor (systemd,
    # a test): a stop request then must be handled like any other, not crash the start-up.
    up = upstream("early")
    proxy = weft(simple_config(free_port(), [up.address]))
    proxy.signal(signum)
    rc = proxy.proc.wait(timeout=10.0)
    assert rc == 0, proxy.diagnostics()
    assert "Traceback" not in proxy.stderr_text()
