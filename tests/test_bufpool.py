"""The shared buffer pool (weft.bufpool): the size-class choice and the split of ``memory``
(pure), the pool on an anonymous shared mapping on both atomics backends (claim, release,
stats, the crash windows reclaim must cover), forked processes claiming at once and a dead
one's buffers reclaimed while another claims, claim_wait's polling on trio's clock, and the
``buffers`` segment.

Children are reaped by the ``children`` fixture (killed first if a test failed early); every
wait is bounded.
"""

from __future__ import annotations

import itertools
import mmap
import os
import random
import signal
import time
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from support.children import Children

from weft import bufpool
from weft.bufpool import (
    CLASS_SHARES,
    CLASS_SIZES,
    MAX_MEMORY,
    MIN_MEMORY,
    WAIT_FIRST,
    WAIT_MAX,
    Buffer,
    BufferPool,
    size_class,
    split_memory,
)
from weft.shm import atomics as atomics_mod
from weft.shm.atomics import WORD, Atomics
from weft.shm.segment import SegmentError, segment_names

WAIT_S = 60.0  # bound on any child's run; generous for a loaded 2-core machine
DEAD = 4_000_001  # above pid_max's 2**22: never a live process
OTHER = 4_000_002
KiB = 1024
SCRATCH = 0  # a cache line of words for the tests' own signalling
POOL_AT = 64  # the pool's offset in the mapping (after SCRATCH)


# == the pure parts ==========================================================================


@pytest.mark.parametrize(
    ("size", "cls"),
    [(0, 0), (1, 0), (256, 0), (257, 1), (1024, 1), (1025, 2), (4096, 2), (4097, 3),
     (16384, 3), (16385, 4), (65536, 4)],
)  # fmt: skip
def test_size_class_is_the_smallest_class_holding_the_size(size: int, cls: int) -> None:
    assert size_class(size) == cls
    assert CLASS_SIZES[cls] >= size and (cls == 0 or CLASS_SIZES[cls - 1] < size)


def test_size_class_refuses_what_no_class_holds() -> None:
    with pytest.raises(ValueError, match="largest is 65536"):
        size_class(64 * KiB + 1)
    with pytest.raises(ValueError):
        size_class(-1)


def test_split_of_the_least_memory_is_one_buffer_per_class() -> None:
    assert MIN_MEMORY == 256 + 1 * KiB + 4 * KiB + 16 * KiB + 64 * KiB
    assert split_memory(MIN_MEMORY) == (1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="one buffer of each size class"):
        split_memory(MIN_MEMORY - 1)


def test_split_of_the_default_gives_half_the_bytes_to_64k_relay_buffers() -> None:
    counts = split_memory(64 << 20)
    assert counts == (16363, 4091, 2046, 1023, 512)
    by_class = [n * s for n, s in zip(counts, CLASS_SIZES, strict=True)]
    total = sum(by_class)
    assert total <= 64 << 20
    for share, used in zip(CLASS_SHARES, by_class, strict=True):
        assert abs(used / total - share / 16) < 0.001
    # a few in every class at a small pool
    assert split_memory(1 << 20) == (235, 59, 30, 15, 8)


def test_split_never_exceeds_memory_and_grows_with_it() -> None:
    rng = random.Random(10)
    sizes = sorted(
        [MIN_MEMORY, MIN_MEMORY + 1, 1 << 20, 64 << 20, MAX_MEMORY]
        + [rng.randrange(MIN_MEMORY, 1 << 30) for _ in range(500)]
    )
    last = (0,) * len(CLASS_SIZES)
    for memory in sizes:
        counts = split_memory(memory)
        used = sum(n * s for n, s in zip(counts, CLASS_SIZES, strict=True))
        assert used <= memory, memory
        # whatever is left over could not have bought one more buffer of every class
        assert memory - used < MIN_MEMORY, memory
        assert all(n >= m for n, m in zip(counts, last, strict=True)), memory
        last = counts


