"""Single-writer seqlock records: several shared words that readers see together or not at all.

This module owns `SeqlockRecord`: a sequence word followed by ``nwords`` data words, for state
that one process writes and any process reads as a whole (a worker's row, a prober's health
record). Readers never block the writer and never take a lock, so a reader that dies, or a
writer that dies mid-write, leaves nothing to clean up but the record itself.

Protocol (Lamport's sequence counter, as in the Linux kernel's ``seqcount_t``)::

    writer                                   reader
    s = seq (even)                           s1 = seq; odd -> retry (a write is under way)
    seq = s + 1   (odd: writing)             w = words
    fence                                    fence
    words = new values                       s2 = seq; s1 != s2 -> retry (it changed under us)
    fence                                    return w
    seq = s + 2   (even: done)

Every access is a seq-cst `weft.shm.atomics.Atomics` operation, so the fences are implied; they
are written out because they are the protocol. A reader retries for at most ``max_wait`` seconds
and then raises `TornRead`: it never returns a mix of two writes. A writer that died mid-write
leaves the sequence odd forever, and every read of the record raises `TornRead` until a new
writer writes it (a write that finds the sequence odd continues from the next even value).

**Only one process may write a given record**, and only one thread in it at a time: two writers
can interleave their words under one even sequence and readers would accept the mix. Words
that the owner updates on their own (a counter) may live in the record and be changed with a
single atomic operation outside `write` (no sequence bump): a read then sees some recent value
of each such word, and the sequence still keeps the rest of the record consistent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence

from weft.shm.atomics import WORD, Atomics

__all__ = ["READ_MAX_WAIT", "SeqlockRecord", "TornRead"]

# A read spins this many times before it starts yielding the CPU: a write is a handful of
# atomic stores (microseconds from Python), so a reader that meets one usually needs one retry.
_SPIN = 16
# How long a read keeps retrying before TornRead. A writer preempted mid-write is off the CPU
# for a scheduler time slice, a few milliseconds under CFS with a few runnable tasks; 50 ms is
# well past that and still short enough for the supervisor's loop.
READ_MAX_WAIT = 0.05


class TornRead(Exception):
    """No consistent read within the wait: the writer is stuck mid-write, or died there."""


class SeqlockRecord:
    """A sequence word at ``offset`` followed by ``nwords`` data words.

    Args:
        atomics: the mapping's atomics.
        offset: byte offset of the sequence word (8-byte aligned).
        nwords: data words (at least 1). The record takes `size_for(nwords)` bytes.
    """

    __slots__ = ("_a", "_seq", "_words", "nwords", "offset")

    def __init__(self, atomics: Atomics, offset: int, nwords: int) -> None:
        if offset % WORD:
            raise ValueError(f"seqlock offset {offset} is not 8-byte aligned")
        if nwords < 1:
            raise ValueError(f"a seqlock record needs at least one word, not {nwords}")
        self._a = atomics
        self.offset = offset
        self.nwords = nwords
        self._seq = offset
        self._words = [offset + WORD * (i + 1) for i in range(nwords)]

    @staticmethod
    def size_for(nwords: int) -> int:
        """Bytes of a record of `nwords` data words (the sequence word included)."""
        return WORD * (1 + nwords)

    def word_offset(self, index: int) -> int:
        """Byte offset of data word `index`, for single-word updates outside `write`."""
        return self._words[index]

    def write(self, values: Sequence[int]) -> None:
        """Replace every data word. Single writer only (see the module docstring)."""
        if len(values) != self.nwords:
            raise ValueError(f"seqlock record has {self.nwords} words, got {len(values)} values")
        self._write(zip(self._words, values, strict=True))

    def update(self, changes: Mapping[int, int]) -> None:
        """Write some data words (``{index: value}``) as one change. Single writer only."""
        words = self._words
        self._write([(words[index], value) for index, value in changes.items()])

    def _write(self, stores: Iterable[tuple[int, int]]) -> None:
        a = self._a
        seq = a.load(self._seq)
        seq += seq & 1  # odd: the previous writer died mid-write; carry on from even
        a.store(self._seq, seq + 1)
        a.fence()
        for off, value in stores:
            a.store(off, value)
        a.fence()
        a.store(self._seq, seq + 2)

    def read(self, max_wait: float = READ_MAX_WAIT) -> tuple[int, ...]:
        """All data words from one write. Raises TornRead after `max_wait` seconds of trying."""
        load = self._a.load
        fence = self._a.fence
        seq = self._seq
        words = self._words
        deadline = None
        attempt = 0
        while True:
            s1 = load(seq)
            if not s1 & 1:
                values = tuple([load(w) for w in words])
                fence()
                if load(seq) == s1:
                    return values
            attempt += 1
            if attempt > _SPIN:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + max_wait
                elif now >= deadline:
                    raise TornRead(
                        f"seqlock record at offset {self.offset}: no consistent read in "
                        f"{max_wait:g}s (sequence {s1}; writer stuck or dead mid-write)"
                    )
                os.sched_yield()

    def sequence(self) -> int:
        """The current sequence word (even: stable; odd: being written)."""
        return self._a.load(self._seq)
