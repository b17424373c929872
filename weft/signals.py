"""Signals as a queue: the handlers only enqueue, and a wake-up pipe ends the loop's wait.

The supervisor (`weft.supervisor`) must never do work inside a signal handler: a handler runs
between any two bytecodes of the main thread, in the middle of a fork, a reap or a reload. So a
handler appends the signal number to `SignalQueue.pending` and nothing else, and
``signal.set_wakeup_fd`` writes a byte to a pipe, which ends the `SignalQueue.wait` in the loop
at once (Python would retry an interrupted ``select`` with the rest of its timeout, PEP 475).
The loop then takes the queue and dispatches each signal itself; tests can drive the same
dispatch by filling the queue.

At most `MAX_PENDING` signals wait: a storm of one signal cannot grow the queue, and more than
that many distinct requests between two loop turns mean nothing more than a few do.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterable

__all__ = ["MAX_PENDING", "SignalQueue"]

MAX_PENDING = 16


class SignalQueue:
    """The pending signals of this process and the pipe that wakes its loop."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._pipe: tuple[int, int] | None = None

    def install(self, signals: Iterable[int]) -> None:
        """Make the wake-up pipe and route `signals` into the queue (main thread only)."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._pipe = (r, w)
        signal.set_wakeup_fd(w)
        for signum in signals:
            signal.signal(signum, self._enqueue)

    def _enqueue(self, signum: int, _frame: object) -> None:
        if len(self.pending) < MAX_PENDING:
            self.pending.append(signum)

    @property
    def fds(self) -> tuple[int, ...]:
        """The pipe's descriptors (a forked child closes them)."""
        return self._pipe or ()

    def wait(self, timeout: float) -> None:
        """Return when a signal is pending, or after `timeout` seconds."""
        assert self._pipe is not None, "install() first"
        if self.pending:
            return
        try:
            select.select([self._pipe[0]], [], [], timeout)
        except InterruptedError:
            pass
        try:
            while os.read(self._pipe[0], 256):
                pass
        except BlockingIOError:
            pass

    def take(self) -> list[int]:
        """The pending signals, oldest first; the queue is empty afterwards."""
        queue, self.pending = self.pending, []
        return queue

    def close(self) -> None:
        """Stop waking (the handlers stay: they only enqueue) and close the pipe."""
        signal.set_wakeup_fd(-1)
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
