"""A fixed-capacity keyed table in shared memory, safe for concurrent insert from many processes.

This module owns `KeyedTable`: open addressing on a 64-bit key hash with linear probing,
tombstones and idle eviction, for per-key shared state (a GCRA bucket per client IP, a breaker
per endpoint). Values are caller-defined words, updated with `weft.shm.atomics.Atomics`
operations at `value_offset`; the table only finds, inserts and removes entries.

Layout: ``capacity`` entries of ``3 + value_words`` words::

    key      EMPTY (0), TOMBSTONE (1), a published key hash (>= 2), or -pid: reserved by pid
    used     last-used time (the caller's clock; time.monotonic_ns() is system-wide)
    pending  while reserved: the hash being inserted; meaningless otherwise
    value 0 .. value_words-1

Keys. ``blake2b(key, digest_size=8)`` (stable across processes, unlike ``hash()``), top bit
cleared; hashes 0 and 1 (EMPTY and TOMBSTONE) become 2 and 3. Only the hash is stored: two keys
with the same 63-bit hash share an entry (for 10**6 keys the chance of any such pair is about
10**-7). A key lives within `MAX_PROBE` entries of its home ``hash % capacity``: a probe never
goes further, so a table whose free entries are all further away answers None ("full") for that
key instead of scanning the whole table. Size the table at about twice the keys expected.

Insert protocol (why there is a reserved state): an entry that becomes visible must already
have zeroed values, and two processes inserting the same key at once must end with one entry.
`find_or_insert`:

1. Scan the key's probe window: the published hash -> done. A reservation for the same hash
   -> wait until it resolves, then rescan. Otherwise remember the first free entry (tombstone
   or EMPTY; the scan stops at EMPTY: nothing is placed beyond one).
2. Reserve it: ``CAS(free -> -pid)``, then ``pending = hash``, zero the values, ``used = now``.
3. Settle: rescan the window. The hash published elsewhere -> give ours back (TOMBSTONE) and
   use that one. A reservation for the same hash *earlier* in the window -> give ours back and
   start again (step 1 then waits for it). One *later* in the window -> wait until it resolves,
   then settle again. None -> publish: ``CAS(-pid -> hash)``.

Two reservers of one hash each write their reservation and then read the other's (all seq-cst),
so at least one of them sees the other (the Dekker argument): the later one gives way, or the
earlier one waits and then sees the later one's published hash. Waits only go from an earlier
entry to a later one, so they cannot form a cycle. A reserver that dies leaves ``-pid``: whoever
waits on it checks the pid and clears a dead one's reservation, and `reclaim` (the supervisor,
for a dead worker) and `evict_idle` clear them too. Every wait is bounded (`INSERT_MAX_WAIT`);
past it `find_or_insert` answers None, as for a full table.

Removal. `delete` and `evict_idle` turn a published hash into a TOMBSTONE with a CAS; inserts
reuse tombstones. Entries never go back to EMPTY (that could cut another key's probe chain
under a concurrent insert), which is why probes are bounded. An index is valid until its entry
is deleted or evicted: callers find the entry for each operation rather than keeping indexes,
and evict entries idle for far longer than any operation takes (an update racing the eviction
of its entry is lost, as if the entry had been evicted just before).
"""

from __future__ import annotations

import hashlib
import os
import time

from weft.shm.atomics import WORD, Atomics
from weft.shm.slots import round_up

__all__ = ["EMPTY", "INSERT_MAX_WAIT", "MAX_PROBE", "TOMBSTONE", "KeyedTable", "key_hash"]

EMPTY = 0
TOMBSTONE = 1
# Probe window. Linear probing at load factor 0.5 has an expected probe length of 1.5 for a hit
# and 2.5 for a miss (Knuth, TAOCP vol. 3, 6.4); 64 leaves room for clustering and tombstones
# while bounding a miss to 64 word reads.
MAX_PROBE = 64
# How long an insert waits for another process's reservation of the same key. A reservation
# lasts a few microseconds unless its holder is preempted (a scheduler slice, milliseconds).
INSERT_MAX_WAIT = 0.05
_SPIN = 16  # polls of a reservation before yielding the CPU and checking its holder's pid
_HASH_MASK = (1 << 63) - 1

# Entry word offsets (in words).
_KEY, _USED, _PENDING, _VALUES = 0, 1, 2, 3


