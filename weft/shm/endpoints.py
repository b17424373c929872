"""Per-endpoint shared words: health, prober lease, outlier state, breaker state, trial and
window, one record per in-flight column.

This module owns where the words of issue 9's state machines live (`weft.health`,
`weft.outlier`, `weft.adaptive` decide what they hold) and who releases the owner-tagged ones.
A record is indexed by the endpoint's in-flight column (`weft.workers.shared.ColumnMap`), so it
has the column's life: it survives a reload for an endpoint that still exists, and a column
given to a new endpoint has its record zeroed first (`reset`).

Layout: 16 words (two cache lines) per record. A record is written by every worker, so
records are padded to whole cache lines: two endpoints' words on one line would make the
workers that serve them contend for it.

=========  =========================================================================
word       what it holds
=========  =========================================================================
HEALTH     `weft.health` word (state, runs, change count); written by the lease holder
LEASE      `weft.health.lease` word: the prober's pid and the lease's expiry
OUTLIER    `weft.outlier` word (runs, ejections, ejection end); CAS by any worker
BREAKER    `weft.adaptive` state word; CAS by any worker
TRIAL      the half-open trial: its claimer's pid, 0 when free (CAS 0 -> pid)
WINDOW..   `weft.adaptive.BUCKETS` bucket words of the breaker's sliding window
=========  =========================================================================

Ownership: LEASE and TRIAL are owner-tagged. `reclaim(pid)` (the supervisor's, through
`weft.shm.owners`) frees the leases and trials a dead worker held, so its endpoint's probes and
the next half-open trial go on at once instead of after the lease expires.
"""

from __future__ import annotations

from weft.adaptive import BUCKETS
from weft.health import lease_owner
from weft.shm.atomics import WORD, Atomics
from weft.shm.slots import CACHE_LINE

__all__ = ["BREAKER", "HEALTH", "LEASE", "OUTLIER", "TRIAL", "WINDOW", "WORDS", "EndpointTable"]

HEALTH, LEASE, OUTLIER, BREAKER, TRIAL = range(5)
WINDOW = 5  # the first of BUCKETS words
WORDS = 16
assert WINDOW + BUCKETS <= WORDS


class EndpointTable:
    """``columns`` records of `WORDS` words at ``offset``."""

    __slots__ = ("_a", "columns", "offset")

    RECORD = WORDS * WORD

    def __init__(self, atomics: Atomics, offset: int, columns: int) -> None:
        if offset % CACHE_LINE:
            raise ValueError(f"endpoint table offset {offset} is not cache-line aligned")
        if columns < 1:
            raise ValueError(f"an endpoint table needs at least one record, not {columns}")
        if offset + self.size_for(columns) > atomics.size:
            raise ValueError(
                f"endpoint table of {columns} records at {offset} does not fit in "
                f"{atomics.size} bytes"
            )
        self._a = atomics
        self.offset = offset
        self.columns = columns

    @property
    def atomics(self) -> Atomics:
        return self._a

    @staticmethod
    def size_for(columns: int) -> int:
        return columns * EndpointTable.RECORD

    def address(self, column: int, word: int) -> int:
        """The byte offset of one word (for a caller's own CAS loop)."""
        if not 0 <= column < self.columns:
            raise IndexError(f"column {column} out of range 0..{self.columns - 1}")
        return self.offset + column * self.RECORD + word * WORD

    def load(self, column: int, word: int) -> int:
        return self._a.load(self.address(column, word))

    def cas(self, column: int, word: int, expected: int, new: int) -> bool:
        return self._a.cas(self.address(column, word), expected, new)

    def window(self, column: int) -> list[int]:
        base = self.address(column, WINDOW)
        return [self._a.load(base + i * WORD) for i in range(BUCKETS)]

    def claim_trial(self, column: int, pid: int) -> bool:
        """Take the endpoint's half-open trial for `pid` (CAS 0 -> pid)."""
        return self._a.cas(self.address(column, TRIAL), 0, pid)

    def release_trial(self, column: int, pid: int) -> bool:
        """Give the trial back (only its holder can: a late release changes nothing)."""
        return self._a.cas(self.address(column, TRIAL), pid, 0)

    def reset(self, column: int) -> None:
        """Zero a record before its column serves a new endpoint (the supervisor, while no
        worker uses the column)."""
        base = self.address(column, 0)
        for i in range(WORDS):
            self._a.store(base + i * WORD, 0)

    def reclaim(self, pid: int) -> int:
        """Free the leases and trials `pid` held; return how many."""
        freed = 0
        a = self._a
        for column in range(self.columns):
            lease = self.address(column, LEASE)
            word = a.load(lease)
            if word and lease_owner(word) == pid and a.cas(lease, word, 0):
                freed += 1
            if a.cas(self.address(column, TRIAL), pid, 0):
                freed += 1
        return freed
