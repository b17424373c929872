"""HTTP/2 downstream (h2c, prior knowledge): real clients through weft to an HTTP/1.1 upstream.

curl and h2load are the outside judges; the `h2` library client (`support.h2client`) is used
where a test needs to see frames (trailers, flow-control windows, resets). Each test says the
behaviour it proves; the abuse cases are in test_h2_abuse.py, drain and reload in
test_h2_reload.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import time

import pytest
from support.clients import MiB, RssSampler
from support.config import simple_config
from support.h2client import H2Client
from support.procs import wait_for
from support.upstream import BLOCK, pattern, pattern_sha256

pytestmark = pytest.mark.e2e

CURL = "/usr/bin/curl"


def curl_h2(url: str, *args: str, timeout: float = 20.0) -> tuple[int, str, bytes]:
    """(status, HTTP version curl used, body) of one prior-knowledge h2c request."""
    proc = subprocess.run(
        [CURL, "-sS", "--http2-prior-knowledge", "--max-time", str(timeout),
         "-w", "\n%{http_code} %{http_version}", *args, url],
        capture_output=True, timeout=timeout + 5, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    body, _, tail = proc.stdout.rpartition(b"\n")
    status, version = tail.decode().split()
    return int(status), version, body


@pytest.fixture
def proxied(upstream, weft, free_port, tmp_path):
    up = upstream("h2up")
    log = tmp_path / "access.log"
    config = simple_config(free_port(), [up.address], access_log=log,
                           limits={"max_body_bytes": "1GiB"})
    return weft(config), up


def test_curl_get_and_post_over_h2c_reach_an_h1_upstream(proxied):
    proxy, _ = proxied
    # 1. a GET: the upstream sees HTTP/1.1 with Host from :authority and Via "2 weft"
    status, version, body = curl_h2(proxy.url + "/echo?x=1", "-H", "cookie: a=1",
                                    "-H", "cookie: b=2")
    assert (status, version) == (200, "2")
    info = json.loads(body)
    assert info["http_version"] == "1.1" and info["target"] == "/echo?x=1"
    headers = dict((k, v) for k, v in info["headers"])
    assert headers["host"] == proxy.address
    assert headers["via"] == "2 weft"
    assert headers["cookie"] == "a=1; b=2"  # RFC 9113 §8.2.3: split cookies joined for h1
    # 2. a POST whose 300 kB body streams through the stream's 64 KiB window
    data = pattern(300_000)
    proc = subprocess.run(
        [CURL, "-sS", "--http2-prior-knowledge", "--max-time", "20", "--data-binary", "@-",
         proxy.url + "/sink"], input=data, capture_output=True, timeout=25)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"body_len": len(data),
                                       "body_sha256": hashlib.sha256(data).hexdigest()}
    # 3. the access log says version 2 for both, as h1 exchanges say 1.1
    wait_for(lambda: len(proxy.access_log_lines()) >= 2, 5.0, "two access log lines")
    lines = [json.loads(x) for x in proxy.access_log_lines()]
    assert [x["version"] for x in lines[-2:]] == ["2", "2"]
    assert lines[-1]["bytes_in"] == len(data)


def test_h1_and_h2_share_a_port_and_a_preface_in_pieces_is_still_h2(proxied):
    proxy, _ = proxied
    proc = subprocess.run([CURL, "-sS", "--http1.1", "-o", "/dev/null", "-w", "%{http_version}",
                           proxy.url + "/fixed"], capture_output=True, timeout=20)
    assert proc.stdout == b"1.1"
    # A client whose preface comes in two writes is still recognised (the dispatcher peeks).
    with H2Client(proxy.port) as client:
        r = client.request("GET", "/fixed?size=10")
        assert r.status == 200 and bytes(r.body) == pattern(10)
    s = socket.create_connection((proxy.host, proxy.port), timeout=5)
    try:
        s.sendall(b"PRI * HTTP/2.0\r\n")
        time.sleep(0.1)
        s.sendall(b"\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        first = s.recv(9)
        assert first[3] == 0x04, first  # the server's SETTINGS: served as HTTP/2
    finally:
        s.close()


def test_trailers_pass_both_ways(proxied):
    proxy, _ = proxied
    with H2Client(proxy.port) as client:
        # 1. the upstream's chunked trailers end the h2 response in a HEADERS frame
        r = client.request("GET", "/trailers")
        body = pattern(1000)
        assert r.status == 200 and bytes(r.body) == body
        assert r.trailers == [(b"x-checksum", hashlib.sha256(body).hexdigest().encode())]
        # 2. the client's trailers reach the upstream in the chunked request body
        r = client.request("POST", "/echo", headers=[(b"te", b"trailers")], body=b"abc",
                           trailers=[(b"x-sum", b"42")])
        info = json.loads(bytes(r.body))
        assert info["body_len"] == 3
        assert info["trailers"] == [["x-sum", "42"]]
        assert ["te", "trailers"] in info["headers"]


def test_1000_concurrent_streams_over_10_connections_all_succeed(proxied):
    proxy, up = proxied
    before = up.stats()["requests"]
    proc = subprocess.run(
        ["h2load", "-n", "1000", "-c", "10", "-m", "100", proxy.url + "/fixed?size=1024"],
        capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored", out)
    assert m is not None, out
    assert m.groups() == ("1000", "1000", "1000", "1000", "0", "0"), out
    assert "1000 2xx" in out, out
    assert up.stats()["requests"] - before == 1000


def test_100mib_download_streams_with_bounded_memory_and_window_backpressure(proxied, capsys):
    """The client takes 100 MiB through a 64 KiB window: weft reads the upstream no faster
    than the client opens the window, so its memory stays flat."""
    proxy, _ = proxied
    size = 100 * MiB
    with H2Client(proxy.port, timeout=60.0) as client:
        client.request("GET", f"/source?size={4 * MiB}")  # warm up
        baseline = proxy.rss_bytes()
        digest = hashlib.sha256()
        start = time.monotonic()
        with RssSampler(proxy.rss_bytes) as sampler:
            sid = client.start("GET", f"/source?size={size}")
            r = client.responses[sid]
            received = 0
            while not r.ended:
                client.pump(timeout=60.0)
                if r.body:
                    digest.update(r.body)
                    received += len(r.body)
                    r.body.clear()
                assert r.reset is None
        elapsed = time.monotonic() - start
    growth = sampler.peak - baseline
    with capsys.disabled():
        print(f"\n[h2 download] RSS growth {growth / MiB:.1f} MiB, "
              f"{size / MiB / elapsed:.0f} MiB/s")
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)
    assert growth < 40 * MiB, f"weft grew by {growth / MiB:.1f} MiB"


def test_100mib_upload_streams_with_bounded_memory(proxied, capsys):
    proxy, _ = proxied
    size = 100 * MiB
    block = pattern(BLOCK)
    with H2Client(proxy.port, timeout=60.0) as client:
        client.request("POST", "/sink", body=pattern(4 * MiB))  # warm up
        baseline = proxy.rss_bytes()
        with RssSampler(proxy.rss_bytes) as sampler:
            sid = client.start("POST", "/sink", headers=[(b"content-length", str(size).encode())],
                               end=False)
            for _ in range(size // BLOCK):
                client.send_body(sid, block)
            client.send_body(sid, b"", end=True)
            r = client.wait(sid, timeout=60.0)
    growth = sampler.peak - baseline
    with capsys.disabled():
        print(f"\n[h2 upload] RSS growth {growth / MiB:.1f} MiB")
    assert r.status == 200
    assert json.loads(bytes(r.body)) == {"body_len": size, "body_sha256": pattern_sha256(size)}
    assert growth < 40 * MiB, f"weft grew by {growth / MiB:.1f} MiB"


def test_a_stalled_stream_holds_back_its_upstream_only(proxied):
    """A stream whose client never opens its window gets no more than the window from the
    upstream read, and the other streams of the connection go on."""
    proxy, _ = proxied
    with H2Client(proxy.port) as warm:
        warm.request("GET", f"/source?size={4 * MiB}")  # first-use allocations
    with H2Client(proxy.port, auto_ack=False, timeout=20.0) as client:
        # the connection's window is wide open; only the stalled stream's stays shut
        client.conn.increment_flow_control_window(2**30)
        client.flush()
        baseline = proxy.rss_bytes()
        stalled = client.start("GET", f"/source?size={64 * MiB}")
        client.pump(until=lambda: len(client.responses[stalled].body) >= 65535 - 16384)
        time.sleep(1.0)
        # the other streams still answer, on the same connection, while it stalls
        for _ in range(5):
            sid = client.start("GET", "/fixed?size=100")
            r = client.responses[sid]
            client.pump(until=lambda r=r: r.ended)
            assert r.status == 200 and len(r.body) == 100
            client.conn.acknowledge_received_data(len(r.body), sid)
            client.flush()
        # the stalled stream got only its window, and weft did not buffer the upstream body
        assert len(client.responses[stalled].body) <= 65535
        assert proxy.rss_bytes() - baseline < 16 * MiB


def test_a_preface_and_then_silence_is_closed_with_goaway_after_client_header(
        upstream, weft, free_port):
    up = upstream("quiet")
    proxy = weft(simple_config(free_port(), [up.address], timeouts={"client_header": "1s"}))
    with H2Client(proxy.port) as client:
        start = time.monotonic()
        goaway = client.wait_closed(timeout=10.0)
        assert goaway == (0, 0)  # NO_ERROR, no stream taken
        assert 0.8 < time.monotonic() - start < 5.0


def test_the_header_limits_apply_per_stream(upstream, weft, free_port):
    up = upstream("h2limits")
    w = weft(simple_config(free_port(), [up.address],
                           limits={"max_headers": 20, "max_header_bytes": "8KiB"}))
    with H2Client(w.port) as c:
        # 1. Too many fields on one stream: that stream gets 431, the connection goes on.
        many = [(f"x-f{i}".encode(), b"v") for i in range(30)]
        assert c.request("GET", "/fixed?size=10", headers=many).status == 431
        # 2. A header list past max_header_bytes (but under the connection's hard bound) too.
        big = [(b"x-big", b"b" * 6000), (b"x-big2", b"b" * 3000)]
        assert c.request("GET", "/fixed?size=10", headers=big).status == 431
        # 3. The next stream on the same connection is served.
        ok = c.request("GET", "/fixed?size=10")
        assert ok.status == 200 and len(ok.body) == 10