# == the pool in an anonymous shared mapping =================================================

SMALL = split_memory(1 << 20)  # (235, 59, 30, 15, 8)


@pytest.fixture(params=atomics_mod.BACKENDS)
def atomics(request: pytest.FixtureRequest) -> Iterator[Atomics]:
    m = mmap.mmap(-1, POOL_AT + BufferPool.size_for(SMALL))  # MAP_SHARED: children share it
    a = Atomics(m, backend=request.param)
    yield a
    a.release()
    m.close()


@pytest.fixture
def pool(atomics: Atomics) -> Iterator[BufferPool]:
    p = BufferPool(atomics, POOL_AT, SMALL, 1 << 20).format()
    yield p
    p.close()


def claim_all(pool: BufferPool, size: int) -> list[Buffer]:
    held = []
    while (buf := pool.claim(size)) is not None:
        held.append(buf)
    return held


def words(pool: BufferPool, kind: str) -> list[int]:
    """Every bitmap or owner word of the pool, for checks that nothing is left set."""
    out = []
    for k in pool._classes:
        start, n = (k.bitmap, k.words) if kind == "bitmap" else (k.owners, k.count)
        out += [pool._a.load(start + WORD * i) for i in range(n)]
    return out


def test_claim_until_exhausted_then_none_and_each_buffer_is_its_own_bytes(
    pool: BufferPool,
) -> None:
    held = claim_all(pool, 1000)  # the 1 KiB class
    assert len(held) == SMALL[1]
    assert pool.claim(1000) is None
    assert {b.index for b in held} == set(range(SMALL[1]))
    assert all(b.size == 1024 and len(b.view) == 1024 and b.cls == 1 for b in held)
    # 1. every buffer's bytes are its own: fill each with its index, none was overwritten
    for b in held:
        b.view[:] = bytes([b.index % 251]) * 1024
    assert all(bytes(b.view) == bytes([b.index % 251]) * 1024 for b in held)
    # 2. the other classes are untouched by this one's exhaustion
    assert pool.stats() == {256: (0, 235), 1024: (59, 59), 4096: (0, 30), 16384: (0, 15),
                            65536: (0, 8)}  # fmt: skip
    one = pool.claim(1)
    assert one is not None and one.size == 256
    # 3. a release makes room for exactly one more
    assert held.pop().release() is True
    again = pool.claim(1024)
    assert again is not None and pool.claim(1024) is None
    for b in [*held, again, one]:
        assert b.release()
    assert all(n == 0 for n, _ in pool.stats().values())
    assert set(words(pool, "bitmap")) == {0} and set(words(pool, "owners")) == {0}


def test_buffers_tile_the_data_area_without_overlap_largest_class_first(
    pool: BufferPool, atomics: Atomics
) -> None:
    held = [b for size in CLASS_SIZES for b in claim_all(pool, size)]
    base = memoryview(atomics.buf)
    spans = []
    for b in held:
        # where the view points in the mapping (its bytes and the mapping's are the same)
        b.view[:1] = b"\x01"
        k = pool._classes[b.cls]
        start = k.data + k.size * b.index
        assert base[start] == 1
        base[start] = 0
        spans.append((start, start + b.size))
        assert start % min(b.size, bufpool.PAGE) == 0
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert spans[-1][1] <= POOL_AT + BufferPool.size_for(SMALL)
    base.release()
    for b in held:
        b.release()


def test_release_is_once_and_the_view_is_dead_afterwards(pool: BufferPool) -> None:
    buf = pool.claim(5000)
    assert buf is not None and buf.size == 16384
    view = buf.view
    assert buf.release() is True
    assert not buf.held
    assert buf.release() is False and pool.release(buf) is False
    with pytest.raises(ValueError):
        view[0] = 1  # a use after release fails instead of writing into someone's buffer
    with pool.claim(5000) as b:  # type: ignore[union-attr]
        assert b.held
    assert not b.held and pool.stats()[16384] == (0, 15)


