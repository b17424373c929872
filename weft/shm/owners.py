"""Who releases what a dead process held: one registry of every owner-tagged shared structure.

Every shared structure with claimable slots tags a claimed slot with its holder's pid (the
worker table's rows, the in-flight matrix through those rows, and what comes next: half-open
breaker trials, prober leases, buffers of the shared pool, rate-limit entries being
inserted). When a worker dies, the supervisor must release *all* of them before it reaps the
pid (``waitid(WNOWAIT)``: an unreaped zombie's pid cannot be reused, so nobody newer holds
slots under it yet). A structure that is added later and forgotten in the supervisor's
reclaim would leak its slots one dead worker at a time; so the rule is structural instead:
whoever lays out a structure with owner tags registers it here, and the supervisor's reclaim
is one call, `OwnerRegistry.reclaim`, that walks them all.

A registered structure is anything with ``reclaim(pid) -> int`` (`Reclaimable`): free every
slot tagged with `pid`, return how many. `weft.shm.slots.SlotArray` and
`weft.shm.table.KeyedTable` already are. They run in registration order, so a structure
whose slots are found through another's (the in-flight rows through the worker table's rows)
registers before the one it depends on.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["OwnerRegistry", "Reclaimable"]


class Reclaimable(Protocol):
    def reclaim(self, pid: int) -> int:
        """Release every slot `pid` (dead, not yet reaped) holds; return how many."""
        ...


class OwnerRegistry:
    """The owner-tagged structures of one process's view of shared memory, by name."""

    def __init__(self) -> None:
        self._structures: dict[str, Reclaimable] = {}

    def register(self, name: str, structure: Reclaimable) -> None:
        """Add `structure` under `name` (unique: names label the reclaim counts)."""
        if name in self._structures:
            raise ValueError(f"a shared structure named {name!r} is registered already")
        self._structures[name] = structure

    @property
    def names(self) -> list[str]:
        return list(self._structures)

    def reclaim(self, pid: int) -> dict[str, int]:
        """Release what `pid` held in every registered structure, in registration order.

        Returns the slots released per structure name (zeros included). Raises ValueError for
        a pid <= 0, before touching anything.
        """
        if pid <= 0:
            raise ValueError(f"owner pid must be positive, not {pid}")
        return {name: s.reclaim(pid) for name, s in self._structures.items()}
