"""Owner-tagged slots: a fixed array of claimable things, each tagged with its holder's pid.

This module owns `SlotArray`, the allocator behind every claimable shared thing (a buffer of
the shared pool, a breaker's half-open trial, a prober's lease): one owner word per slot, 0 when
free, the holder's pid when claimed. What a slot *is* belongs to the caller; this module only
says who holds which.

Theory of operation:

* Claim is ``CAS(0 -> pid)`` on the slot's word, release is ``CAS(pid -> 0)``: no lock, so a
  holder that dies cannot leave a lock held; it leaves slots tagged with its pid instead.
* Crash recovery: when a worker dies, the supervisor calls ``reclaim(pid)``, which releases
  every slot tagged with that pid, *before* reaping it (``waitid(WNOWAIT)``, then ``waitpid``):
  while the dead worker is an unreaped zombie its pid cannot be reused, so no newer process can
  hold slots under the same pid yet.
* ``release`` with the wrong pid returns False and changes nothing, so a late release by a
  worker whose slot was already reclaimed (and maybe claimed again) cannot free someone else's.
* ``claim`` scans from just past the slot this object last claimed, wrapping around, so
  successive claims do not rescan the busy prefix of the array every time. The scan reads each
  word before trying the CAS (a read is much cheaper than a failed CAS under contention).
"""

from __future__ import annotations

from weft.shm.atomics import WORD, Atomics

__all__ = ["CACHE_LINE", "SlotArray", "round_up"]

# x86-64 cache line (Intel SDM vol. 3, 11.5.3): structures are padded to it so two writers'
# words never share one line.
CACHE_LINE = 64


def round_up(n: int, to: int = CACHE_LINE) -> int:
    """`n` rounded up to a multiple of `to`."""
    return (n + to - 1) // to * to


class SlotArray:
    """``count`` owner words at ``offset`` (see the module docstring).

    Pids must be positive (0 means free). Index arguments outside ``[0, count)`` raise IndexError.
    """

    __slots__ = ("_a", "_hint", "count", "offset")

    def __init__(self, atomics: Atomics, offset: int, count: int) -> None:
        if offset % WORD:
            raise ValueError(f"slot array offset {offset} is not 8-byte aligned")
        if count < 1:
            raise ValueError(f"a slot array needs at least one slot, not {count}")
        if offset + SlotArray.size_for(count) > atomics.size:
            raise ValueError(
                f"slot array of {count} at offset {offset} does not fit {atomics.size} bytes"
            )
        self._a = atomics
        self.offset = offset
        self.count = count
        self._hint = 0

    @staticmethod
    def size_for(count: int) -> int:
        """Bytes for `count` slots (a whole number of cache lines)."""
        return round_up(WORD * count)

    def _off(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"slot {index} out of range (0..{self.count - 1})")
        return self.offset + WORD * index

    def claim(self, pid: int) -> int | None:
        """Claim a free slot for `pid`; its index, or None when every slot is taken."""
        _check_pid(pid)
        load, cas, base, count = self._a.load, self._a.cas, self.offset, self.count
        start = self._hint
        for i in range(count):
            index = start + i
            if index >= count:
                index -= count
            off = base + WORD * index
            if load(off) == 0 and cas(off, 0, pid):
                self._hint = index + 1 if index + 1 < count else 0
                return index
        return None

    def claim_at(self, index: int, pid: int) -> bool:
        """Claim slot `index` for `pid`. False when it is taken (by anyone, `pid` included)."""
        _check_pid(pid)
        return self._a.cas(self._off(index), 0, pid)

    def release(self, index: int, pid: int) -> bool:
        """Free slot `index` if `pid` holds it. False (and no change) when it does not."""
        _check_pid(pid)
        return self._a.cas(self._off(index), pid, 0)

    def owner(self, index: int) -> int:
        """The pid holding slot `index`, 0 when free."""
        return self._a.load(self._off(index))

    def owned_by(self, pid: int) -> list[int]:
        """Indexes of the slots `pid` holds now."""
        load, base = self._a.load, self.offset
        return [i for i in range(self.count) if load(base + WORD * i) == pid]

    def reclaim(self, pid: int) -> int:
        """Free every slot `pid` holds; how many were freed. For a dead, unreaped pid."""
        _check_pid(pid)
        load, cas, base = self._a.load, self._a.cas, self.offset
        freed = 0
        for i in range(self.count):
            off = base + WORD * i
            if load(off) == pid and cas(off, pid, 0):
                freed += 1
        return freed

    def in_use(self) -> int:
        """How many slots are claimed (a moment's count: others may claim or release meanwhile)."""
        load, base = self._a.load, self.offset
        return sum(1 for i in range(self.count) if load(base + WORD * i) != 0)


def _check_pid(pid: int) -> None:
    if pid <= 0:
        raise ValueError(f"owner pid must be positive, not {pid}")