def test_a_slice_of_the_view_outlives_the_release_as_documented(pool: BufferPool) -> None:
    # Slices hang on the mapping, not on the buffer's view: release cannot revoke them, so the
    # data path drops its slices before it releases.
    buf = pool.claim(1)
    assert buf is not None
    head = buf.view[:8]
    buf.release()
    head[:2] = b"ok"  # no error: this is the caller's to avoid
    head.release()


def test_claim_refuses_sizes_no_class_holds_and_a_closed_pool(atomics: Atomics) -> None:
    pool = BufferPool(atomics, POOL_AT, SMALL).format()
    with pytest.raises(ValueError, match="largest"):
        pool.claim(64 * KiB + 1)
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        pool.claim(1)
    assert all(n == 0 for n, _ in BufferPool.open(atomics, POOL_AT).stats().values())


def test_format_then_open_reads_the_same_pool(pool: BufferPool, atomics: Atomics) -> None:
    again = BufferPool.open(atomics, POOL_AT)
    assert (again.counts, again.memory) == (SMALL, 1 << 20)
    buf = pool.claim(300)
    assert again.stats()[1024] == (1, 59)  # one pool, two views of it
    assert buf is not None and buf.release()
    again.close()
    with pytest.raises(ValueError, match="no buffer pool"):
        BufferPool.open(atomics, 0)


# -- what a worker's death can leave, and reclaim ---------------------------------------------


def claim_as(pool: BufferPool, cls: int, pid: int) -> int | None:
    """A claim in class `cls` tagged with `pid`: what another process's claim leaves."""
    if pool._pid != os.getpid():
        pool._start_hints(os.getpid())
    return pool._claim_in(cls, pid)


def owner_word(pool: BufferPool, cls: int, index: int) -> int:
    return pool._classes[cls].owners + WORD * index


def test_a_death_between_owner_cas_and_bit_set_is_reclaimed(pool: BufferPool) -> None:
    # 1. a claimer took buffer 0 of the 64 KiB class (owner CAS) and died before its bit
    a = pool._a
    assert a.cas(owner_word(pool, 4, 0), 0, DEAD)
    # 2. the bitmap says "maybe free", but claims go past it: the owner word is the truth
    assert pool.stats()[65536] == (0, 8)
    held = claim_all(pool, 65536)
    assert sorted(b.index for b in held) == list(range(1, 8))
    assert pool.owned_by(DEAD) == {65536: [0]}
    # 3. reclaim frees it, and it is claimable again
    assert pool.reclaim(DEAD) == 1
    last = pool.claim(65536)
    assert last is not None and last.index == 0
    for b in [*held, last]:
        b.release()
    assert set(words(pool, "bitmap")) == {0} and set(words(pool, "owners")) == {0}


def test_a_death_between_bit_clear_and_owner_clear_is_reclaimed(pool: BufferPool) -> None:
    # a releaser cleared its bit and died before clearing its owner word
    a = pool._a
    assert a.cas(owner_word(pool, 2, 5), 0, DEAD)
    assert pool.owned_by(DEAD) == {4096: [5]}
    assert pool.reclaim(DEAD) == 1
    assert pool.owned_by(DEAD) == {} and pool.reclaim(DEAD) == 0  # idempotent
    held = claim_all(pool, 4096)
    assert len(held) == 30
    for b in held:
        b.release()


