"""The test upstream's run-time faults (``/control``) and the /stats fields that observe them.

Tests of health checks, outlier ejection, the circuit breaker and retries rely on these modes
doing exactly what they say; here each is checked against the upstream directly, no weft
involved. One upstream serves the whole module (a start costs ~0.3 s); every test begins with
the faults off and the counters cleared. Every wait is bounded: client sockets time out.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import procs
from support.procs import Upstream, wait_for

# A client's patience with a healthy upstream: far above any answer here, far below a hang.
TIMEOUT = 5.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@pytest.fixture(scope="module")
def shared_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    up = procs.start_upstream("faulty", Path(tmp_path_factory.mktemp("upstream-faults")))
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def up(shared_upstream: Upstream) -> Upstream:
    """The module's upstream, healthy and with fresh counters."""
    shared_upstream.control()
    shared_upstream.reset_stats()
    return shared_upstream


def request(up: Upstream, path: str, *, method: str = "GET", body: bytes | None = None,
            conn: http.client.HTTPConnection | None = None,
            timeout: float = TIMEOUT) -> Answer:
    """One request, on ``conn`` or on a fresh connection closed afterwards."""
    own = conn is None
    c = conn or http.client.HTTPConnection(up.host, up.port, timeout=timeout)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        if own:
            c.close()


def test_control_answers_the_whole_setting_and_refuses_nonsense(up):
    setting = up.control(mode="status", code=503, retry_after=2)
    assert {k: setting[k] for k in ("mode", "code", "retry_after", "delay", "period", "degraded",
                                    "scope")} == {
        "mode": "status", "code": 503, "retry_after": "2", "delay": None, "period": None,
        "degraded": False, "scope": "all"}
    assert up.stats()["faults"] == setting
    # A call replaces the whole setting: what it does not give is back to the default.
    assert up.control(degraded=True)["mode"] == "ok"
    for bad in ({"mode": "explode"}, {"mode": "status"}, {"mode": "status", "code": 99},
                {"mode": "ok", "code": 500}, {"mode": "flap"}, {"mode": "slow"},
                {"scope": "some"}, {"degraded": 2}, {"retry-after": 1}):
        with pytest.raises(AssertionError, match="400"):
            up.control(**bad)


def test_control_and_stats_requests_are_not_counted(up):
    up.control(mode="status", code=500)
    up.control()
    up.stats()
    stats = up.stats()
    assert stats["connections_accepted"] == 0
    assert stats["requests"] == 0 and stats["by_path"] == {}
    assert stats["status_counts"] == {} and stats["requests_times"] == []
    before = time.monotonic()
    assert request(up, "/echo").status == 200
    after = time.monotonic()
    stats = up.stats()
    assert stats["connections_accepted"] == 1 and stats["requests"] == 1
    assert stats["by_path"] == {"/echo": 1} and stats["status_counts"] == {"200": 1}
    # The upstream's monotonic clock is this process's: the arrival lies inside our window.
    [t] = stats["requests_times"]
    assert before <= t <= after


def test_status_mode_keeps_the_connection_and_sends_retry_after(up):
    up.control(mode="status", code=503, retry_after=2)
    conn = http.client.HTTPConnection(up.host, up.port, timeout=TIMEOUT)
    try:
        first = request(up, "/echo", method="POST", body=b"payload", conn=conn)
        second = request(up, "/healthz", conn=conn)
    finally:
        conn.close()
    for answer in (first, second):
        assert answer.status == 503
        assert answer.headers["retry-after"] == "2"
        assert "x-weft-degraded" not in answer.headers
    # The body was read, so the connection served the second request too.
    assert first.headers["x-connection-id"] == second.headers["x-connection-id"]
    up.control()
    assert request(up, "/echo").status == 200
    stats = up.stats()
    assert stats["status_counts"] == {"200": 1, "503": 2}
    assert stats["bodies"] == [{"path": "/echo", "len": 7,
                                "sha256": hashlib.sha256(b"payload").hexdigest()}]


def test_hang_holds_the_request_until_the_mode_changes(up):
    up.control(mode="hang")
    with socket.create_connection((up.host, up.port), timeout=TIMEOUT) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):
            s.recv(1)
        stats = up.stats()
        assert stats["in_flight"] == 1, "the hung request is being held"
        assert stats["bodies"][-1]["len"] == 3, "hang reads the whole request first"
        assert stats["status_counts"] == {}
        up.control()
        # Released: the connection is closed without an answer.
        s.settimeout(3.0)
        assert s.recv(1024) == b""
    wait_for(lambda: up.stats()["in_flight"] == 0, 3.0, "the hung request to end")
    assert request(up, "/echo").status == 200


