"""Two supervisor paths the other stories do not take: a reload in quick mode (the same flags
again, as a rolling restart) and workers that cannot boot at the first start (the supervisor
stops with their reason instead of respawning them forever).
"""

from __future__ import annotations

import pytest
from support.config import simple_config
from support.rawhttp import exchange
from support.supervised import pidfile_in, run_weft_to_exit, start_supervised

pytestmark = pytest.mark.e2e

GET = b"GET /echo HTTP/1.1\r\nHost: weft-test\r\n\r\n"

# The factory succeeds once (the supervisor's validation, which leaves a marker) and fails in
# every later call: in the forked workers.
FAILS_IN_WORKERS = '''
import pathlib

MARKER = pathlib.Path(__file__).with_name("validated")


def factory(config):
    if MARKER.exists():
        raise RuntimeError("this worker cannot boot: no database (on purpose)")
    MARKER.write_text("the supervisor validated me")

    async def middleware(request, next):
        return await next(request)

    return middleware
'''


def test_a_quick_mode_reload_restarts_the_workers_with_the_same_flags(upstream, weft,
                                                                    free_port, tmp_path):
    a = upstream("A")
    port = free_port()
    sup = start_supervised(
        weft, tmp_path, None,
        args=["--listen", f"127.0.0.1:{port}", "--upstream", a.address, "--workers", "1",
              "--no-access-log"],
        workers=1,
    )
    (before,) = [w["pid"] for w in sup.workers()]

    # 1. a reload re-applies the flags as generation 2 ...
    result = sup.reload()
    assert result.returncode == 0, result.stderr
    assert "generation 2" in result.stdout
    # 2. ... served by a new worker, while the old one drained away
    rows = sup.wait_workers(1, generation=2, exclude=[before])
    assert rows[0]["pid"] != before
    assert sup.status()["generation"] == 2
    # 3. the same upstream answers
    assert [r.status for r in exchange(port, GET).responses] == [200]


def test_workers_that_cannot_boot_at_the_first_start_stop_the_supervisor(upstream, free_port,
                                                                         tmp_path):
    (tmp_path / "fragile.py").write_text(FAILS_IN_WORKERS)
    a = upstream("A")
    config = tmp_path / "weft.toml"
    config.write_text(simple_config(free_port(), [a.address],
                                    route_keys={"middleware": ["fragile:factory"]}))

    code, stderr = run_weft_to_exit(
        ["run", "-c", str(config), "--pidfile", str(pidfile_in(tmp_path))],
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}, timeout=20.0,
    )

    # the supervisor exits 1 naming the worker's reason, and does not respawn it in a loop
    assert code == 1, stderr
    assert "no database (on purpose)" in stderr
    assert "workers did not start" in stderr
    assert stderr.count("started") <= 2, stderr
