"""The owner registry: one reclaim releases a dead pid's slots in every registered structure.

Structures live in an anonymous mapping; the "dead" pid is a number no process has (reclaim
only compares owner words, it never signals the pid).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import pytest

from weft.shm.atomics import Atomics
from weft.shm.counters import InflightMatrix
from weft.shm.owners import OwnerRegistry
from weft.shm.slots import SlotArray
from weft.shm.worktable import WorkerTable
from weft.workers.shared import _InflightOfRows

DEAD = 4_000_001  # above pid_max's 2**22: never a live process
ALIVE = 4_000_002


@pytest.fixture
def atomics() -> Iterator[Atomics]:
    m = mmap.mmap(-1, 1 << 16)
    a = Atomics(m)
    yield a
    a.release()
    m.close()


def test_reclaim_walks_every_registered_structure_and_spares_other_owners(atomics):
    # 1. two structures of claimable slots: "trials" (say, half-open breaker trials) and
    #    "leases" (prober leases); the dead pid holds some of each, another pid one of each
    trials = SlotArray(atomics, 0, 8)
    leases = SlotArray(atomics, 1024, 8)
    held = [trials.claim(DEAD), trials.claim(DEAD), leases.claim(DEAD)]
    assert None not in held
    other = (trials.claim(ALIVE), leases.claim(ALIVE))
    registry = OwnerRegistry()
    registry.register("breaker_trials", trials)
    registry.register("prober_leases", leases)

    # 2. one call releases the dead pid's slots everywhere, counted per structure
    assert registry.reclaim(DEAD) == {"breaker_trials": 2, "prober_leases": 1}
    assert trials.owned_by(DEAD) == [] and leases.owned_by(DEAD) == []
    # 3. the live owner keeps its slots; a second reclaim finds nothing
    assert (trials.owned_by(ALIVE), leases.owned_by(ALIVE)) == ([other[0]], [other[1]])
    assert registry.reclaim(DEAD) == {"breaker_trials": 0, "prober_leases": 0}


def test_structures_found_through_the_worker_table_are_released_before_its_rows(atomics):
    table = WorkerTable(atomics, 0, 4)
    matrix = InflightMatrix(atomics, 4096, 4, 2)
    registry = OwnerRegistry()
    registry.register("inflight", _InflightOfRows(table, matrix))
    registry.register("worker_table", table)
    row = table.claim(DEAD, slot=0, generation=1)
    matrix.add(row.index, 1, 3)

    assert registry.reclaim(DEAD) == {"inflight": 1, "worker_table": 1}
    assert matrix.get(row.index, 1) == 0  # cleared while the row still named its owner
    assert table.rows_of(DEAD) == []


def test_names_are_unique_and_pids_positive(atomics):
    registry = OwnerRegistry()
    registry.register("a", SlotArray(atomics, 0, 1))
    with pytest.raises(ValueError, match="registered already"):
        registry.register("a", SlotArray(atomics, 64, 1))
    with pytest.raises(ValueError, match="positive"):
        registry.reclaim(0)
