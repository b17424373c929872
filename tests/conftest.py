"""Fixtures shared by weft's tests.

End-to-end fixtures start real processes (``tests/support/procs.py``): ``upstream`` and ``weft``
are factories, so a test starts as many as its story needs, and their teardown stops every
process the test started, even when the test failed. ``free_port`` gives a port for weft's
listener; ``metrics_dir`` a metrics directory for unit tests that record metrics. A session
check at the end fails the run if any weft process or shared-memory segment of ours outlived
its test.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

# tests/ on sys.path, so `support` imports the same way from every test directory.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from support import procs  # noqa: E402
from support.children import Children, children  # noqa: E402, F401 - children: a fixture
from support.procs import Upstream, Weft  # noqa: E402
from support.workload_api_server import WorkloadAPIServer  # noqa: E402

from weft.shm.segment import remove_instance, segment_names  # noqa: E402


@pytest.fixture
def free_port() -> Callable[..., int]:
    """``free_port(host="127.0.0.1") -> int``: a port that was free a moment ago."""
    return procs.free_port


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Callable[..., Upstream]]:
    """Factory ``upstream(name="up", *, host="127.0.0.1", port=0) -> Upstream``; all stopped
    at the end."""
    started: list[Upstream] = []

    def start(name: str = "up", *, host: str = "127.0.0.1", port: int = 0) -> Upstream:
        u = procs.start_upstream(name, tmp_path, host=host, port=port)
        started.append(u)
        return u

    yield start
    for u in started:
        u.stop()


@pytest.fixture
def weft(tmp_path: Path) -> Iterator[Callable[..., Weft]]:
    """Factory starting ``python -m weft run``; every started weft is stopped at teardown.

    ``weft(config_text=None, *, args=(), pythonpath=(), env=None, ready_timeout=10.0,
    stop_timeout=15.0, name="weft", prefix=()) -> Weft``. See ``procs.start_weft``. A weft
    that does not stop cleanly on SIGTERM fails the test at teardown (after being killed).
    """
    started: list[Weft] = []
    counter = iter(range(1, 1000))

    def start(config_text: str | None = None, *, args: Sequence[str] = (),
              name: str | None = None, **kwargs: object) -> Weft:
        label = name or ("weft" if not started else f"weft{next(counter)}")
        w = procs.start_weft(tmp_path, config_text, args=args, name=label,
                             **kwargs)  # type: ignore[arg-type]
        started.append(w)
        return w

    yield start
    errors = procs.finish(started)
    if errors:
        pytest.fail("weft did not run or stop cleanly:\n" + "\n\n".join(errors), pytrace=False)


@pytest.fixture
def metrics_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty, private metrics directory that prometheus_client writes to for the test
    (``$PROMETHEUS_MULTIPROC_DIR``, restored after it), as the supervisor makes one."""
    from weft import metrics

    directory = metrics.prepare_directory("unit", tmp_path)
    monkeypatch.setenv(metrics.ENV, str(directory))  # restored after the test
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    yield directory


def _live_children() -> set[int]:
    return {p for p in procs.descendants(os.getpid()) if procs.pid_alive(p)}


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """After the whole run: no child process of ours and no shm segment of an instance this run
    named (``procs.unique_instance``). Other runs' segments (a parallel test run, a real weft)
    are none of our business and are never touched."""
    yield
    left_procs = _live_children()
    ours = sorted(Path("/dev/shm").glob(f"weft-{procs.INSTANCE_PREFIX}*"))
    # weft.metrics keeps an instance's metrics files in /dev/shm/weft.<instance>.metrics/
    metrics_dirs = sorted(Path("/dev/shm").glob(f"weft.{procs.INSTANCE_PREFIX}*"))
    problems = []
    if left_procs:
        problems.append(f"processes left running: {sorted(left_procs)}")
    if ours:
        problems.append(f"shared-memory segments left: {[str(s) for s in ours]}")
        for seg in ours:
            seg.unlink(missing_ok=True)
    if metrics_dirs:
        problems.append(f"metrics directories left: {[str(d) for d in metrics_dirs]}")
        for d in metrics_dirs:
            shutil.rmtree(d, ignore_errors=True)
    assert not problems, "; ".join(problems)


@pytest.fixture
def instance(children: Children) -> Iterator[str]:  # noqa: F811 - the fixture above
    """A fresh shm instance name; its segments are removed afterwards (children are reaped
    first: tests/test_shm_segment.py, tests/test_bufpool.py)."""
    import secrets

    name = f"test-{secrets.token_hex(4)}"
    yield name
    children.reap_all()
    remove_instance(name)
    assert segment_names(name) == []


@pytest.fixture
def agent() -> Iterator[WorkloadAPIServer]:
    """A real gRPC SPIFFE Workload API agent in a subprocess (tests/support/workload_api_server.py),
    stopped after the test."""
    with WorkloadAPIServer() as server:
        yield server
