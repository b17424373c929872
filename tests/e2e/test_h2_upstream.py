"""HTTP/1.1 clients through the real ``python -m weft run`` to HTTP/2 upstreams.

The upstream is tests/support/h2_upstream.py (the `h2` library on trio), in cleartext (h2c,
prior knowledge) or over TLS with ALPN; it counts its TCP connections and misbehaves on
request (GOAWAY after N streams, REFUSED_STREAM every N streams, a body it never reads).
Clients are Python's http.client and curl.
"""

from __future__ import annotations

import http.client
import json
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.certs import CA
from support.config import base_config, destination, route, table
from support.procs import Weft

from weft.http.io import Timers
from weft.prober import probe_once
from weft.schema import Destination, Endpoint, HealthCheck

pytestmark = pytest.mark.e2e

H2_UPSTREAM = Path(__file__).resolve().parent.parent / "support" / "h2_upstream.py"
CURL = shutil.which("curl")


class H2Up:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port
        self.address = f"127.0.0.1:{port}"


@pytest.fixture
def h2_upstream(tmp_path: Path) -> Iterator[Callable[..., H2Up]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> H2Up:
        err = open(tmp_path / f"h2up-{len(started)}.stderr", "wb")
        proc = subprocess.Popen([sys.executable, str(H2_UPSTREAM), "--port", "0", *args],
                                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        err.close()
        started.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20.0)
        assert ready, "h2 upstream did not start"
        line = proc.stdout.readline().decode()
        assert line.startswith("LISTENING "), line
        return H2Up(proc, int(line.split()[1]))

    yield start
    for p in started:
        p.terminate()
        p.wait(timeout=10)
        if p.stdout is not None:
            p.stdout.close()


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path / "pki")


def config(port: int, up: H2Up, protocol: str, *, tls: dict[str, object] | None = None,
           pool: dict[str, object] | None = None, timeouts: dict[str, object] | None = None,
           workers: int = 1) -> str:
    text = base_config(port, timeouts=timeouts, server={"workers": workers})
    text += destination("app", [up.address], protocol=protocol, pool=pool)
    if tls is not None:
        text += table("[destinations.app.tls]", tls)
    return text + route("app")


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None,
            conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30.0)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        if conn is None:
            c.close()


def stats(port: int) -> dict[str, int]:
    status, _, body = request(port, "GET", "/stats")
    assert status == 200, body
    return json.loads(body)


def test_h1_client_to_h2c_upstream_headers_translated_and_bodies_intact(
        weft: Callable[..., Weft], free_port, h2_upstream):
    up = h2_upstream()
    port = free_port()
    weft(config(port, up, "h2c"))
    # 1. a GET: pseudo-headers from the h1 request, Host as :authority, no hop-by-hop fields
    status, _, body = request(port, "GET", "/echo?x=1",
                                    headers={"Host": "example.test", "TE": "trailers",
                                             "Connection": "keep-alive, x-hop", "X-Hop": "1"})
    assert status == 200, body
    echoed = json.loads(body)
    assert echoed["method"] == "GET" and echoed["path"] == "/echo?x=1"
    assert echoed["authority"] == "example.test" and echoed["scheme"] == "http"
    names = {k for k, _ in echoed["headers"]}
    assert not names & {"host", "connection", "keep-alive", "transfer-encoding", "x-hop"}
    assert ["te", "trailers"] in echoed["headers"]
    # 2. a chunked request body becomes DATA frames, its trailers a trailing HEADERS frame
    raw = http.client.HTTPConnection("127.0.0.1", port, timeout=30.0)
    raw.putrequest("POST", "/sink")
    raw.putheader("Transfer-Encoding", "chunked")
    raw.putheader("Trailer", "x-sum")
    raw.endheaders()
    raw.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n")
    r = raw.getresponse()
    sunk = json.loads(r.read())
    raw.close()
    assert sunk["body_len"] == 11 and ["x-sum", "42"] in sunk["trailers"]
    # 3. a response without Content-Length reaches the h1 client chunked, trailers included
    assert CURL
    done = subprocess.run([CURL, "-sS", "--raw", "-i", f"http://127.0.0.1:{port}/trailers"],
                          capture_output=True, timeout=20.0)
    out = done.stdout.lower()
    assert b"transfer-encoding: chunked" in out, out
    assert b"hello" in out and b"x-checksum: abc" in out and b"grpc-status: 0" in out


def test_h2_over_tls_upstream_and_auto_picks_h2_by_alpn(weft, free_port, h2_upstream, ca):
    leaf = ca.leaf("up", ["localhost", "127.0.0.1"])
    up = h2_upstream("--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key),
                     "--alpn", "h2,http/1.1")
    for protocol in ("h2", "auto"):
        port = free_port()
        w = weft(config(port, up, protocol, tls={"ca": str(ca.pem)}))
        status, _, body = request(port, "GET", "/echo")
        assert status == 200, (protocol, body)
        assert json.loads(body)["scheme"] == "https"
        w.stop()


