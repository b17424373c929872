"""Bodies are streamed, never held whole: 100 MiB each way through weft with bounded memory.

The proof is weft's resident memory (supervisor + workers, from /proc/<pid>/status), sampled
every 20 ms while the transfer runs. A proxy that buffered the body would grow by >= 100 MiB.
"""

from __future__ import annotations

import hashlib
import socket
import time

import httpx
import pytest
from support.clients import MiB, RssSampler
from support.config import simple_config
from support.rawhttp import RawConnection
from support.upstream import BLOCK, pattern, pattern_sha256

pytestmark = pytest.mark.e2e

SIZE = 100 * MiB
# Generous: buffers of a few MiB per direction are fine, holding the body is not.
MAX_GROWTH = 150 * MiB


@pytest.fixture
def proxied(upstream, weft, free_port):
    up = upstream("stream")
    config = simple_config(free_port(), [up.address], limits={"max_body_bytes": "1GiB"})
    return weft(config), up


def _report(capsys, what: str, baseline: int, sampler: RssSampler, seconds: float) -> None:
    with capsys.disabled():
        print(f"\n[{what}] weft RSS baseline {baseline / MiB:.1f} MiB, peak "
              f"{sampler.peak / MiB:.1f} MiB (growth {(sampler.peak - baseline) / MiB:.1f} MiB), "
              f"{len(sampler.samples)} samples, {SIZE / MiB / seconds:.0f} MiB/s")


def _warm_up(client: httpx.Client) -> None:
    # Imports, pools and first-use allocations happen before the baseline is taken.
    client.post("/sink", content=pattern(4 * MiB)).raise_for_status()
    client.get("/source", params={"size": 4 * MiB}).raise_for_status()


def test_100mib_upload_is_streamed_with_bounded_memory(proxied, capsys):
    proxy, _ = proxied
    block = pattern(BLOCK)

    def body():
        for _ in range(SIZE // BLOCK):
            yield block

    with httpx.Client(base_url=proxy.url, timeout=60.0) as client:
        _warm_up(client)
        baseline = proxy.rss_bytes()
        start = time.monotonic()
        with RssSampler(proxy.rss_bytes) as sampler:
            resp = client.post("/sink", content=body(),
                               headers={"content-length": str(SIZE)})
        elapsed = time.monotonic() - start
    _report(capsys, "upload", baseline, sampler, elapsed)
    assert resp.status_code == 200
    assert resp.json() == {"body_len": SIZE, "body_sha256": pattern_sha256(SIZE)}
    assert sampler.peak - baseline < MAX_GROWTH, (
        f"weft grew by {(sampler.peak - baseline) / MiB:.1f} MiB during a 100 MiB upload")


def test_100mib_download_is_streamed_with_bounded_memory(proxied, capsys):
    proxy, _ = proxied
    with httpx.Client(base_url=proxy.url, timeout=60.0) as client:
        _warm_up(client)
        baseline = proxy.rss_bytes()
        digest = hashlib.sha256()
        received = 0
        start = time.monotonic()
        with RssSampler(proxy.rss_bytes) as sampler, \
                client.stream("GET", "/source", params={"size": SIZE}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-length"] == str(SIZE)
            for chunk in resp.iter_raw():
                digest.update(chunk)
                received += len(chunk)
        elapsed = time.monotonic() - start
    _report(capsys, "download", baseline, sampler, elapsed)
    assert received == SIZE
    assert digest.hexdigest() == pattern_sha256(SIZE)
    assert sampler.peak - baseline < MAX_GROWTH, (
        f"weft grew by {(sampler.peak - baseline) / MiB:.1f} MiB during a 100 MiB download")


def test_slow_reader_does_not_make_weft_buffer_the_response(proxied, capsys):
    """Backpressure: a client that reads slowly holds the upstream back instead of weft
    absorbing the whole body."""
    proxy, _ = proxied
    with httpx.Client(base_url=proxy.url, timeout=30.0) as client:
        _warm_up(client)
    baseline = proxy.rss_bytes()
    start = time.monotonic()
    with RawConnection(proxy.port, timeout=30.0) as conn:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        conn.send(f"GET /source?size={SIZE} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        # 1. read nothing for a moment: the upstream must be stalled by backpressure
        with RssSampler(proxy.rss_bytes) as sampler:
            # (a deliberate pause, not a wait for an event: the client is being slow)
            time.sleep(1.5)
            # 2. then read everything
            received = 0
            conn.sock.settimeout(30.0)
            while received < SIZE:
                data = conn.sock.recv(1 << 20)
                if not data:
                    break
                received += len(data)
    _report(capsys, "slow reader", baseline, sampler, time.monotonic() - start)
    assert received >= SIZE
    assert sampler.peak - baseline < MAX_GROWTH
