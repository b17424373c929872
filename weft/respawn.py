"""The supervisor's records of its children, and when a dead one comes back.

`Child` is what the supervisor knows of a forked worker (slot, generation, whether it was
retired on purpose, its SIGKILL deadline); `SlotState` what it keeps per worker slot across
the slot's successive workers: the respawn backoff and when the next respawn is due.

The supervisor respawns a worker on its slot, and its helper processes (`HelperProcess`: the
admin process, the identity process), whenever one dies unexpectedly. A child that had been
up a while (`YOUNG` seconds or more) crashed: it comes back at once. One that dies young is
failing (a bad middleware, a full disk): each death in a row doubles the wait, from 0.2 s up
to `RESPAWN_BACKOFF_MAX`, so a failing child costs a few forks a second at first and one every
ten seconds after, instead of a fork loop. The clock is the caller's (a fake one in tests).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RESPAWN_BACKOFF_MAX", "YOUNG", "Backoff", "Child", "HelperProcess", "SlotState"]

log = logging.getLogger("weft.supervisor")

RESPAWN_BACKOFF_MAX = 10.0  # seconds between attempts for a child that keeps dying young
YOUNG = 5.0  # a child that dies within this of its start counts as failing, not crashing
FIRST_DELAY = 0.1  # doubled per death in a row: the first young death waits 0.2 s


class Backoff:
    """The respawn delay of one supervised child (a worker slot, the admin process)."""

    __slots__ = ("failures",)

    def __init__(self) -> None:
        self.failures = 0  # young deaths in a row

    def delay(self, lived: float) -> float:
        """Seconds to wait before the respawn of a child that lived `lived` seconds."""
        if lived < YOUNG:
            self.failures += 1
            return min(FIRST_DELAY * 2**self.failures, RESPAWN_BACKOFF_MAX)
        self.failures = 0
        return 0.0

    def reset(self) -> None:
        """The next death starts the count again (a deliberate restart is no failure)."""
        self.failures = 0


@dataclass
class Child:
    """A forked worker, from `fork` to its reaping."""

    pid: int
    slot: int
    generation: int
    started: float  # time.monotonic() at the fork
    retiring: bool = False  # drained on purpose: do not respawn
    kill_at: float | None = None  # SIGKILL after this (drain deadline, watchdog)
    aborted: bool = False  # the watchdog sent SIGABRT


@dataclass
class SlotState:
    """A worker slot's respawn state, kept across the slot's workers."""

    backoff: Backoff = field(default_factory=Backoff)
    respawn_at: float | None = None  # time.monotonic() of the due respawn


class HelperProcess(ABC):
    """One of the supervisor's children that is not a worker (`weft.admin.AdminProcess`,
    `weft.identity_process.IdentityProcess`), as the supervisor keeps it: forked by `spawn`,
    `reaped` with a respawn due after `Backoff`'s delay, respawned by `tick`, restarted on
    purpose by `restart` (at once: no failure), and stopped by `stop_process` (SIGTERM, a
    bounded wait, then SIGKILL). Subclasses say what the child does (`spawn`) and what it is
    called in the log (`name`)."""

    name = "helper process"
    kill_grace = 2.0  # SIGTERM -> SIGKILL when the supervisor stops it

    def __init__(self) -> None:
        self.pid: int | None = None
        self.started = 0.0
        self.backoff = Backoff()
        self.respawn_at: float | None = None

    @abstractmethod
    def spawn(self, preamble: Any) -> int:
        """Fork the child (with `_fork`) and log it; the pid."""

    def _fork(self, child_main: Callable[[], None]) -> int:
        """Fork; the child runs `child_main`, which never returns (`os._exit`)."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's life is in child_main
            child_main()
        self.pid = pid
        self.started = time.monotonic()
        self.respawn_at = None
        return pid

    def reaped(self, pid: int, how: str) -> bool:
        """A child was reaped; True if it was this one (a respawn is then due)."""
        if pid != self.pid:
            return False
        self.pid = None
        delay = self.backoff.delay(time.monotonic() - self.started)
        log.warning("%s %d exited (%s); respawning in %.1fs", self.name, pid, how, delay)
        self.respawn_at = time.monotonic() + delay
        return True

    def tick(self, preamble: Callable[[], Any]) -> None:
        """A respawn, if one is due (`preamble` makes the child's preamble then)."""
        if self.pid is None and self.respawn_at is not None and time.monotonic() >= self.respawn_at:
            self.spawn(preamble())

    def restart(self) -> None:
        """End the running child so that `tick` starts a new one at once (not a young death)."""
        if self.pid is not None:
            self.kill(signal.SIGTERM)
            self.backoff.reset()
            self.started = 0.0

    def kill(self, signum: int) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def stop_process(self) -> None:
        """SIGTERM, up to `kill_grace` for it to exit, then SIGKILL; reaped either way."""
        pid = self.pid
        if pid is None:
            return
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        while True:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # reaped already
            if done:
                break
            if time.monotonic() >= deadline:
                self.kill(signal.SIGKILL)
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
                break
            time.sleep(0.02)
        self.pid = None
