"""The post-fork preamble shared by workers and the admin process, run in real forked children.

Judge: what the child reports through a pipe, and its exit status.
"""

from __future__ import annotations

import os
import signal

from weft.workers.postfork import Preamble


def _fork(preamble: Preamble, report: int, **apply: object) -> int:
    pid = os.fork()
    if pid == 0:  # the child: apply, then report what it sees
        code = 1
        try:
            preamble.apply(**apply)  # type: ignore[arg-type]
            closed = []
            for fd in preamble.close_fds:
                try:
                    os.fstat(fd)
                except OSError:
                    closed.append(fd)
            usr1 = signal.getsignal(signal.SIGUSR1)
            usr2 = signal.getsignal(signal.SIGUSR2)
            line = f"{closed} {usr1 == signal.SIG_DFL} {usr2 == signal.SIG_IGN}\n"
            os.write(report, line.encode())
            code = 0
        finally:
            os._exit(code)
    return pid


def test_the_preamble_resets_signals_ignores_some_and_closes_the_parents_fds():
    # 1. the "supervisor" has a handler on USR1 and a descriptor the child must not keep
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    keep_r, keep_w = os.pipe()
    report_r, report_w = os.pipe()
    try:
        preamble = Preamble(os.getpid(), (keep_r, keep_w), (signal.SIGUSR1,))
        pid = _fork(preamble, report_w, ignore=(signal.SIGUSR2,))
        os.close(report_w)
        _, status = os.waitpid(pid, 0)
        # 2. the child closed both, runs USR1's default and ignores USR2; the parent still
        #    has its own copies
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.read(report_r, 200).decode() == f"{[keep_r, keep_w]} True True\n"
        os.fstat(keep_r)
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, old)
        for fd in (keep_r, keep_w, report_r):
            os.close(fd)


def test_a_child_whose_parent_is_not_the_one_recorded_exits_at_once():
    report_r, report_w = os.pipe()
    try:
        # a parent pid that is not ours: as if the supervisor died before the prctl armed
        preamble = Preamble(os.getpid() + 1_000_000, (), ())
        pid = _fork(preamble, report_w)
        os.close(report_w)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.read(report_r, 200) == b""  # it never got past apply
    finally:
        os.close(report_r)