def test_reclaim_frees_one_pid_in_every_class_and_spares_the_others(pool: BufferPool) -> None:
    mine = [pool.claim(s) for s in CLASS_SIZES]
    dead = {c: [claim_as(pool, c, DEAD) for _ in range(3)] for c in range(len(CLASS_SIZES))}
    other = claim_as(pool, 0, OTHER)
    assert pool.stats()[256] == (5, 235)
    assert pool.reclaim(DEAD) == 15
    assert pool.owned_by(DEAD) == {}
    assert pool.owned_by(OTHER) == {256: [other]}
    assert pool.owned_by(os.getpid()) == {
        s: [b.index] for s, b in zip(CLASS_SIZES, mine, strict=True) if b
    }
    assert {s: n for s, (n, _) in pool.stats().items()} == {256: 2, 1024: 1, 4096: 1,
                                                            16384: 1, 65536: 1}  # fmt: skip
    assert all(dead.values())
    with pytest.raises(ValueError, match="positive"):
        pool.reclaim(0)
    for b in mine:
        assert b is not None and b.release()


def test_a_late_release_after_reclaim_changes_nothing(pool: BufferPool) -> None:
    # 1. this process holds a buffer; it is declared dead and its buffers reclaimed
    buf = pool.claim(100)
    assert buf is not None
    assert pool.reclaim(os.getpid()) == 1
    # 2. another process claims the same buffer
    assert claim_as(pool, 0, OTHER) == buf.index
    # 3. the late release returns False and leaves the new holder's words alone
    assert buf.release() is False
    assert pool.owned_by(OTHER) == {256: [buf.index]}
    assert pool.stats()[256] == (1, 235)


# -- processes ---------------------------------------------------------------------------------


def spin_until(predicate, timeout: float = WAIT_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.0005)


def test_two_processes_claiming_at_once_never_hold_one_buffer_together(
    pool: BufferPool, atomics: Atomics, children: Children
) -> None:
    # Each child claims buffers of random classes (the pool runs out often: 2 x 40 held at
    # most against 8 of 64 KiB), writes its pid into every one, keeps a few for a while, and
    # checks its pid is still there before it releases: a buffer held by both at once would
    # show the other's pid. Each counts its claims in a scratch word.
    rounds = 20000 if atomics.backend == "c" else 4000
    go = SCRATCH

    def claimer(slot: int) -> None:
        me = os.getpid()
        stamp = me.to_bytes(8, "little")
        rng = random.Random(me)
        held: list[Buffer] = []
        spin_until(lambda: atomics.load(go) == 1)
        claims = 0
        for _ in range(rounds):
            if len(held) < 40 and rng.random() < 0.6:
                buf = pool.claim(rng.choice(CLASS_SIZES) - rng.randrange(200))
                if buf is not None:
                    claims += 1
                    buf.view[:8] = stamp
                    buf.view[-8:] = stamp
                    held.append(buf)
            elif held:
                buf = held.pop(rng.randrange(len(held)))
                assert bytes(buf.view[:8]) == stamp and bytes(buf.view[-8:]) == stamp
                assert buf.release() is True
            if rng.random() < 0.05:
                os.sched_yield()
        for buf in held:
            assert bytes(buf.view[:8]) == stamp
            assert buf.release() is True
        atomics.store(SCRATCH + WORD * (1 + slot), claims)

    pids = [children.fork(lambda s=s: claimer(s)) for s in range(2)]
    atomics.store(go, 1)
    assert [children.wait(p) for p in pids] == [0, 0]
    claims = [atomics.load(SCRATCH + WORD * (1 + s)) for s in range(2)]
    assert min(claims) > rounds // 10, claims  # both really claimed, the pool ran dry often
    # the counts balance: everything claimed was released, no word is left set
    assert all(n == 0 for n, _ in pool.stats().values())
    assert set(words(pool, "bitmap")) == {0} and set(words(pool, "owners")) == {0}


