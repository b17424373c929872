"""Forked children for shared-memory tests: started with `fork`, reaped with a deadline."""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator

import pytest

WAIT_S = 60.0  # bound on any child's run; generous for a loaded 2-core CI machine


class Children:
    """Forked children of one test: started with `fork`, reaped with `wait` or at teardown."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def fork(self, fn: Callable[[], None]) -> int:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                fn()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        self.pids.append(pid)
        return pid

    def wait(self, pid: int, timeout: float = WAIT_S) -> int:
        """The child's exit code (negative: killed by that signal); fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pids.remove(pid)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                pytest.fail(f"child {pid} still running after {timeout}s")
            time.sleep(0.002)

    def reap_all(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        self.pids.clear()


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    yield c
    c.reap_all()


