"""The supervisor's records of its children, and when a dead one comes back.

`Child` is what the supervisor knows of a forked worker (slot, generation, whether it was
retired on purpose, its SIGKILL deadline); `SlotState` what it keeps per worker slot across
the slot's successive workers: the respawn backoff and when the next respawn is due.

The supervisor respawns a worker on its slot, and the admin process, whenever one dies
unexpectedly. A child that had been up a while (`YOUNG` seconds or more) crashed: it comes
back at once. One that dies young is failing (a bad middleware, a full disk): each death in a
row doubles the wait, from 0.2 s up to `RESPAWN_BACKOFF_MAX`, so a failing child costs a few
forks a second at first and one every ten seconds after, instead of a fork loop. The clock is
the caller's (a fake one in tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RESPAWN_BACKOFF_MAX", "YOUNG", "Backoff", "Child", "SlotState"]

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