def test_concurrent_requests_are_multiplexed_on_few_upstream_connections(
        weft, free_port, h2_upstream):
    up = h2_upstream("--max-streams", "50")
    port = free_port()
    w = weft(config(port, up, "h2c", pool={"max_per_endpoint": 4}))
    before = stats(port)["connections"]
    results: list[int] = []

    def client() -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30.0)
        for _ in range(5):
            status, _, _ = request(port, "GET", "/slow?delay=0.2", conn=c)
            results.append(status)
        c.close()

    threads = [threading.Thread(target=client) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count(200) == 500, w.stderr_text()[-3000:]
    after = stats(port)
    # 100 concurrent requests, 50 streams per connection, at most 4 connections
    assert after["connections"] - before <= 4
    assert after["max_active"] > 1


def test_goaway_mid_load_retries_unprocessed_streams_with_no_failures(
        weft, free_port, h2_upstream):
    up = h2_upstream("--goaway-after", "7")
    port = free_port()
    weft(config(port, up, "h2c"))
    results: list[int] = []

    def client() -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30.0)
        for _ in range(10):
            status, _, _ = request(port, "GET", "/slow?delay=0.05", conn=c)
            results.append(status)
        c.close()

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count(200) == 200, sorted(set(results))
    s = stats(port)
    assert s["goaways"] >= 10  # 200 requests, a GOAWAY every 7 streams


def test_refused_streams_are_retried(weft, free_port, h2_upstream):
    # GETs: a POST whose body came apart from its head is streamed, and a refused stream whose
    # body was streamed is a 502 by design (it cannot be sent again).
    up = h2_upstream("--refuse-every", "3")
    port = free_port()
    weft(config(port, up, "h2c"))
    for i in range(30):
        status, _, body = request(port, "GET", f"/echo?i={i}")
        assert status == 200
        assert json.loads(body)["path"] == f"/echo?i={i}"
    assert stats(port)["refused"] >= 9


def test_an_upstream_that_stops_reading_is_bounded_by_upstream_send_idle(
        weft, free_port, h2_upstream):
    up = h2_upstream()
    port = free_port()
    weft(config(port, up, "h2c", timeouts={"upstream_send_idle": "1s"}))
    started = time.monotonic()

    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * 65536  # 4 MiB, far past the upstream's 64 KiB window

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30.0)
    c.request("POST", "/stall-read", body=chunks(), encode_chunked=True)
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 504
    assert time.monotonic() - started < 10
    # the connection still serves others
    assert request(port, "GET", "/echo")[0] == 200


def test_a_100_mib_response_streams_with_bounded_rss(weft, free_port, h2_upstream):
    up = h2_upstream()
    port = free_port()
    w = weft(config(port, up, "h2c"))
    request(port, "GET", "/echo")
    baseline = w.rss_bytes()
    size = 100 * 1024 * 1024
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60.0)
    c.request("GET", f"/source?size={size}&cl=0")
    r = c.getresponse()
    assert r.status == 200 and r.getheader("transfer-encoding") == "chunked"
    got = 0
    peak = 0
    while chunk := r.read(1 << 20):
        got += len(chunk)
        if got % (8 << 20) < (1 << 20):
            peak = max(peak, w.rss_bytes())
        time.sleep(0.001)
    c.close()
    assert got == size
    # the body is never held whole: weft grows by far less than the 100 MiB it relays
    assert peak - baseline < 40 * 1024 * 1024, (baseline, peak)


async def test_health_probes_speak_h2c(h2_upstream):
    up = h2_upstream()
    timers = Timers()
    for path, expected in (("/echo", 200), ("/missing", 404)):
        dest = Destination("app", (Endpoint("127.0.0.1", up.port),), protocol="h2c",
                           health=HealthCheck(path=path, timeout=5.0))
        status, _, _ = await probe_once(dest, 0, timers)
        assert status == expected


def test_h2_client_to_h2c_upstream_keeps_trailers_and_the_request_body(
        weft, free_port, h2_upstream):
    assert CURL
    up = h2_upstream()
    port = free_port()
    weft(config(port, up, "h2c"))
    # 1. h2 on both sides: the response trailers pass through as a trailing HEADERS frame.
    done = subprocess.run([CURL, "-sS", "--http2-prior-knowledge", "-i",
                           f"http://127.0.0.1:{port}/trailers"], capture_output=True, timeout=20.0)
    out = done.stdout.lower()
    assert done.returncode == 0, done.stderr
    assert out.startswith(b"http/2 200") and b"hello" in out
    assert b"x-checksum: abc" in out and b"grpc-status: 0" in out
    # 2. a request body of many DATA frames arrives whole.
    body = bytes(range(256)) * 4096  # 1 MiB
    done = subprocess.run([CURL, "-sS", "--http2-prior-knowledge", "--data-binary", "@-",
                           f"http://127.0.0.1:{port}/sink"], input=body, capture_output=True,
                          timeout=20.0)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["body_len"] == len(body)


def test_a_full_h2_pool_answers_503_and_the_log_says_streams_were_the_limit(
        weft, free_port, h2_upstream):
    up = h2_upstream()
    port = free_port()
    w = weft(config(port, up, "h2c", pool={"max_per_endpoint": 1,
                                           "max_streams_per_connection": 2, "queue_size": 1,
                                           "queue_timeout": "0.3s"}))
    assert request(port, "GET", "/echo")[0] == 200  # the connection is open (and idle)
    statuses: list[int] = []

    def one() -> None:
        statuses.append(request(port, "GET", "/slow?delay=1.5")[0])

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Two streams on the one connection; one waits and gives up, one finds the queue full.
    assert sorted(statuses) == [200, 200, 503, 503], statuses
    log = w.stderr_text()
    assert "2 of 2 streams in use on 1 of max_per_endpoint 1 connections open" in log, log