def key_hash(key: bytes) -> int:
    """The stored hash of `key`: 63-bit blake2b, never EMPTY or TOMBSTONE."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & _HASH_MASK
    return h + 2 if h < 2 else h


# Linux's largest possible pid (PID_MAX_LIMIT, include/linux/threads.h): a reservation word
# naming anything else is damage, treated as a dead holder's.
PID_MAX_LIMIT = 1 << 22


def _alive(pid: int) -> bool:
    if not 0 < pid <= PID_MAX_LIMIT:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Restart(Exception):
    """Internal: give the reservation back and start the insert again."""


class _Budget:
    """One insert's allowance for waiting on others, started at the first wait."""

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        self.deadline: float | None = None

    def left(self) -> bool:
        """Start the clock, or say whether time is left."""
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + INSERT_MAX_WAIT
            return True
        return now < self.deadline


class KeyedTable:
    """``capacity`` entries of ``value_words`` values at ``offset``; see the module docstring."""

    __slots__ = ("_a", "_entry", "_probe", "capacity", "offset", "value_words")

    def __init__(self, atomics: Atomics, offset: int, capacity: int, value_words: int) -> None:
        if offset % WORD:
            raise ValueError(f"keyed table offset {offset} is not 8-byte aligned")
        if capacity < 1 or value_words < 0:
            raise ValueError(f"keyed table: capacity {capacity}, value_words {value_words}")
        if offset + KeyedTable.size_for(capacity, value_words) > atomics.size:
            raise ValueError(
                f"keyed table of {capacity} entries at offset {offset} does not fit "
                f"{atomics.size} bytes"
            )
        self._a = atomics
        self.offset = offset
        self.capacity = capacity
        self.value_words = value_words
        self._entry = WORD * (_VALUES + value_words)
        self._probe = min(capacity, MAX_PROBE)

    @staticmethod
    def size_for(capacity: int, value_words: int) -> int:
        """Bytes for the table (a whole number of cache lines)."""
        return round_up(WORD * (_VALUES + value_words) * capacity)

    # -- addresses ---------------------------------------------------------------------------

    def _base(self, index: int) -> int:
        return self.offset + self._entry * index

    def _check(self, index: int) -> int:
        if not 0 <= index < self.capacity:
            raise IndexError(f"entry {index} out of range (0..{self.capacity - 1})")
        return self._base(index)

    def value_offset(self, index: int, word: int) -> int:
        """Byte offset of value `word` of entry `index`, for the caller's Atomics operations."""
        if not 0 <= word < self.value_words:
            raise IndexError(f"value word {word} out of range (0..{self.value_words - 1})")
        return self._check(index) + WORD * (_VALUES + word)

    def _window(self, h: int) -> range:
        home = h % self.capacity
        return range(home, home + self._probe)

    # -- lookups -----------------------------------------------------------------------------

    def find(self, key: bytes) -> int | None:
        """The index of `key`'s entry, or None. Does not touch it."""
        h = key_hash(key)
        load, cap = self._a.load, self.capacity
        for i in self._window(h):
            index = i - cap if i >= cap else i
            k = load(self._base(index))
            if k == h:
                return index
            if k == EMPTY:
                return None
        return None

    @property
    def atomics(self) -> Atomics:
        return self._a

    def addresses(self, index: int) -> tuple[int, int, int]:
        """Byte offsets of entry `index`'s key word, last-used word and first value word, for
        a caller that keeps them (and checks the key word still holds its hash before use)."""
        base = self._check(index)
        return base, base + WORD * _USED, base + WORD * _VALUES

    def holds(self, index: int, h: int) -> bool:
        """Whether entry `index` is published for the key hash `h` (one load): how a caller
        that remembers an index checks it was not evicted and reused meanwhile."""
        return self._a.load(self._check(index)) == h

    def touch(self, index: int, now: int) -> None:
        """Mark entry `index` used at `now` (keeps it from `evict_idle`)."""
        self._a.store(self._check(index) + WORD * _USED, now)

    def last_used(self, index: int) -> int:
        return self._a.load(self._check(index) + WORD * _USED)

    def __len__(self) -> int:
        """Published entries now (reads every key word: O(capacity))."""
        load = self._a.load
        return sum(1 for i in range(self.capacity) if load(self._base(i)) > TOMBSTONE)

    # -- insert ------------------------------------------------------------------------------

    def find_or_insert(self, key: bytes, now: int) -> int | None:
        """The index of `key`'s entry, inserting it (values zero) if absent; touched at `now`.

        None when no entry can be had: no free entry within `MAX_PROBE` of the key's home (the
        table is full for this key), or another process stalled mid-insert of the same key for
        `INSERT_MAX_WAIT`. Callers count None as a metric and apply their fail-open/closed
        decision; this never raises for a full table.
        """
        h = key_hash(key)
        a = self._a
        pid = os.getpid()
        budget = _Budget()
        while True:
            found, free, seen = self._scan(h, budget)
            if found is not None:
                a.store(self._base(found) + WORD * _USED, now)
                return found
            if free is None:
                return None  # full, or waited too long on another reservation
            base = self._base(free)
            if not a.cas(base, seen, -pid):
                if not budget.left():
                    return None
                continue  # taken under us: rescan
            try:
                a.store(base + WORD * _PENDING, h)
                for w in range(self.value_words):
                    a.store(base + WORD * (_VALUES + w), 0)
                a.store(base + WORD * _USED, now)
                result = self._settle(h, free, pid, budget)
            except _Restart:
                a.cas(base, -pid, TOMBSTONE)
                if not budget.left():
                    return None
                continue
            except BaseException:
                a.cas(base, -pid, TOMBSTONE)  # never leave our reservation behind
                raise
            if result is None or result != free:
                a.cas(base, -pid, TOMBSTONE)
            if result is not None and result != free:
                a.store(self._base(result) + WORD * _USED, now)
            return result

    def _scan(self, h: int, budget: _Budget) -> tuple[int | None, int | None, int]:
        """Step 1: (found index, None, 0) or (None, first free index, its key word) or
        (None, None, 0) when there is no free entry or a same-key reservation did not clear."""
        load, cap = self._a.load, self.capacity
        while True:
            free: int | None = None
            seen = EMPTY
            busy: int | None = None
            for i in self._window(h):
                index = i - cap if i >= cap else i
                base = self._base(index)
                k = load(base)
                if k == h:
                    return index, None, 0
                if k == EMPTY:
                    if free is None:
                        free, seen = index, EMPTY
                    break
                if k == TOMBSTONE:
                    if free is None:
                        free, seen = index, TOMBSTONE
                elif k < 0 and load(base + WORD * _PENDING) == h:
                    busy = index
                    break
            if busy is None:
                return None, free, seen
            if not self._wait(busy, budget):
                return None, None, 0

    def _settle(self, h: int, mine: int, pid: int, budget: _Budget) -> int | None:
        """Step 3, holding a reservation of `mine`: the index to use (ours once published)."""
        a, cap = self._a, self.capacity
        load = a.load
        window = self._window(h)
        mine_pos = (mine - window.start) % cap
        while True:
            later: int | None = None
            for pos, i in enumerate(window):
                index = i - cap if i >= cap else i
                if index == mine:
                    continue
                base = self._base(index)
                k = load(base)
                if k == EMPTY:
                    break
                if k == h:
                    return index  # published by someone else: use theirs
                if k < 0 and load(base + WORD * _PENDING) == h:
                    if pos < mine_pos:
                        raise _Restart  # an earlier reservation of this key wins
                    later = index
            if later is None:
                if a.cas(self._base(mine), -pid, h):
                    return mine
                raise _Restart  # our reservation was cleared (a pid check gone wrong)
            if not self._wait(later, budget):
                return None

    def _wait(self, index: int, budget: _Budget) -> bool:
        """Wait for the reservation at `index` to resolve. False when the budget is spent."""
        load, cas = self._a.load, self._a.cas
        base = self._base(index)
        held = load(base)
        if held >= 0:
            return True
        spins = 0
        while load(base) == held:  # until published, given back, or cleared
            spins += 1
            if spins > _SPIN:
                if not _alive(-held):
                    cas(base, held, TOMBSTONE)  # its reserver died mid-insert
                elif not budget.left():
                    return False
                else:
                    os.sched_yield()
        return True

    # -- removal -----------------------------------------------------------------------------

    def delete(self, key: bytes) -> bool:
        """Remove `key`'s entry (it becomes a tombstone). False when it was not there."""
        index = self.find(key)
        if index is None:
            return False
        return self._a.cas(self._base(index), key_hash(key), TOMBSTONE)

    def evict_idle(self, older_than: int) -> int:
        """Remove entries last used before `older_than`; how many were removed.

        Also clears reservations left by dead processes (not counted).
        """
        load, cas = self._a.load, self._a.cas
        evicted = 0
        for i in range(self.capacity):
            base = self._base(i)
            k = load(base)
            if k > TOMBSTONE:
                if load(base + WORD * _USED) < older_than and cas(base, k, TOMBSTONE):
                    evicted += 1
            elif k < 0 and not _alive(-k):
                cas(base, k, TOMBSTONE)
        return evicted

    def reclaim(self, pid: int) -> int:
        """Clear the reservations of `pid` (dead, unreaped); how many. For the supervisor."""
        if pid <= 0:
            raise ValueError(f"pid must be positive, not {pid}")
        load, cas = self._a.load, self._a.cas
        cleared = 0
        for i in range(self.capacity):
            base = self._base(i)
            if load(base) == -pid and cas(base, -pid, TOMBSTONE):
                cleared += 1
        return cleared
