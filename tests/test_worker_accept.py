"""Unit tests for the accept loop's error handling (weft.workers.worker.Worker.accept_loop).

The listener is a stand-in whose accept() fails as a real one does when the worker is out of
descriptors or a queued client gave up; the clock is trio's autojump MockClock, so ten retries
a second for half a minute run in no real time. The judges are the worker's log (caplog) and
its `accept_errors` counter.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
from collections import Counter
from pathlib import Path

import pytest
import trio
from support.config import MINIMAL_CONFIG

from weft import config
from weft.metrics import ACCEPT_ERRNOS
from weft.workers.worker import ACCEPT_BACKOFF, ACCEPT_WARN_INTERVAL, Worker

CONFIG = MINIMAL_CONFIG

MORE = re.compile(r"\((\d+) more since the last message\)")


class FailingListener:
    """A listening socket whose accept() raises OSError(code) for each of `codes` in turn,
    then keeps raising the last one. Records the (trio) time of every call."""

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)
        self.times: list[float] = []

    def accept(self) -> tuple[object, object]:
        self.times.append(trio.current_time())
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        raise OSError(code, os.strerror(code))


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    path = tmp_path / "weft.toml"
    path.write_text(CONFIG)
    return Worker(config.load(path), None)


def accept_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "weft.worker" and r.getMessage().startswith("accept:")]


async def test_a_lasting_emfile_is_logged_once_per_interval_and_counted_every_time(
        worker, caplog, autojump_clock):
    caplog.set_level(logging.WARNING, logger="weft.worker")
    listener = FailingListener(errno.EMFILE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.accept_loop, listener, nursery)

        # 1. the first failure is logged at once, as a warning, and counted
        await trio.sleep(ACCEPT_BACKOFF / 2)
        assert accept_warnings(caplog) == ["accept: Too many open files; backing off 0.1s"]
        assert [r.levelno for r in caplog.records if r.name == "weft.worker"] == [
            logging.WARNING]
        assert worker.accept_errors == Counter(EMFILE=1)

        # 2. retried every ACCEPT_BACKOFF: each failure counted, none logged until the interval
        #    is over
        await trio.sleep(ACCEPT_WARN_INTERVAL - ACCEPT_BACKOFF)
        assert len(accept_warnings(caplog)) == 1
        assert worker.accept_errors["EMFILE"] == len(listener.times) == 100

        # 3. then one line, saying how many it left out
        await trio.sleep(2 * ACCEPT_BACKOFF)
        lines = accept_warnings(caplog)
        assert len(lines) == 2, lines
        m = MORE.search(lines[1])
        assert m and lines[1].startswith("accept: Too many open files ("), lines[1]
        # the failures at 0.1 s ... ~10 s (float sums put the last one either side of 10 s)
        assert int(m.group(1)) in (99, 100)

        # 4. and so on, one line per interval, as long as the shortage lasts (each line may
        #    come one retry late: the time of the last line plus the interval)
        await trio.sleep(2 * ACCEPT_WARN_INTERVAL + 5 * ACCEPT_BACKOFF)
        lines = accept_warnings(caplog)
        assert len(lines) == 4, lines
        assert all(int(MORE.search(line).group(1)) in (99, 100) for line in lines[1:])
        nursery.cancel_scope.cancel()

    gaps = [b - a for a, b in itertools.pairwise(listener.times)]
    assert all(g == pytest.approx(ACCEPT_BACKOFF) for g in gaps)
    assert worker.accept_errors == Counter(EMFILE=len(listener.times))
    # every failed accept gave its connection token back
    assert worker.connections.value == worker.config.limits.max_connections


async def test_a_client_that_gave_up_while_queued_is_counted_not_logged(
        worker, caplog, autojump_clock):
    caplog.set_level(logging.WARNING, logger="weft.worker")
    # Two aborted clients, taken without a pause, then the worker runs out of descriptors.
    listener = FailingListener(errno.ECONNABORTED, errno.EPROTO, errno.ENFILE)
    with trio.move_on_after(ACCEPT_BACKOFF / 2):
        async with trio.open_nursery() as nursery:
            await worker.accept_loop(listener, nursery)
    assert listener.times == [0.0, 0.0, 0.0]
    assert worker.accept_errors == Counter(ECONNABORTED=1, EPROTO=1, ENFILE=1)
    assert accept_warnings(caplog) == [
        "accept: Too many open files in system; backing off 0.1s"]
    # every name counted is a label value of weft_accept_errors_total, present from the start
    assert set(worker.accept_errors) <= set(ACCEPT_ERRNOS)


async def test_another_accept_error_is_raised_uncounted(worker, autojump_clock):
    listener = FailingListener(errno.EBADF)
    async with trio.open_nursery() as nursery:
        with pytest.raises(OSError) as e:
            await worker.accept_loop(listener, nursery)
    assert e.value.errno == errno.EBADF
    assert worker.accept_errors == Counter()
    assert worker.connections.value == worker.config.limits.max_connections