def test_the_buffers_of_a_sigkilled_child_are_reclaimed_before_it_is_reaped(
    pool: BufferPool, atomics: Atomics, children: Children
) -> None:
    # The supervisor's sequence: the worker dies holding buffers; waitid(WNOWAIT) sees it
    # dead but keeps the zombie (its pid cannot be reused); reclaim(pid); then reap.
    mine = pool.claim(64 * KiB)
    assert mine is not None

    def worker() -> None:
        for size in (100, 100, 1000, 4000, 60000, 60000):
            assert pool.claim(size) is not None
        atomics.store(SCRATCH, 1)
        time.sleep(WAIT_S)

    pid = children.fork(worker)
    spin_until(lambda: atomics.load(SCRATCH) == 1)
    assert {s: len(i) for s, i in pool.owned_by(pid).items()} == {256: 2, 1024: 1, 4096: 1,
                                                                  65536: 2}  # fmt: skip
    os.kill(pid, signal.SIGKILL)
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert info is not None and info.si_pid == pid
    assert pool.reclaim(pid) == 6
    assert pool.owned_by(pid) == {}
    assert {s: n for s, (n, _) in pool.stats().items()} == {256: 0, 1024: 0, 4096: 0,
                                                            16384: 0, 65536: 1}  # fmt: skip
    assert children.wait(pid) == -signal.SIGKILL
    assert mine.release() is True


def test_reclaim_beside_a_live_claimer_loses_no_bit_of_either(
    pool: BufferPool, atomics: Atomics, children: Children
) -> None:
    # The 64 KiB class: 8 buffers, so one bitmap word that everybody sets and clears bits of.
    # A live child claims and releases as fast as it can while the parent, over and over, has
    # a "dead" pid take buffers (as a worker that dies holding them) and reclaims them: every
    # bit set or cleared by one must survive the other's CAS loops on the same word.
    stop, claims = SCRATCH, SCRATCH + WORD
    cycles = 2000 if atomics.backend == "c" else 500

    def claimer() -> None:
        held: list[Buffer] = []
        while atomics.load(stop) == 0:
            buf = pool.claim(60000)
            if buf is not None:
                held.append(buf)
                atomics.fetch_add(claims, 1)
            if len(held) > 2 or buf is None:
                for b in held:
                    assert b.release() is True
                held.clear()
        for b in held:
            assert b.release() is True

    pid = children.fork(claimer)
    spin_until(lambda: atomics.load(claims) > 0)
    k = pool._classes[4]
    before, dead_claims = atomics.load(claims), 0
    for _ in range(cycles):
        taken = [i for i in (claim_as(pool, 4, DEAD) for _ in range(3)) if i is not None]
        dead_claims += len(taken)
        # the dead pid's bits are all set (its claims completed) ...
        assert all(atomics.load(k.bitmap) >> i & 1 for i in taken)
        # ... and reclaim frees exactly those
        assert pool.reclaim(DEAD) == len(taken)
    during = atomics.load(claims) - before
    atomics.store(stop, 1)
    assert children.wait(pid) == 0
    assert during > 0 and dead_claims > cycles  # both really worked on the word meanwhile
    assert all(n == 0 for n, _ in pool.stats().values())
    assert set(words(pool, "bitmap")) == {0} and set(words(pool, "owners")) == {0}


# -- claim_wait --------------------------------------------------------------------------------


async def test_claim_wait_polls_with_a_bounded_backoff_and_gives_up_at_the_timeout(
    pool: BufferPool, autojump_clock: trio.testing.MockClock
) -> None:
    held = claim_all(pool, 65536)
    polls: list[float] = []
    claim = pool.claim

    def counting_claim(size: int) -> Buffer | None:
        polls.append(trio.current_time())
        return claim(size)

    pool.claim = counting_claim  # type: ignore[method-assign]
    start = trio.current_time()
    assert await pool.claim_wait(65536, 1.0) is None
    assert trio.current_time() - start == pytest.approx(1.0)
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert gaps[:5] == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.016])
    assert all(g <= WAIT_MAX + 1e-9 for g in gaps) and gaps[0] == pytest.approx(WAIT_FIRST)
    assert 50 <= len(polls) <= 56  # 5 doublings, then every 20 ms: about 55 polls a second
    del pool.claim
    for b in held:
        b.release()