def test_hang_lets_go_when_the_client_leaves(up):
    up.control(mode="hang")
    with socket.create_connection((up.host, up.port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: up.stats()["in_flight"] == 1, 3.0, "the request to be held")
    # Still hanging, but the peer is gone: the connection must not stay counted as open.
    wait_for(lambda: up.stats()["open_connections"] == 0, 3.0, "the abandoned hang to end")
    assert up.stats()["in_flight"] == 0


def test_hang_with_http_client_times_out(up):
    up.control(mode="hang")
    with pytest.raises(TimeoutError):
        request(up, "/healthz", timeout=1.0)
    up.control()
    assert request(up, "/healthz").status == 200


def test_reset_mode_resets_the_connection(up):
    up.control(mode="reset")
    with pytest.raises(ConnectionResetError):
        request(up, "/echo", method="POST", body=b"x" * 1000)
    stats = up.stats()
    assert stats["requests"] == 1 and stats["status_counts"] == {}
    assert stats["bodies"][-1]["len"] == 1000, "reset reads the whole request first"
    up.control()
    assert request(up, "/echo").status == 200


def test_slow_mode_delays_then_answers_normally(up):
    up.control(mode="slow", delay=0.4)
    start = time.monotonic()
    answer = request(up, "/echo")
    assert answer.status == 200 and time.monotonic() - start >= 0.4
    up.control()
    start = time.monotonic()
    assert request(up, "/echo").status == 200
    assert time.monotonic() - start < 0.4


def test_flap_alternates_between_normal_and_503(up):
    period = 0.5
    since = up.control(mode="flap", period=period)["since"]
    seen: set[int] = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and seen != {200, 503}:
        sent = time.monotonic()
        status = request(up, "/echo").status
        done = time.monotonic()
        seen.add(status)
        # Where the whole exchange lies inside one half-period, its answer is known.
        phase_sent, phase_done = (int((t - since) / period) for t in (sent, done))
        if phase_sent == phase_done:
            assert status == (503 if phase_sent % 2 else 200), (sent - since, status)
        time.sleep(0.05)
    assert seen == {200, 503}


def test_degraded_marks_normal_answers_only(up):
    up.control(degraded=True)
    assert request(up, "/echo").headers["x-weft-degraded"] == "1"
    healthz = request(up, "/healthz")
    assert healthz.status == 200 and healthz.headers["x-weft-degraded"] == "1"
    up.control(mode="status", code=500, degraded=True)
    assert "x-weft-degraded" not in request(up, "/echo").headers
    up.control()
    assert "x-weft-degraded" not in request(up, "/echo").headers


def test_scope_limits_the_fault_to_health_or_traffic(up):
    up.control(mode="status", code=503, scope="health")
    assert request(up, "/healthz").status == 503
    assert request(up, "/echo").status == 200
    up.control(mode="status", code=503, scope="traffic")
    assert request(up, "/healthz").status == 200
    assert request(up, "/echo").status == 503
    up.control(degraded=True, scope="health")
    assert request(up, "/healthz").headers["x-weft-degraded"] == "1"
    assert "x-weft-degraded" not in request(up, "/echo").headers


def test_healthz_times_and_peers_are_recorded(up):
    before = time.monotonic()
    with socket.create_connection((up.host, up.port), timeout=TIMEOUT) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        client = list(s.getsockname()[:2])
    after = time.monotonic()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"\r\ncontent-length: 2\r\n" in reply.lower() and reply.endswith(b"\r\n\r\nok")
    # A faulted probe is recorded too: it arrived, whatever it got.
    up.control(mode="status", code=503)
    assert request(up, "/healthz").status == 503
    stats = up.stats()
    assert len(stats["healthz_times"]) == 2 == stats["by_path"]["/healthz"]
    assert before <= stats["healthz_times"][0] <= after <= stats["healthz_times"][1]
    assert stats["healthz_peers"][0] == client
    assert stats["status_counts"] == {"200": 1, "503": 1}


def test_stats_reset_answers_then_clears(up):
    request(up, "/sink", method="POST", body=b"abc")
    request(up, "/healthz")
    old = up.reset_stats()
    assert old["requests"] == 2 and len(old["bodies"]) == 1 and len(old["healthz_times"]) == 1
    new = up.stats()
    assert (new["requests"], new["connections_accepted"], new["by_path"], new["status_counts"],
            new["requests_times"], new["healthz_times"], new["healthz_peers"], new["bodies"]
            ) == (0, 0, {}, {}, [], [], [], [])
