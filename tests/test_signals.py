"""The supervisor's signal queue, with real signals sent to this process."""

from __future__ import annotations

import os
import signal
import time

from weft.signals import MAX_PENDING, SignalQueue


def test_a_signal_is_queued_and_ends_the_wait_at_once():
    old = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGUSR2)
    queue = SignalQueue()
    queue.install([signal.SIGUSR1, signal.SIGUSR2])
    try:
        # 1. nothing pending: the wait lasts its timeout
        started = time.monotonic()
        queue.wait(0.2)
        assert time.monotonic() - started >= 0.15 and queue.take() == []
        # 2. two signals: queued in order, the wait returns at once
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        started = time.monotonic()
        queue.wait(5.0)
        assert time.monotonic() - started < 1.0
        assert queue.take() == [signal.SIGUSR2, signal.SIGUSR1]
        assert queue.take() == []
        # 3. a storm is bounded
        for _ in range(MAX_PENDING + 10):
            os.kill(os.getpid(), signal.SIGUSR1)
        assert len(queue.take()) == MAX_PENDING
    finally:
        queue.close()
        signal.signal(signal.SIGUSR1, old[0])
        signal.signal(signal.SIGUSR2, old[1])
    assert queue.fds == ()
