"""What the supervisor says at start about the host: the descriptor limit and tcp_migrate_req.

Judges: weft's stderr (the log), and the limit its workers run with (/proc/<pid>/limits). The
limit weft starts with is set by a ``sitecustomize`` module on the subprocess's PYTHONPATH
(Python imports it at start-up), so the test process's own limits never change.
"""

from __future__ import annotations

import os
import re
import resource
import signal
from pathlib import Path

import pytest
from support.config import simple_config
from support.procs import wait_for
from support.supervised import start_supervised

pytestmark = pytest.mark.e2e

SITECUSTOMIZE = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
"""


def _limit_dir(tmp_path: Path, soft: int, hard: int) -> Path:
    d = tmp_path / f"nofile-{soft}-{hard}"
    d.mkdir()
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE.format(soft=soft, hard=hard))
    return d


def _soft_nofile(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    return int(re.search(r"^Max open files\s+(\d+)", text, re.M).group(1))


def test_max_connections_above_the_fd_limit_is_one_clear_warning(
        upstream, weft, free_port, tmp_path):
    a = upstream("A")
    port = free_port()
    # 1. soft = hard = 256, below what 1000 connections need: weft cannot raise it
    text = simple_config(port, [a.address], limits={"max_connections": 1000})
    sup = start_supervised(weft, tmp_path, text, workers=1,
                           pythonpath=[_limit_dir(tmp_path, 256, 256)])
    lines = [line for line in sup.weft.stderr_text().splitlines() if "RLIMIT_NOFILE" in line]
    # 2. one line, a warning: the configured value, the limit and what to do
    assert len(lines) == 1, lines
    assert " WARNING " in lines[0]
    assert "limits.max_connections = 1000" in lines[0]
    assert "256" in lines[0] and "LimitNOFILE=" in lines[0]


def test_a_soft_fd_limit_below_the_need_is_raised_to_the_hard_limit(
        upstream, weft, free_port, tmp_path):
    a = upstream("A")
    port = free_port()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 2100:
        pytest.skip(f"needs a finite hard limit of at least 2100 descriptors, not {hard}")
    text = simple_config(port, [a.address], limits={"max_connections": 1000})
    sup = start_supervised(weft, tmp_path, text, workers=1,
                           pythonpath=[_limit_dir(tmp_path, 256, hard)])
    # 1. raised for the supervisor and so for the workers it forks
    worker = sup.workers()[0]["pid"]
    assert _soft_nofile(sup.pid) == hard and _soft_nofile(worker) == hard
    # 2. and the log says so, without a warning
    lines = [line for line in sup.weft.stderr_text().splitlines() if "RLIMIT_NOFILE" in line]
    assert len(lines) == 1 and " INFO " in lines[0], lines
    assert f"from 256 to {hard}" in lines[0]


def test_tcp_migrate_req_is_mentioned_once_at_info_and_only_when_ttou_is_used(
        upstream, weft, free_port, tmp_path):
    try:
        value = Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip()
    except OSError:
        pytest.skip("no net.ipv4.tcp_migrate_req on this kernel")
    if value != "0":
        pytest.skip("net.ipv4.tcp_migrate_req is not 0 here")
    a = upstream("A")
    port = free_port()
    sup = start_supervised(weft, tmp_path, simple_config(port, [a.address],
                                                         server={"workers": 3}), workers=3)

    def mentions() -> list[str]:
        return [line for line in sup.weft.stderr_text().splitlines()
                if "net.ipv4.tcp_migrate_req" in line]

    # The supervisor has finished starting: a TTOU during the start fails the start instead
    # (a clean-clone run saw it: the workers READY in the table, the start loop not yet done).
    wait_for(lambda: "workers listening on" in sup.weft.stderr_text(), 10,
             "the supervisor to finish starting")
    # 1. a start without TTOU says nothing about it
    assert mentions() == []
    # 2. the first TTOU: one line, at info level
    os.kill(sup.pid, signal.SIGTTOU)
    sup.wait_workers(2)
    lines = wait_for(mentions, 5.0, "the tcp_migrate_req note")
    assert len(lines) == 1 and " INFO " in lines[0], lines
    # 3. the next TTOU: not again
    os.kill(sup.pid, signal.SIGTTOU)
    sup.wait_workers(1)
    assert len(mentions()) == 1
