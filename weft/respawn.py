"""When a dead child of the supervisor comes back: the respawn backoff, as pure arithmetic.

The supervisor respawns a worker on its slot, and the admin process, whenever one dies
unexpectedly. A child that had been up a while (`YOUNG` seconds or more) crashed: it comes
back at once. One that dies young is failing (a bad middleware, a full disk): each death in a
row doubles the wait, from 0.2 s up to `RESPAWN_BACKOFF_MAX`, so a failing child costs a few
forks a second at first and one every ten seconds after, instead of a fork loop. The clock is
the caller's (a fake one in tests).
"""

from __future__ import annotations

__all__ = ["RESPAWN_BACKOFF_MAX", "YOUNG", "Backoff"]

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
