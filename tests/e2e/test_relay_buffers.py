"""The buffer pool on the data path of a real `weft run`: relays hold pool buffers, a killed
worker's go back, and an exhausted pool makes requests wait instead of allocating.

Judges: the pool's segment read from the test (attached as `weft status` does: who holds which
buffer), the bytes the clients get, the workers' RSS, and the buffer-wait counters in /metrics.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.config import simple_config, table
from support.procs import pid_alive, rss_bytes, wait_for
from support.prometheus import admin_answers, scrape, total
from support.supervised import start_supervised
from support.upstream import pattern

from weft.bufpool import BufferPool

pytestmark = pytest.mark.e2e

RELAY = 65536
HUNDRED_MIB = 100 << 20


def in_use(pool: BufferPool) -> int:
    return sum(used for used, _ in pool.stats().values())


def test_a_worker_killed_mid_transfer_leaves_no_buffer_behind(
    upstream, weft, free_port, tmp_path
):
    up = upstream("A")
    port = free_port()
    config = simple_config(port, [up.address], server={"workers": 2})
    sup = start_supervised(weft, tmp_path, config + table("[buffers]", {"memory": "4MiB"}),
                           workers=2)
    wait_for(lambda: "workers listening on" in sup.weft.stderr_text(), 10,
             "the supervisor to finish starting")
    pool = BufferPool.attach(sup.instance)
    try:
        before = in_use(pool)
        # 1. a 100 MiB download, read for its first MiB and then not at all: the worker's
        #    relay is blocked writing to us, holding its 64 KiB buffer
        client = socket.create_connection(("127.0.0.1", port), timeout=10.0)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.sendall(b"GET /source?size=%d HTTP/1.1\r\nhost: t\r\n\r\n" % HUNDRED_MIB)
        got = 0
        while got < 1 << 20:
            got += len(client.recv(65536))
        pids = [w["pid"] for w in sup.workers()]

        def holder() -> int | None:
            for pid in pids:
                if RELAY in pool.owned_by(pid):
                    return pid
            return None

        victim = wait_for(holder, 5.0, "a worker to hold a relay buffer")
        assert in_use(pool) == before + 1, pool.stats()
        # 2. SIGKILL it mid-transfer: after the supervisor's reclaim, the pool is as before
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not pid_alive(victim), 5.0, "the killed worker to die")
        wait_for(lambda: pool.owned_by(victim) == {}, 5.0, "the supervisor's reclaim")
        assert in_use(pool) == before, pool.stats()
        # the client sees the transfer cut short, never a full-length lie
        client.settimeout(10.0)
        while chunk := client.recv(1 << 20):
            got += len(chunk)
        assert got < HUNDRED_MIB
        client.close()
        sup.wait_workers(2, exclude=[victim])
    finally:
        pool.close()


def test_an_exhausted_pool_makes_downloads_wait_and_then_complete(
    upstream, weft, free_port, tmp_path
):
    """200 slow downloads at once against a pool of eight 64 KiB buffers (1 MiB): each relay
    holds a buffer while its upstream dribbles the body out, so most requests wait for one
    (what the upstream sends meanwhile waits in the kernel, not in weft). All 200 complete
    with their bytes, the pool never has more than its eight in use, the workers' memory
    stays flat, and /metrics counts the waits."""
    up = upstream("A")
    port, admin_port = free_port(), free_port()
    config = (
        simple_config(port, [up.address], server={"workers": 2},
                      limits={"max_connections": 512})
        + table("[admin]", {"port": admin_port})
        + table("[buffers]", {"memory": "1MiB"})
    )
    sup = start_supervised(weft, tmp_path, config, workers=2)
    wait_for(lambda: admin_answers(admin_port), 10.0, "the admin listener to answer")
    pool = BufferPool.attach(sup.instance)
    relay_total = pool.stats()[RELAY][1]
    assert relay_total == 8
    workers = [w["pid"] for w in sup.workers()]
    rss_before = sum(rss_bytes(pid) for pid in workers)
    peak = {"relay": 0, "rss": rss_before}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["relay"] = max(peak["relay"], pool.stats()[RELAY][0])
            peak["rss"] = max(peak["rss"], sum(rss_bytes(pid) for pid in workers))
            time.sleep(0.02)

    expected = b"".join(f"chunk {i}\n".encode() for i in range(3))

    def download(i: int) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60.0)
        try:
            conn.request("GET", f"/dribble?n=3&interval=0.1&i={i}")
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=200) as ex:
            results = list(ex.map(download, range(200)))
        took = time.monotonic() - start
    finally:
        stop.set()
        sampler.join(5.0)
    try:
        assert [s for s, _ in results] == [200] * 200
        assert all(body == expected for _, body in results)
        assert peak["relay"] == relay_total  # saturated, never above: nothing went around it
        growth = peak["rss"] - rss_before
        print(f"\n[exhausted pool] {took:.1f}s for 200 downloads, RSS growth "
              f"{growth / 2**20:.1f} MiB over {rss_before / 2**20:.1f} MiB")
        assert growth < 40 * 2**20
        wait_for(lambda: in_use(pool) == 0, 5.0, "every relay buffer to be back")
        got = scrape(admin_port)
        assert total(got, "weft_buffer_waits_total") > 0
        assert total(got, "weft_buffer_exhausted_total") == 0
    finally:
        pool.close()


def test_a_large_upload_and_its_retry_replay_go_through_pool_buffers(
    upstream, weft, free_port, tmp_path
):
    """A 48 KiB body on a retried route is kept in pool buffers and replayed byte for byte
    on the second endpoint after the first resets; a 5 MiB upload streams through a relay
    buffer. The upstream checks each body's digest; afterwards no buffer is held."""
    bad, good = upstream("A"), upstream("B")
    port = free_port()
    config = (
        simple_config(port, [bad.address, good.address], server={"workers": 1})
        + table("[routes.retry]", {"on": ["reset"], "attempts": 2})
        + table("[buffers]", {"memory": "1MiB"})
    )
    sup = start_supervised(weft, tmp_path, config, workers=1)
    bad.control(mode="reset")
    pool = BufferPool.attach(sup.instance)
    try:
        body = pattern(48 * 1024)
        for _ in range(4):  # round robin: some first tries meet the resetting endpoint
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
            conn.request("POST", "/sink", body=body)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            assert resp.status == 200, data
            assert hashlib.sha256(body).hexdigest() in data.decode()
        assert good.stats()["requests"] >= 4
        big = pattern(5 << 20)
        bad.control()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20.0)
        conn.request("PUT", "/sink", body=big)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        assert resp.status == 200 and hashlib.sha256(big).hexdigest() in data.decode()
        wait_for(lambda: in_use(pool) == 0, 5.0, "every buffer to be back")
    finally:
        pool.close()
