"""What every child of the supervisor does first after `fork()`: one preamble, every child.

The supervisor forks three kinds of children, trio workers (`weft.workers.child`), the admin
process (`weft.admin`) and, with ``[spiffe]``, the identity process (`weft.identity_process`).
All start life as a copy of the supervisor and must undo the same
inheritance before doing anything of their own, in this order:

1. **Die with the parent**: ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` makes the supervisor's death a
   SIGTERM (a drain for a worker, an exit for the admin). It only arms from now on, so the
   child then checks it still has the parent that forked it, and exits at once if not. The
   prctl is Linux-only and bound to the forking *thread*: each child also watches its parent
   another way (a worker the liveness pipe, the admin its parent pid).
2. **Signals**: the supervisor's handlers (`Preamble.supervisor_signals`) only enqueue into the
   supervisor's own loop, which the child does not run: they go back to the defaults, then the
   ones the child must survive are ignored (a terminal hang-up or Ctrl-C reaches the whole
   process group). The supervisor's wakeup fd is dropped.
3. **File descriptors**: everything the supervisor holds that is not this child's (other
   slots' listeners, its wakeup pipe, the instance lock, the notify socket) is closed. The
   instance lock above all: a child keeping it open would keep the instance "running" after
   the supervisor died (see `weft.shm.segment`).

The supervisor fills a `Preamble` *before* forking, so ``parent_pid`` is its own pid, not what
the child would read from ``getppid()`` after an early parent death.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

__all__ = ["Preamble", "exit_child"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class Preamble:
    """What a child needs to know about its parent to detach from it (see the module docstring).

    Attributes:
        parent_pid: the supervisor's pid, taken before the fork.
        close_fds: the supervisor's descriptors this child must not keep.
        supervisor_signals: the signals the supervisor handles (reset to SIG_DFL here).
    """

    parent_pid: int
    close_fds: tuple[int, ...]
    supervisor_signals: tuple[signal.Signals, ...]

    def apply(self, *, ignore: Iterable[signal.Signals] = ()) -> None:
        """Run steps 1-3 in the forked child. Calls ``os._exit(0)`` when the parent is already
        gone; `ignore` are set to SIG_IGN after the reset. Errors closing a descriptor are
        ignored (already closed is fine: the list is the supervisor's view)."""
        _set_pdeathsig()
        if os.getppid() != self.parent_pid:
            os._exit(0)  # the supervisor died between fork and prctl
        for signum in self.supervisor_signals:
            signal.signal(signum, signal.SIG_DFL)
        for signum in ignore:
            signal.signal(signum, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        for fd in self.close_fds:
            try:
                os.close(fd)
            except OSError:
                pass


def exit_child(code: int) -> NoReturn:
    """End a child: flush what it printed and logged, then ``os._exit`` (nothing inherited,
    atexit handlers or the supervisor's buffers, runs twice)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
    finally:
        os._exit(code)


def _set_pdeathsig() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the child's other parent watch still works
        pass
