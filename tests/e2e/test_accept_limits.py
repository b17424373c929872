"""A worker out of file descriptors: it backs off, logs that sparingly, counts it, and recovers.

weft runs under ``prlimit --nofile=64:64`` (soft and hard: it cannot raise them), with
``limits.max_connections`` far above what 64 descriptors allow, so its worker meets EMFILE in
accept() long before its connection semaphore stops it (the start-up warning about the limit
is expected). The test holds more idle connections than the worker can take, and judges by
weft's stderr (the accept warnings), the admin listener's ``weft_accept_errors_total``, and a
request served once the connections are gone.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import time

import pytest
from support.config import simple_config, table
from support.procs import wait_for
from support.prometheus import scrape, total
from support.supervised import start_supervised

pytestmark = pytest.mark.e2e

NOFILE = 64  # the worker holds ~20 descriptors idle (listeners, pipes, epoll, metrics files)
CONNECTIONS = 100  # well past what is left; the rest wait in the listen backlog (1024)
WATCH = 2.0  # seconds of sustained EMFILE, ~20 retries at the worker's 0.1 s backoff
ACCEPT_WARNING = re.compile(r" WARNING weft\.worker\[\d+\]: accept: ")


def prlimit() -> str:
    path = shutil.which("prlimit")
    if path is None:
        pytest.fail("prlimit not found: install the `util-linux` package (scripts/test does)")
    return path


def emfile_errors(admin_port: int) -> float:
    return total(scrape(admin_port), "weft_accept_errors_total", errno="EMFILE")


def get_echo(port: int) -> int | None:
    """Status of GET /echo on a fresh connection, None when the exchange failed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    try:
        conn.request("GET", "/echo", headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def test_a_worker_out_of_descriptors_warns_sparingly_counts_and_recovers(
        upstream, weft, free_port, tmp_path):
    a = upstream("A")
    port, admin_port = free_port(), free_port()
    text = (
        simple_config(port, [a.address], limits={"max_connections": 1000},
                      # the held connections send nothing: keep them for the whole test
                      timeouts={"client_header": "30s"})
        + table("[admin]", {"port": admin_port})
    )
    sup = start_supervised(weft, tmp_path, text, workers=1,
                           prefix=[prlimit(), f"--nofile={NOFILE}:{NOFILE}"])
    worker = sup.workers()[0]["pid"]
    assert len(os.listdir(f"/proc/{worker}/fd")) < NOFILE // 2, "no room left to exhaust"
    assert get_echo(port) == 200
    assert emfile_errors(admin_port) == 0

    with contextlib.ExitStack() as held:
        # 1. more connections than the worker has descriptors for: the handshake completes in
        #    the kernel's backlog either way, so every connect succeeds
        for _ in range(CONNECTIONS):
            s = held.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5.0))
            s.settimeout(5.0)

        # 2. the worker hits EMFILE and counts it (the metrics are sampled every second)
        wait_for(lambda: emfile_errors(admin_port) > 0, 10.0, "weft_accept_errors_total EMFILE")
        counted = emfile_errors(admin_port)
        time.sleep(WATCH)

        # 3. it kept retrying, and counting, but said so only once or so
        assert emfile_errors(admin_port) >= counted + WATCH * 3, "accept was not retried"
        lines = [line for line in sup.weft.stderr_text().splitlines()
                 if ACCEPT_WARNING.search(line)]
        assert 1 <= len(lines) <= 3, lines
        assert "accept: Too many open files" in lines[0]

    # 4. with the connections closed, the worker reads EOF on those it holds (and on the queued
    #    ones once it can take them) and closes them: the same worker serves again
    wait_for(lambda: get_echo(port) == 200, 10.0, "a request served after the connections closed")
    assert sup.workers()[0]["pid"] == worker
    assert emfile_errors(admin_port) > 0
