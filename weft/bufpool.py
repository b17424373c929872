"""The shared buffer pool: fixed-size buffers in one shared-memory segment, claimed lock-free by
any worker and tagged with its pid, so that a dead worker's buffers go back to the pool.

This module owns the pool (``[buffers] memory``): how that memory is split into size classes,
how a buffer is claimed and released without a lock, what a dead worker's reclaim does, and the
``buffers`` segment the supervisor creates before it forks. What the bytes of a buffer mean
belongs to the data path that claims it.

Size classes and the split of ``memory``
========================================

Five classes: 256 B, 1 KiB, 4 KiB, 16 KiB and 64 KiB. A claim for ``size`` bytes gets a buffer
of the smallest class that holds it (`size_class`), or nothing: it never falls back to a larger
class, which would let a burst of small claims drain the 64 KiB buffers the relay needs, and it
never allocates outside the pool.

`split_memory` first sets aside one buffer of every class (`MIN_MEMORY`, 87296 bytes: a smaller
``memory`` is a config error), then gives each class a fixed share of the rest, in bytes
(`CLASS_SHARES`, sixteenths):

=========  ======  ===================================================  ===========
class      share   why                                                  at 64 MiB
=========  ======  ===================================================  ===========
64 KiB     8/16    relay buffers: a streamed body moves through one per    512
                   direction of every exchange, the bulk of the traffic
16 KiB     4/16    a TLS record carries at most 16 KiB of plaintext        1023
                   (RFC 8446 section 5.1): the unit a TLS transport reads
4 KiB      2/16    request and response heads (nearly all under 4 KiB)     2046
1 KiB      1/16    small bodies, h2 frames, replayed small requests        4091
256 B      1/16    chunk-size lines, trailers, small control data          16363
=========  ======  ===================================================  ===========

Half the bytes go to the class the data path uses most, and every class keeps a useful count
(at 1 MiB: 8, 15, 30, 59 and 235 buffers). What the data path takes today (`weft.arena_pool`):
a 64 KiB relay buffer per direction of a body that streams (not complete in the first read),
held until that body ends, so the 64 KiB count bounds how many bodies stream at once; and the
retry middleware's replay bodies, in 64 KiB buffers and one of the smallest class that holds
their tail. Heads go through h11's own buffer, not the pool, and the 16 KiB share waits for
the TLS transport. The shares are this one table.

``memory`` counts the buffers' bytes. The segment adds its bookkeeping: a pool header, one
owner word per buffer and one bitmap bit per buffer (0.3 % at the default), and a page of
alignment. Buffers start page-aligned, largest class first, so each is aligned to its own size
up to a page.

Claim and release: a bitmap and an owner word per buffer
========================================================

Per class: ``count`` **owner words** (0 free, else the holder's pid) and a **bitmap** of 63 bits
per word (bit 63 stays clear: the words are signed), bit set meaning "taken".

* The **owner word is the truth**: a claim is ``CAS(owner, 0 -> pid)``, which both takes the
  buffer and tags it, in one atomic step. A release is ``CAS(owner, pid -> 0)``.
* The **bitmap is a search summary**: a claimer reads it to find candidates 63 at a time and
  skips full words, so finding a free buffer costs a few loads, not a scan of owner words.
  After a successful owner CAS the claimer sets its bit (a CAS loop on the word, which keeps
  every other process's bits); a release clears the bit *first*, then the owner word.

  That order keeps one invariant at every step of every process: **bit set implies owner word
  set**. So the bitmap can say "maybe free" of a taken buffer (a claimer then fails its owner
  CAS and tries the next bit), but never "taken" of a free one: no buffer is ever lost to the
  bitmap.
* Each process starts its search at a word derived from its pid, then from where its last claim
  succeeded, so workers mostly claim from different bitmap words (and cache lines).

Why not a Treiber stack (a free list per class with an ABA-tagged head)? Claim and release would
be O(1) too, but a pop (the head CAS) and the owner tag (the owner CAS) are two steps on two
words: a worker killed between them leaves a buffer that is neither on the free list nor tagged
with any pid, lost until the instance restarts; closing that window needs a per-process intent
record, and reclaim then has to push buffers back onto a stack that live workers pop and push.
Here the one step that takes a buffer also tags it, and the summary can only err on the safe
side. The bitmap's cost: a bit is set and cleared with a CAS loop, which retries while other
processes change bits of the same word (63 buffers); the pid-spread start keeps that rare.

Reclaim and its races
=====================

`reclaim(pid)` is the supervisor's, through `weft.shm.owners.OwnerRegistry` (``SharedState``
registers the pool as ``"buffers"``), for a dead worker that is not yet reaped: for every owner
word equal to ``pid`` it clears the bit, then ``CAS(owner, pid -> 0)``. Against live workers
claiming and releasing at the same time:

* The set of words holding ``pid`` cannot change under the scan: live processes CAS owner words
  only from 0 to their own pid and from their own pid to 0; ``pid`` is dead and, being
  unreaped, cannot belong to a new process yet (``waitid(WNOWAIT)``, then reap). Reclaim is the
  only writer of those words.
* Bits are cleared with a CAS loop on the whole word, so a live claim setting, or a live
  release clearing, another bit of the same word at the same moment is never undone.
* Bit before owner word, as in a release: the invariant above holds throughout. Once the owner
  CAS is done a live claimer may take the buffer at once and set the bit itself; reclaim never
  touches that buffer's words again.
* Wherever the worker died, reclaim finds a consistent state: in a claim before its owner CAS,
  it held nothing; after it, with the bit not yet set, the owner word names it (reclaim frees
  it; its clear bit only made others try it in vain meanwhile); in a release after the bit was
  cleared, the owner word still names it; after the owner CAS, it held nothing.
* Reclaim is idempotent, and nothing is ever released twice: a second reclaim, or a late
  release by a pid that is no longer the owner, finds another value and changes nothing.

A buffer's bytes are not cleared on release or reclaim: a claimer must not read what it did
not write.

In one process
==============

A `Buffer`'s ``view`` is a memoryview of its bytes in the mapping (the class's full size).
`Buffer.release` releases that view, so a use after release raises ValueError instead of
writing into a buffer someone else may hold by then (slices taken from the view stay valid:
drop them first). Releasing twice is a no-op. Trio tasks of one worker share its pid, so the
`Buffer` object is what says which task holds a buffer; a pool object is used from one thread.

`BufferPool.claim_wait` is the data path's backpressure: a reader that finds its class empty
waits, up to a timeout, for another task or worker to release one. Across processes there is no
wake-up (a futex would block the event loop), so it polls: 1 ms, doubling to at most 20 ms
(`WAIT_FIRST`, `WAIT_MAX`), so that a buffer released soon is found soon and a pool exhausted
for long costs a waiting task 50 polls a second. Waiters are not served in order.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from types import TracebackType

from weft.shm.atomics import WORD, Atomics
from weft.shm.segment import Segment, SegmentError
from weft.shm.slots import CACHE_LINE, round_up

__all__ = [
    "CLASS_SHARES",
    "CLASS_SIZES",
    "MAX_MEMORY",
    "MIN_MEMORY",
    "SEGMENT",
    "Buffer",
    "BufferPool",
    "size_class",
    "split_memory",
]

SEGMENT = "buffers"  # /weft-<instance>-buffers

CLASS_SIZES = (256, 1024, 4096, 16384, 65536)
# Each class's share of the memory left after one buffer of each, in sixteenths (see the table
# in the module docstring for why).
CLASS_SHARES = (1, 1, 2, 4, 8)
_SHARES_TOTAL = 16
assert sum(CLASS_SHARES) == _SHARES_TOTAL and len(CLASS_SHARES) == len(CLASS_SIZES)

MIN_MEMORY = sum(CLASS_SIZES)  # one buffer per class: 87296 bytes
# Reclaim reads every owner word: at 16 GiB, 6.2 million buffers, the supervisor spends 0.4 s
# per dead worker with the C atomics (measured; 1.5 ms at the default 64 MiB), and about 20
# times that with the ctypes fallback. Beyond that a worker's death would stall it for longer.
MAX_MEMORY = 16 << 30

BITS = 63  # buffers per bitmap word: bit 63 stays clear in a signed word
_FULL = (1 << BITS) - 1
PAGE = 4096

# claim_wait's polling (see the module docstring).
WAIT_FIRST = 0.001
WAIT_MAX = 0.020

# Pool header words (one cache line at the pool's offset).
_MAGIC = int.from_bytes(b"WEFTBUF\0", "little", signed=True)
_H_MAGIC, _H_MEMORY, _H_CLASSES, _H_COUNTS = 0, 1, 2, 3
_HEADER = round_up(WORD * (_H_COUNTS + len(CLASS_SIZES)))


def size_class(size: int) -> int:
    """The index in `CLASS_SIZES` of the smallest class holding `size` bytes.

    Raises ValueError for a negative size or one above the largest class (64 KiB): the data
    path moves larger things through several buffers.
    """
    if size < 0:
        raise ValueError(f"a buffer of {size} bytes")
    for c, cap in enumerate(CLASS_SIZES):
        if size <= cap:
            return c
    raise ValueError(f"no buffer class holds {size} bytes (the largest is {CLASS_SIZES[-1]})")


def split_memory(memory: int) -> tuple[int, ...]:
    """How many buffers of each class (in `CLASS_SIZES` order) `memory` bytes make.

    One of each, then each class's `CLASS_SHARES` of the rest, rounded down; the buffers never
    take more than `memory` bytes. Raises ValueError below `MIN_MEMORY` (not one of each).
    """
    if memory < MIN_MEMORY:
        raise ValueError(
            f"{memory} bytes do not hold one buffer of each size class "
            f"({' + '.join(_human(s) for s in CLASS_SIZES)} = {MIN_MEMORY} bytes)"
        )
    rest = memory - MIN_MEMORY
    return tuple(
        1 + rest * share // (_SHARES_TOTAL * size)
        for size, share in zip(CLASS_SIZES, CLASS_SHARES, strict=True)
    )


def _human(n: int) -> str:
    return f"{n >> 10}KiB" if n >= 1024 and n % 1024 == 0 else f"{n}B"


class _Class:
    """Where one class's words and bytes are (absolute byte offsets in the mapping)."""

    __slots__ = ("bitmap", "count", "data", "last_mask", "owners", "size", "words")

    def __init__(self, size: int, count: int, bitmap: int, owners: int, data: int) -> None:
        self.size = size
        self.count = count
        self.words = -(-count // BITS)
        self.bitmap = bitmap
        self.owners = owners
        self.data = data
        tail = count - BITS * (self.words - 1)
        self.last_mask = (1 << tail) - 1  # the valid bits of the last bitmap word

    @staticmethod
    def meta_bytes(count: int) -> int:
        return round_up(WORD * -(-count // BITS)) + round_up(WORD * count)


class Buffer:
    """One claimed buffer. ``view`` is its bytes in the shared mapping (``size`` of them, the
    class's size; only what the holder wrote is meaningful).

    `release` (or leaving a ``with`` block) gives it back once; afterwards ``view`` raises
    ValueError on use.
    """

    __slots__ = ("_held", "_pool", "cls", "index", "view")

    def __init__(self, pool: BufferPool, cls: int, index: int, view: memoryview) -> None:
        self._pool = pool
        self._held = True
        self.cls = cls  # index in CLASS_SIZES
        self.index = index  # within the class
        self.view = view

    @property
    def size(self) -> int:
        return CLASS_SIZES[self.cls]

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> bool:
        """Give the buffer back; see `BufferPool.release`."""
        return self._pool.release(self)

    def __enter__(self) -> Buffer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self._held else "released"
        return f"<Buffer {_human(self.size)} #{self.index} {state}>"


class BufferPool:
    """The pool's words and buffers at ``offset`` of `atomics`'s mapping (see the module
    docstring). ``counts`` gives the buffers per class (`split_memory`).

    Constructing one writes nothing: `format` writes the pool header into fresh memory, `open`
    reads it back. `create` and `attach` do the same on the ``buffers`` segment, which the pool
    then owns (`close`).
    """

    def __init__(
        self, atomics: Atomics, offset: int, counts: tuple[int, ...], memory: int = 0
    ) -> None:
        if offset % CACHE_LINE:
            raise ValueError(f"buffer pool offset {offset} is not cache-line aligned")
        if len(counts) != len(CLASS_SIZES) or min(counts) < 1:
            raise ValueError(f"buffer pool: {counts} buffers per class")
        if offset + BufferPool.size_for(counts) > atomics.size:
            raise ValueError(
                f"buffer pool of {counts} at offset {offset} does not fit {atomics.size} bytes"
            )
        self._a = atomics
        self.offset = offset
        self.counts = tuple(counts)
        self.memory = memory or sum(n * s for n, s in zip(counts, CLASS_SIZES, strict=True))
        self.segment: Segment | None = None
        meta = offset + _HEADER
        data = round_up(offset + BufferPool._meta_bytes(counts), PAGE)
        classes: list[_Class | None] = [None] * len(CLASS_SIZES)
        for c in sorted(range(len(CLASS_SIZES)), key=lambda c: -CLASS_SIZES[c]):
            size, count = CLASS_SIZES[c], counts[c]
            bitmap = meta
            owners = bitmap + round_up(WORD * -(-count // BITS))
            meta = bitmap + _Class.meta_bytes(count)
            classes[c] = _Class(size, count, bitmap, owners, data)
            data += size * count
        self._classes: tuple[_Class, ...] = tuple(k for k in classes if k is not None)
        self._mv: memoryview | None = memoryview(atomics.buf)
        # Per-process search starts (one bitmap word per class); set for the pid that uses
        # them, so a forked child does not start where its parent left off.
        self._pid = 0
        self._hints: list[int] = []
        self._held_here = 0  # Buffers claimed and not released through this object

    @staticmethod
    def _meta_bytes(counts: tuple[int, ...]) -> int:
        return _HEADER + sum(_Class.meta_bytes(n) for n in counts)

    @staticmethod
    def size_for(counts: tuple[int, ...]) -> int:
        """Bytes from the pool's offset to the end of its last buffer, at most."""
        data = sum(n * s for n, s in zip(counts, CLASS_SIZES, strict=True))
        return BufferPool._meta_bytes(counts) + PAGE + data  # a page: aligning the buffers

    # -- the pool header ---------------------------------------------------------------------

    def format(self) -> BufferPool:
        """Write the pool header (the words must be zero, as a new segment's are)."""
        store = self._a.store
        store(self.offset + WORD * _H_MEMORY, self.memory)
        store(self.offset + WORD * _H_CLASSES, len(CLASS_SIZES))
        for c, n in enumerate(self.counts):
            store(self.offset + WORD * (_H_COUNTS + c), n)
        store(self.offset + WORD * _H_MAGIC, _MAGIC)
        return self

    @classmethod
    def open(cls, atomics: Atomics, offset: int) -> BufferPool:
        """The pool whose header `format` wrote at `offset`. ValueError if there is none or it
        has another layout."""
        load = atomics.load
        if load(offset + WORD * _H_MAGIC) != _MAGIC:
            raise ValueError(f"no buffer pool at offset {offset}")
        memory = load(offset + WORD * _H_MEMORY)
        classes = load(offset + WORD * _H_CLASSES)
        if classes != len(CLASS_SIZES):
            raise ValueError(f"buffer pool of {classes} classes, this weft has {len(CLASS_SIZES)}")
        counts = tuple(load(offset + WORD * (_H_COUNTS + c)) for c in range(classes))
        return cls(atomics, offset, counts, memory)

    # -- the segment -------------------------------------------------------------------------

    @classmethod
    def create(cls, instance: str, memory: int, generation: int = 0) -> BufferPool:
        """Create ``/weft-<instance>-buffers`` for `memory` bytes of buffers (reserved now by
        `Segment.create`'s posix_fallocate) and the pool in it.

        Raises ValueError when `memory` is below `MIN_MEMORY`, SegmentError (from
        `Segment.create`) when the segment cannot be made, sized or is there already.
        """
        counts = split_memory(memory)
        seg = Segment.create(instance, SEGMENT, Segment.size_for(cls.size_for(counts)), generation)
        try:
            pool = cls(seg.atomics, seg.data_offset, counts, memory).format()
        except BaseException:
            seg.close()
            seg.unlink()
            raise
        pool.segment = seg
        return pool

    @classmethod
    def attach(cls, instance: str) -> BufferPool:
        """Map a running instance's pool (for `weft status`). SegmentError when it is not
        there or not a pool of this layout."""
        seg = Segment.attach(instance, SEGMENT)
        try:
            pool = cls.open(seg.atomics, seg.data_offset)
        except ValueError as e:
            seg.close()
            raise SegmentError(f"shared-memory segment {seg.name}: {e}") from None
        pool.segment = seg
        return pool

    def close(self) -> None:
        """Drop this process's view of the mapping, and unmap the segment if the pool owns one
        (idempotent). Raises BufferError, changing nothing, while a `Buffer` claimed through
        this object is still held (its view points into the mapping)."""
        if self._held_here:
            raise BufferError(f"{self._held_here} buffers of {self!r} are still held")
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        if self.segment is not None:
            self.segment.close()

    # -- claim and release -------------------------------------------------------------------

    def claim(self, size: int) -> Buffer | None:
        """A buffer of the smallest class holding `size` bytes, tagged with this process's
        pid; None when that class has none free. ValueError for a size no class holds."""
        c = size_class(size)
        mv = self._mv
        if mv is None:
            raise ValueError(f"{self!r} is closed")
        pid = os.getpid()
        if pid != self._pid:
            self._start_hints(pid)
        index = self._claim_in(c, pid)
        if index is None:
            return None
        k = self._classes[c]
        start = k.data + k.size * index
        self._held_here += 1
        return Buffer(self, c, index, mv[start : start + k.size])

    async def claim_wait(self, size: int, timeout: float) -> Buffer | None:
        """`claim`, waiting up to `timeout` seconds for a buffer of the class to be released
        (polled: see the module docstring). None when none was had in time.

        Holds nothing while it waits: a cancellation leaves nothing behind. ValueError (at
        once) for a size no class holds.
        """
        buf = self.claim(size)
        if buf is not None or timeout <= 0:
            return buf
        # Here, not at the top: `weft.config` reads MIN_MEMORY and MAX_MEMORY from this module,
        # and `weft check` has no use for trio (70 ms to import).
        import trio

        deadline = trio.current_time() + timeout
        delay = WAIT_FIRST
        while True:
            left = deadline - trio.current_time()
            if left <= 0:
                return None
            await trio.sleep(min(delay, left))
            buf = self.claim(size)
            if buf is not None:
                return buf
            delay = min(delay * 2, WAIT_MAX)

    def release(self, buf: Buffer) -> bool:
        """Give `buf` back to the pool and release its view.

        True when it was freed; False when it had been released already, or this process does
        not own it (its worker was declared dead and its buffers reclaimed, or it was claimed
        by another process): then no shared word changes. Raises BufferError, keeping the
        buffer, while something holds a buffer export of the view itself (slices and
        memoryviews of it do not: they stay valid, see the module docstring).
        """
        if not buf._held:
            return False
        buf.view.release()
        buf._held = False
        self._held_here -= 1
        return self._release_in(buf.cls, buf.index, os.getpid())

    def _start_hints(self, pid: int) -> None:
        # Spread processes over the bitmap (Fibonacci hashing of the pid) so that workers
        # mostly set and clear bits of different words.
        spread = (pid * 0x9E3779B97F4A7C15) >> 32
        self._hints = [spread % k.words for k in self._classes]
        self._pid = pid

    def _claim_in(self, c: int, pid: int) -> int | None:
        k = self._classes[c]
        load, cas = self._a.load, self._a.cas
        words, last = k.words, k.words - 1
        word = self._hints[c]
        for _ in range(words):
            off = k.bitmap + WORD * word
            bits = load(off)
            free = ~bits & (k.last_mask if word == last else _FULL)
            while free:
                bit = free & -free
                index = BITS * word + bit.bit_length() - 1
                if cas(k.owners + WORD * index, 0, pid):
                    # Ours. Set the bit, keeping whatever others did to the word meanwhile.
                    while not cas(off, bits, bits | bit):
                        bits = load(off)
                    self._hints[c] = word
                    return index
                free ^= bit  # taken, its bit not set yet (or a dead claimer's): the next one
            word = word + 1 if word < last else 0
        return None

    def _release_in(self, c: int, index: int, pid: int) -> bool:
        k = self._classes[c]
        load, cas = self._a.load, self._a.cas
        owner = k.owners + WORD * index
        if load(owner) != pid:
            return False
        self._clear_bit(k, index)  # bit first: "bit set implies owner set" holds throughout
        return cas(owner, pid, 0)

    def _clear_bit(self, k: _Class, index: int) -> None:
        load, cas = self._a.load, self._a.cas
        off = k.bitmap + WORD * (index // BITS)
        keep = ~(1 << (index % BITS))
        bits = load(off)
        while not cas(off, bits, bits & keep):
            bits = load(off)

    # -- the supervisor's side ---------------------------------------------------------------

    def reclaim(self, pid: int) -> int:
        """Free every buffer `pid` (dead, not yet reaped) holds; how many. For the supervisor
        (`weft.shm.owners`); see the module docstring for why it is safe beside live claims."""
        if pid <= 0:
            raise ValueError(f"owner pid must be positive, not {pid}")
        cas = self._a.cas
        freed = 0
        for k in self._classes:
            for index in self._indexes_of(k, pid):
                self._clear_bit(k, index)
                if cas(k.owners + WORD * index, pid, 0):
                    freed += 1
        return freed

    def _indexes_of(self, k: _Class, pid: int) -> Iterator[int]:
        words = map(self._a.load, range(k.owners, k.owners + WORD * k.count, WORD))
        return (i for i, owner in enumerate(words) if owner == pid)

    def owned_by(self, pid: int) -> dict[int, list[int]]:
        """The indexes `pid` holds now, per class size (classes it holds none of left out)."""
        out = {}
        for k in self._classes:
            held = list(self._indexes_of(k, pid))
            if held:
                out[k.size] = held
        return out

    def stats(self) -> dict[int, tuple[int, int]]:
        """``{class size: (in use, total)}``, for ``weft_buffers_in_use{class}`` and
        ``weft_buffers{class}``.

        In use is the bitmap's count: one load per 63 buffers. It is a moment's count that
        leaves out buffers between the two steps of a claim or a release in progress, and those
        of a worker that died between them until the supervisor's reclaim.
        """
        load = self._a.load
        out = {}
        for k in self._classes:
            offs = range(k.bitmap, k.bitmap + WORD * k.words, WORD)
            out[k.size] = (sum(load(off).bit_count() for off in offs), k.count)
        return out

    def __repr__(self) -> str:
        return (
            f"<BufferPool {self.memory} bytes {dict(zip(CLASS_SIZES, self.counts, strict=True))}>"
        )


def private_pool(memory: int) -> BufferPool:
    """A pool of `memory` bytes of buffers for this process alone, in an anonymous mapping (a
    worker without a supervisor: tests, an in-process worker); it lives as long as the pool.
    Untouched pages of the mapping cost no memory."""
    counts = split_memory(memory)
    mapping = mmap.mmap(-1, BufferPool.size_for(counts))
    return BufferPool(Atomics(mapping), 0, counts, memory).format()
