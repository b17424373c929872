"""The structures over weft.shm.atomics, each on both backends: seqlock records, owner-tagged
slots, the keyed table, the worker table and the in-flight matrix.

They live in an anonymous MAP_SHARED mapping, which forked children share as workers share a
segment. Every child is reaped by the ``children`` fixture (killed first if the test failed
early), and every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest
from support.children import Children

from weft.shm import atomics as atomics_mod
from weft.shm import table as table_mod
from weft.shm.atomics import Atomics
from weft.shm.counters import InflightMatrix
from weft.shm.seqlock import SeqlockRecord, TornRead
from weft.shm.slots import SlotArray
from weft.shm.table import TOMBSTONE, KeyedTable, key_hash
from weft.shm.worktable import (
    BOOTING,
    DRAINING,
    READY,
    STATE_NAMES,
    WorkerInfo,
    WorkerTable,
    WorkerTableFull,
)

WAIT_S = 60.0  # bound on any child's run; generous for a loaded 2-core CI machine
SIZE = 1 << 20




@pytest.fixture(params=atomics_mod.BACKENDS)
def atomics(request: pytest.FixtureRequest) -> Iterator[Atomics]:
    m = mmap.mmap(-1, SIZE)  # anonymous and MAP_SHARED: forked children share it
    a = Atomics(m, backend=request.param)
    yield a
    a.release()
    m.close()


def spin_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")


class Barrier:
    """A start line in shared memory (two words at `offset`) for `n` children and the parent."""

    def __init__(self, a: Atomics, offset: int, n: int) -> None:
        self.a, self.ready, self.go, self.n = a, offset, offset + 8, n

    def child_wait(self) -> None:
        self.a.fetch_add(self.ready, 1)
        spin_until(lambda: self.a.load(self.go) == 1)

    def release(self) -> None:
        spin_until(lambda: self.a.load(self.ready) == self.n)
        self.a.store(self.go, 1)


def dead_pid(children: Children) -> int:
    """The pid of a process that has exited and been reaped."""
    pid = children.fork(lambda: None)
    assert children.wait(pid) == 0
    return pid


# Region offsets inside the mapping: structures start at 4096, scratch words below.
BARRIER = 0
SCRATCH = 64
DATA = 4096


# == seqlock =================================================================================


def test_seqlock_write_then_read_returns_the_written_words(atomics: Atomics) -> None:
    rec = SeqlockRecord(atomics, DATA, 3)
    assert rec.read() == (0, 0, 0)
    rec.write([1, -2, 3])
    assert rec.read() == (1, -2, 3)
    assert rec.sequence() == 2  # one complete write
    rec.update({1: 20})
    assert rec.read() == (1, 20, 3)
    assert SeqlockRecord.size_for(3) == 32


def test_seqlock_write_of_the_wrong_length_changes_nothing(atomics: Atomics) -> None:
    rec = SeqlockRecord(atomics, DATA, 2)
    rec.write([5, 6])
    with pytest.raises(ValueError, match="2 words"):
        rec.write([1, 2, 3])
    with pytest.raises(IndexError):
        rec.update({2: 1})
    assert rec.read() == (5, 6)
    assert rec.sequence() % 2 == 0


def test_seqlock_left_odd_by_a_dead_writer_raises_torn_read_until_rewritten(
    atomics: Atomics,
) -> None:
    rec = SeqlockRecord(atomics, DATA, 2)
    rec.write([7, 7])
    atomics.store(DATA, rec.sequence() + 1)  # a writer died between "odd" and "even"
    atomics.store(rec.word_offset(0), 8)
    started = time.monotonic()
    with pytest.raises(TornRead):
        rec.read(max_wait=0.01)
    assert time.monotonic() - started < 1.0
    rec.write([9, 9])  # a new writer continues from the next even sequence
    assert rec.read() == (9, 9)
    assert rec.sequence() % 2 == 0


def test_seqlock_reader_never_sees_a_torn_record_under_a_hammering_writer(
    atomics: Atomics, children: Children
) -> None:
    # The writer process keeps every word of each record equal to one counter; a reader that
    # ever returned a mix of two writes would see unequal words.
    nrec, nwords, duration = 3, 6, 1.0
    stride = SeqlockRecord.size_for(nwords)
    records = [SeqlockRecord(atomics, DATA + i * stride, nwords) for i in range(nrec)]
    stop = SCRATCH
    barrier = Barrier(atomics, BARRIER, 1)

    def writer() -> None:
        barrier.child_wait()
        i = 0
        while atomics.load(stop) == 0:
            i += 1
            for rec in records:
                rec.write([i] * nwords)

    pid = children.fork(writer)
    barrier.release()
    reads = torn = 0
    last = [0] * nrec
    changes = 0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        for r, rec in enumerate(records):
            try:
                values = rec.read()
            except TornRead:
                torn += 1
                continue
            reads += 1
            assert len(set(values)) == 1, f"torn read {values}"
            assert values[0] >= last[r], "a record went back in time"
            changes += values[0] != last[r]
            last[r] = values[0]
    atomics.store(stop, 1)
    assert children.wait(pid) == 0
    assert reads > 1000
    assert changes > 100, "the writer was not writing while we read"
    assert torn <= reads // 100  # TornRead only if the writer was descheduled mid-write


# == slots ===================================================================================


def test_slots_claim_each_free_slot_once_then_report_full(atomics: Atomics) -> None:
    slots = SlotArray(atomics, DATA, 4)
    assert [slots.claim(100), slots.claim(100), slots.claim(200), slots.claim(100)] == [0, 1, 2, 3]
    assert slots.claim(300) is None
    assert slots.in_use() == 4
    assert [slots.owner(i) for i in range(4)] == [100, 100, 200, 100]
    assert slots.owned_by(100) == [0, 1, 3]


def test_slots_release_only_by_the_owner(atomics: Atomics) -> None:
    slots = SlotArray(atomics, DATA, 2)
    i = slots.claim(100)
    assert i is not None
    assert slots.release(i, 200) is False
    assert slots.owner(i) == 100
    assert slots.release(i, 100) is True
    assert slots.owner(i) == 0
    assert slots.release(i, 100) is False  # a late second release frees nothing
    assert slots.in_use() == 0


def test_slots_claim_at_takes_a_named_slot_only_when_free(atomics: Atomics) -> None:
    slots = SlotArray(atomics, DATA, 3)
    assert slots.claim_at(2, 100) is True
    assert slots.claim_at(2, 200) is False
    assert slots.claim_at(2, 100) is False
    assert slots.owner(2) == 100
    assert slots.claim(200) == 0  # claim skips taken slots
    assert slots.claim(200) == 1
    assert slots.claim(200) is None


def test_slots_reclaim_frees_exactly_the_slots_of_one_pid(atomics: Atomics) -> None:
    slots = SlotArray(atomics, DATA, 6)
    for pid in (100, 200, 100, 300, 100):
        slots.claim(pid)
    assert slots.reclaim(100) == 3
    assert [slots.owner(i) for i in range(6)] == [0, 200, 0, 300, 0, 0]
    assert slots.reclaim(100) == 0


def test_slots_refuse_bad_pids_and_indexes(atomics: Atomics) -> None:
    slots = SlotArray(atomics, DATA, 2)
    for pid in (0, -5):
        with pytest.raises(ValueError):
            slots.claim(pid)
    with pytest.raises(IndexError):
        slots.owner(2)
    with pytest.raises(IndexError):
        slots.claim_at(-1, 100)
    with pytest.raises(ValueError, match="does not fit"):
        SlotArray(atomics, SIZE - 8, 2)
    assert SlotArray.size_for(1) == 64 and SlotArray.size_for(9) == 128


def test_slots_of_a_sigkilled_child_are_reclaimed_by_the_parent(
    atomics: Atomics, children: Children
) -> None:
    # The supervisor's sequence: the worker dies holding slots; waitid(WNOWAIT) sees it dead
    # but keeps the zombie (so its pid cannot be reused); reclaim(pid); then reap.
    slots = SlotArray(atomics, DATA, 16)
    me = os.getpid()
    mine = [slots.claim(me), slots.claim(me)]
    claimed = SCRATCH

    def worker() -> None:
        for _ in range(5):
            assert slots.claim(os.getpid()) is not None
        atomics.store(claimed, 1)
        time.sleep(WAIT_S)

    pid = children.fork(worker)
    spin_until(lambda: atomics.load(claimed) == 1)
    assert sorted(slots.owned_by(pid)) == slots.owned_by(pid) and len(slots.owned_by(pid)) == 5
    os.kill(pid, signal.SIGKILL)
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert info is not None and info.si_pid == pid
    assert slots.reclaim(pid) == 5
    assert slots.in_use() == 2
    assert [slots.owner(i) for i in mine if i is not None] == [me, me]
    assert children.wait(pid) == -signal.SIGKILL


def test_slots_claimed_concurrently_by_two_processes_are_never_shared(
    atomics: Atomics, children: Children
) -> None:
    count = 2000
    slots = SlotArray(atomics, DATA, count)
    barrier = Barrier(atomics, BARRIER, 2)

    def claimer() -> None:
        barrier.child_wait()
        me = os.getpid()
        while (i := slots.claim(me)) is not None:
            assert slots.owner(i) == me

    pids = [children.fork(claimer) for _ in range(2)]
    barrier.release()
    assert [children.wait(p) for p in pids] == [0, 0]
    owners = [slots.owner(i) for i in range(count)]
    assert set(owners) <= set(pids)
    assert owners.count(pids[0]) + owners.count(pids[1]) == count


# == keyed table =============================================================================


def keys(n: int, prefix: str = "k") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(n)]


def raw_key_words(table: KeyedTable) -> list[int]:
    return [table._a.load(table._base(i)) for i in range(table.capacity)]


def test_table_insert_find_and_delete(atomics: Atomics) -> None:
    table = KeyedTable(atomics, DATA, 64, 2)
    i = table.find_or_insert(b"10.0.0.1", 100)
    assert i is not None
    assert table.find(b"10.0.0.1") == i
    assert table.find_or_insert(b"10.0.0.1", 200) == i  # found, not inserted again
    assert table.last_used(i) == 200
    assert table.find(b"10.0.0.2") is None
    assert len(table) == 1
    assert table.delete(b"10.0.0.1") is True
    assert table.delete(b"10.0.0.1") is False
    assert table.find(b"10.0.0.1") is None
    assert len(table) == 0
    assert raw_key_words(table)[i] == TOMBSTONE


def test_table_values_are_caller_words_and_start_at_zero(atomics: Atomics) -> None:
    table = KeyedTable(atomics, DATA, 1, 3)  # one entry: every key lands in it
    i = table.find_or_insert(b"a", 1)
    assert i == 0
    for w in range(3):
        assert atomics.load(table.value_offset(i, w)) == 0
        atomics.store(table.value_offset(i, w), 40 + w)
    assert atomics.fetch_add(table.value_offset(i, 1), 1) == 41
    assert table.find_or_insert(b"b", 2) is None  # full
    assert table.delete(b"a")
    j = table.find_or_insert(b"b", 3)  # reuses the tombstone, values zeroed first
    assert j == 0
    assert [atomics.load(table.value_offset(j, w)) for w in range(3)] == [0, 0, 0]
    with pytest.raises(IndexError):
        table.value_offset(0, 3)
    with pytest.raises(IndexError):
        table.value_offset(1, 0)


def test_table_full_returns_none_and_a_delete_makes_room(atomics: Atomics) -> None:
    table = KeyedTable(atomics, DATA, 8, 1)
    ks = keys(8)
    indexes = [table.find_or_insert(k, 1) for k in ks]
    assert None not in indexes and len(set(indexes)) == 8  # collisions probe onwards
    assert all(table.find(k) == i for k, i in zip(ks, indexes, strict=True))
    assert table.find_or_insert(b"one too many", 1) is None
    assert table.find(b"one too many") is None
    assert table.delete(ks[3])
    assert table.find_or_insert(b"one too many", 1) == indexes[3]
    assert all(table.find(k) is not None for k in ks if k != ks[3])


def test_table_probes_past_tombstones_to_find_keys(atomics: Atomics) -> None:
    # Small table, many collisions: deleting the head of a probe chain must not hide the rest.
    table = KeyedTable(atomics, DATA, 16, 1)
    ks = keys(12)
    for k in ks:
        assert table.find_or_insert(k, 1) is not None
    for k in ks[::2]:
        assert table.delete(k)
    for k in ks[1::2]:
        assert table.find(k) is not None
    for k in ks[::2]:
        assert table.find(k) is None
    assert len(table) == 6
    assert raw_key_words(table).count(TOMBSTONE) == 6


def test_table_probe_is_bounded(atomics: Atomics, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every key hashes home to entry 0: after MAX_PROBE entries a new key is "full" even
    # though the table has room elsewhere.
    monkeypatch.setattr(table_mod, "MAX_PROBE", 4)
    table = KeyedTable(atomics, DATA, 64, 0)
    home0 = [k for k in keys(5000) if key_hash(k) % 64 == 0][:5]
    assert [table.find_or_insert(k, 1) for k in home0] == [0, 1, 2, 3, None]


def test_table_idle_eviction_removes_only_entries_unused_since(atomics: Atomics) -> None:
    table = KeyedTable(atomics, DATA, 32, 1)
    ks = keys(6)
    idx = {k: table.find_or_insert(k, 1_000) for k in ks}
    for k in ks[:2]:
        table.touch(idx[k], 5_000)  # type: ignore[arg-type]
    table.find_or_insert(ks[2], 6_000)  # a find touches too
    assert table.evict_idle(older_than=2_000) == 3
    assert [table.find(k) is not None for k in ks] == [True, True, True, False, False, False]
    assert table.evict_idle(older_than=2_000) == 0
    assert len(table) == 3


def test_key_hash_is_stable_and_never_empty_or_tombstone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert key_hash(b"x") == key_hash(b"x") and key_hash(b"x") != key_hash(b"y")
    assert 2 <= key_hash(b"x") < 2**63

    class Digest:
        def __init__(self, value: int) -> None:
            self.value = value

        def digest(self) -> bytes:
            return self.value.to_bytes(8, "little")

    for raw, stored in ((0, 2), (1, 3), (1 << 63, 2), ((1 << 63) | 1, 3), (5, 5)):
        monkeypatch.setattr(table_mod.hashlib, "blake2b", lambda *a, v=raw, **k: Digest(v))
        assert key_hash(b"any") == stored


def test_table_clears_the_reservation_of_a_dead_inserter(
    atomics: Atomics, children: Children
) -> None:
    table = KeyedTable(atomics, DATA, 8, 1)
    key = b"client"
    home = key_hash(key) % 8
    dead = dead_pid(children)
    # A process died right after reserving the key's home entry for this very key.
    atomics.store(table._base(home), -dead)
    atomics.store(table._base(home) + 16, key_hash(key))
    assert table.find(key) is None
    i = table.find_or_insert(key, 1)
    assert i == home
    assert len(table) == 1


def test_table_gives_up_on_a_live_stalled_reservation_within_the_bound(
    atomics: Atomics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(table_mod, "INSERT_MAX_WAIT", 0.02)
    table = KeyedTable(atomics, DATA, 8, 1)
    key = b"client"
    home = key_hash(key) % 8
    atomics.store(table._base(home), -os.getpid())  # alive, and never finishing
    atomics.store(table._base(home) + 16, key_hash(key))
    started = time.monotonic()
    assert table.find_or_insert(key, 1) is None
    assert time.monotonic() - started < 1.0
    assert table.find_or_insert(b"another key", 1) is not None  # other keys are unaffected


def test_table_reclaim_and_eviction_clear_reservations_of_dead_pids(
    atomics: Atomics, children: Children
) -> None:
    table = KeyedTable(atomics, DATA, 8, 1)
    dead = dead_pid(children)
    for i in (1, 4):
        atomics.store(table._base(i), -dead)
    atomics.store(table._base(6), -os.getpid())
    assert table.reclaim(dead) == 2
    assert raw_key_words(table)[1] == TOMBSTONE
    atomics.store(table._base(2), -dead)
    assert table.evict_idle(older_than=0) == 0  # reservations are not counted as evictions
    assert raw_key_words(table)[2] == TOMBSTONE
    assert raw_key_words(table)[6] == -os.getpid()  # a live reserver's is left alone
    atomics.store(table._base(3), -(2**63))  # damage: no such pid
    table.evict_idle(older_than=0)
    assert raw_key_words(table)[3] == TOMBSTONE


@pytest.mark.parametrize("with_tombstones", [False, True], ids=["empty", "tombstones"])
def test_table_two_processes_inserting_the_same_keys_end_with_one_entry_each(
    atomics: Atomics, children: Children, with_tombstones: bool
) -> None:
    # Both children insert each key at the same moment (a start line per key) and count on the
    # entry they got. One entry per key, holding both counts, proves they always agreed.
    capacity, nkeys, rounds = 1024, 300, 2
    table = KeyedTable(atomics, DATA, capacity, 1)
    assert DATA + KeyedTable.size_for(capacity, 1) <= SIZE // 2
    if with_tombstones:  # inserts then reuse tombstones: the "earlier reservation" case
        for k in keys(300, "old"):
            assert table.find_or_insert(k, 1) is not None
        for k in keys(300, "old"):
            assert table.delete(k)
    ks = keys(nkeys)
    start_lines = SIZE // 2  # a word per key

    def inserter() -> None:
        for r in range(rounds):
            for j, k in enumerate(ks):
                if r == 0:
                    atomics.fetch_add(start_lines + 8 * j, 1)
                    spin_until(lambda j=j: atomics.load(start_lines + 8 * j) == 2)
                i = table.find_or_insert(k, 2)
                assert i is not None
                atomics.fetch_add(table.value_offset(i, 0), 1)

    pids = [children.fork(inserter) for _ in range(2)]
    assert [children.wait(p) for p in pids] == [0, 0]
    words = raw_key_words(table)
    assert len(table) == nkeys
    for k in ks:
        assert words.count(key_hash(k)) == 1, f"{k!r} has {words.count(key_hash(k))} entries"
        i = table.find(k)
        assert i is not None
        assert atomics.load(table.value_offset(i, 0)) == 2 * rounds
    assert not [w for w in words if w < 0], "a reservation was left behind"


# == worker table ============================================================================


def test_worker_table_claim_then_updates_show_in_snapshot(atomics: Atomics) -> None:
    table = WorkerTable(atomics, DATA, 6)
    before = time.monotonic_ns()
    row = table.claim(4242, slot=1, generation=3)
    (info,) = table.snapshot()
    assert (info.row, info.pid, info.slot, info.generation) == (row.index, 4242, 1, 3)
    assert (info.state, info.state_name) == (BOOTING, "BOOTING")
    assert info.acked_generation == 3 and info.inflight == 0 and info.requests == 0
    assert info.heartbeat_ns >= before
    row.set_state(READY)
    row.heartbeat(123)
    row.inflight_add(3)
    row.inflight_add(-1)
    row.requests_add(5)
    row.ack_generation(4)
    assert table.snapshot() == [WorkerInfo(row.index, 4242, 1, 3, READY, 123, 2, 5, 4)]
    row.set_state(DRAINING)
    assert table.snapshot()[0].state_name == "DRAINING"
    assert STATE_NAMES == {1: "BOOTING", 2: "READY", 3: "DRAINING", 4: "NOT_READY"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.pid = 1  # type: ignore[misc]


def test_worker_table_rows_per_process_and_free_by_pid(atomics: Atomics) -> None:
    table = WorkerTable(atomics, DATA, 3)
    old = table.claim(100, slot=0, generation=1)
    new = table.claim(101, slot=0, generation=2)  # a reload: same slot, both alive
    table.claim(102, slot=1, generation=2)
    with pytest.raises(WorkerTableFull):
        table.claim(103, slot=1, generation=2)
    assert [(i.pid, i.slot, i.generation) for i in table.snapshot()] == [
        (100, 0, 1),
        (101, 0, 2),
        (102, 1, 2),
    ]
    assert table.rows_of(101) == [new.index]
    assert table.free(100) is True
    assert table.free(100) is False
    assert [i.pid for i in table.snapshot()] == [101, 102]
    again = table.claim(103, slot=1, generation=2)  # the freed row, fully rewritten
    assert again.index == old.index
    info = next(i for i in table.snapshot() if i.pid == 103)
    assert (info.generation, info.state, info.inflight) == (2, BOOTING, 0)
    assert WorkerTable.size_for(3) == 384


def test_worker_table_snapshot_skips_a_row_torn_by_a_dead_writer(atomics: Atomics) -> None:
    table = WorkerTable(atomics, DATA, 2)
    row = table.claim(100, slot=0, generation=1)
    table.claim(101, slot=1, generation=1)
    seq = row._record.offset
    atomics.store(seq, atomics.load(seq) + 1)  # died mid-write
    assert [i.pid for i in table.snapshot(max_wait=0.01)] == [101]
    assert table.rows_of(100) == [row.index]  # the supervisor still finds its row to clear
    assert table.free(100)
    table.claim(102, slot=0, generation=2)
    assert sorted(i.pid for i in table.snapshot()) == [101, 102]


def test_worker_table_row_written_by_a_child_is_read_whole(
    atomics: Atomics, children: Children
) -> None:
    table = WorkerTable(atomics, DATA, 4)
    done = SCRATCH

    def worker() -> None:
        row = table.claim(os.getpid(), slot=2, generation=7)
        row.set_state(READY)
        for _ in range(1000):
            row.inflight_add(1)
            row.requests_add(1)
            row.inflight_add(-1)
        row.heartbeat(99)
        atomics.store(done, 1)

    pid = children.fork(worker)
    while atomics.load(done) == 0:  # read while it writes: every row must be well-formed
        for info in table.snapshot():
            assert (info.pid, info.slot, info.generation) == (pid, 2, 7)
            assert info.state in (BOOTING, READY)
            assert info.inflight in (0, 1)
    assert children.wait(pid) == 0
    assert table.snapshot() == [WorkerInfo(0, pid, 2, 7, READY, 99, 0, 1000, 7)]


# == in-flight matrix ========================================================================


def test_inflight_matrix_sums_columns_over_rows(atomics: Atomics) -> None:
    m = InflightMatrix(atomics, DATA, rows=3, columns=5)
    m.add(0, 1, 2)
    m.add(1, 1, 3)
    m.add(2, 4, 1)
    m.add(1, 1, -1)
    assert m.total(1) == 4
    assert m.totals([1, 4, 0]) == [4, 1, 0]
    assert m.get(1, 1) == 2
    m.clear_row(1)
    assert m.totals([1, 4]) == [2, 1]
    with pytest.raises(IndexError):
        m.add(3, 0, 1)
    with pytest.raises(IndexError):
        m.total(5)
    # Rows are whole cache lines: 5 columns (40 bytes) take 64.
    assert InflightMatrix.size_for(3, 5) == 192 and InflightMatrix.size_for(2, 9) == 256


def test_inflight_matrix_rows_written_by_two_workers_add_up(
    atomics: Atomics, children: Children
) -> None:
    m = InflightMatrix(atomics, DATA, rows=2, columns=3)
    barrier = Barrier(atomics, BARRIER, 2)

    def worker(row: int) -> Callable[[], None]:
        def run() -> None:
            barrier.child_wait()
            for _ in range(20_000):
                m.add(row, 0, 1)
                m.add(row, 2, 1)
                m.add(row, 0, -1)

        return run

    pids = [children.fork(worker(r)) for r in range(2)]
    barrier.release()
    assert [children.wait(p) for p in pids] == [0, 0]
    assert m.totals([0, 1, 2]) == [0, 0, 40_000]


# -- balancing positions -------------------------------------------------------------------------


def test_position_words_hand_out_each_value_once_across_processes(
    atomics: Atomics, children: Children
) -> None:
    from weft.shm.counters import PositionTable

    table = PositionTable(atomics, 0, 4)
    out = 8192  # each child writes the values it got here, one word each
    per_child = 2000

    def worker(slot: int) -> Callable[[], None]:
        def run() -> None:
            position = table.position(2)
            for k in range(per_child):
                atomics.store(out + 8 * (slot * per_child + k), position.advance())

        return run

    # 1. two processes advance the same word concurrently
    pids = [children.fork(worker(slot)) for slot in range(2)]
    assert [children.wait(pid) for pid in pids] == [0, 0]
    # 2. every value 0..3999 was handed out exactly once; the neighbouring words are untouched
    got = sorted(atomics.load(out + 8 * i) for i in range(2 * per_child))
    assert got == list(range(2 * per_child))
    assert table.position(2).advance() == 2 * per_child
    assert [table.position(i).advance() for i in (0, 1, 3)] == [0, 0, 0]
    with pytest.raises(IndexError):
        table.position(4)