async def test_claim_wait_returns_a_buffer_released_meanwhile(
    pool: BufferPool, autojump_clock: trio.testing.MockClock
) -> None:
    held = claim_all(pool, 65536)
    got: list[Buffer | None] = []

    async def waiter() -> None:
        got.append(await pool.claim_wait(60000, 5.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(0.1)
        released_at = trio.current_time()
        held.pop().release()
    assert got[0] is not None and got[0].size == 65536
    assert trio.current_time() - released_at <= WAIT_MAX
    small = await pool.claim_wait(1, 0)  # immediate when there is one
    assert small is not None and small.release()
    assert await pool.claim_wait(60000, 0) is None  # and no wait with no timeout
    with pytest.raises(ValueError):
        await pool.claim_wait(1 << 20, 1.0)
    for b in [*held, got[0]]:
        b.release()


# == the segment ==============================================================================



def test_the_buffers_segment_is_created_attached_and_shared_by_a_child(
    instance: str, children: Children
) -> None:
    pool = BufferPool.create(instance, 1 << 20)
    assert pool.segment is not None
    assert segment_names(instance) == [f"/weft-{instance}-buffers"]
    size = os.stat(f"/dev/shm/weft-{instance}-buffers").st_size
    buffers = sum(n * s for n, s in zip(split_memory(1 << 20), CLASS_SIZES, strict=True))
    assert buffers < size <= (1 << 20) + 2 * bufpool.PAGE  # the buffers plus bookkeeping
    # 1. a forked child claims in the inherited mapping; the parent sees it
    r, w = os.pipe()

    def child() -> None:
        buf = pool.claim(2000)
        assert buf is not None
        buf.view[:5] = b"child"
        os.write(w, buf.index.to_bytes(4, "little"))
        time.sleep(WAIT_S)

    pid = children.fork(child)
    os.close(w)
    index = int.from_bytes(os.read(r, 4), "little")
    os.close(r)
    assert pool.owned_by(pid) == {4096: [index]}
    # 2. an attach (as `weft status` would) reads the same pool, bytes included
    seen = BufferPool.attach(instance)
    assert (seen.counts, seen.memory) == (split_memory(1 << 20), 1 << 20)
    assert seen.stats()[4096] == (1, 30)
    k = seen._classes[2]
    assert bytes(seen.segment.buf[k.data + 4096 * index :][:5]) == b"child"  # type: ignore[union-attr]
    seen.close()
    # 3. the child dies; reclaim, reap
    os.kill(pid, signal.SIGKILL)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert pool.reclaim(pid) == 1
    assert children.wait(pid) == -signal.SIGKILL
    # 4. a held buffer keeps the mapping: close says so instead of unmapping under it
    buf = pool.claim(1)
    assert buf is not None
    with pytest.raises(BufferError, match="1 buffers"):
        pool.close()
    assert buf.release() is True  # nothing was closed
    pool.close()
    assert pool.segment.unlink()


def test_attach_refuses_a_segment_that_is_not_a_pool(instance: str) -> None:
    from weft.shm.segment import Segment

    seg = Segment.create(instance, "buffers", 4096)
    with pytest.raises(SegmentError, match="no buffer pool"):
        BufferPool.attach(instance)
    seg.close()
    with pytest.raises(ValueError, match="one buffer of each"):
        BufferPool.create(instance, MIN_MEMORY - 1)


def test_the_shared_state_carries_the_pool_and_its_reclaim(instance: str) -> None:
    from weft.workers.shared import SharedState

    state = SharedState.create(instance, 4, 4, 1)
    state.add_buffers(BufferPool.create(instance, MIN_MEMORY, 1))
    assert state.owners.names[-1] == "buffers"
    assert state.buffers is not None
    assert claim_as(state.buffers, 3, DEAD) == 0
    assert state.owners.reclaim(DEAD)["buffers"] == 1
    with pytest.raises(ValueError, match="already"):
        state.add_buffers(state.buffers)
    state.close()
    assert state.buffers is None
