"""Rate limits shared by several weft instances through one real `redis-server`.

The test starts its own redis-server on a loopback port (no persistence, in the test's
directory) and stops it after; scripts/test installs Debian's redis-server. Two weft instances
(different ``server.instance``, so nothing of their shared memory is common) limit one key
together through it; then Redis dies, and each ``on_error`` setting is checked: no 5xx, no
stalled request; then Redis comes back and limiting resumes by itself.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.procs import port_accepts, wait_for
from support.ratelimit import get, hammer, rate_limit_config

pytestmark = pytest.mark.e2e

REDIS = shutil.which("redis-server")


class Redis:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        wait_for(lambda: port_accepts("127.0.0.1", self.port), 10, "redis-server listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis(tmp_path: Path, free_port) -> Iterator[Redis]:
    if REDIS is None:
        if __import__("os").environ.get("CI"):
            pytest.fail("redis-server is not installed (scripts/test installs it)")
        pytest.skip("redis-server is not installed (scripts/test installs it)")
    r = Redis(free_port(), tmp_path)
    r.start()
    yield r
    r.stop()


def _redis_config(port: int, up: str, redis: Redis, on_error: str) -> str:
    text = rate_limit_config(port, up, 2, [{"key": "route", "rate": "50/s", "burst": 10,
                                  "backend": "redis"}])
    return text + (f'[rate_limit_backend]\nurl = "{redis.url}"\ntimeout = "50ms"\n'
                   f'on_error = "{on_error}"\n')


def test_two_instances_share_one_limit_and_survive_redis_going_away(
    upstream, weft, free_port, redis, tmp_path
):
    """1. Two weft instances, one Redis, one key at 50/s with a burst of 10, 10 clients on
       each for 4 s: the upstream got 1 + 10 + 50 x the span it saw, within 2 %, across both.
    2. Kill Redis. The "allow" instance lets requests through, the "deny" one answers 429; no
       5xx and no request slower than the timeout's order.
    3. Start Redis again on its port: limiting resumes by itself (429s again)."""
    up = upstream("up")
    allow = weft(_redis_config(free_port(), up.address, redis, "allow"),
                 name="allow")
    deny = weft(_redis_config(free_port(), up.address, redis, "deny"),
                name="deny")
    up.reset_stats()
    results: list[dict[int, int]] = []
    threads = [threading.Thread(target=lambda p=p: results.append(hammer(p.host, p.port, 10, 4.0)))
               for p in (allow, deny)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    stats = up.stats()
    times = stats["requests_times"]
    expected = 1 + 10 + 50 * (times[-1] - times[0])
    assert abs(stats["requests"] - expected) <= 0.02 * expected, (stats["requests"], expected)
    assert all(set(r) == {200, 429} for r in results), results

    redis.stop()
    time.sleep(1.2)  # the known-over-limit cache entries (at most 1 s here) have run out
    for proxy, status in ((allow, 200), (deny, 429)):
        for _ in range(20):
            started = time.monotonic()
            assert get(proxy.host, proxy.port)[0] == status
            assert time.monotonic() - started < 1.0

    redis.start()
    time.sleep(1.2)  # past the backend's reconnect interval
    statuses = [get(allow.host, allow.port)[0] for _ in range(40)]
    assert statuses.count(429) > 0 and set(statuses) <= {200, 429}, statuses
