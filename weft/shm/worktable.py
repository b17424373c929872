"""The worker table: one row per live worker process, written by that worker, read by anyone.

This module owns `WorkerTable` (the rows), `WorkerRow` (a worker's handle on its own row, the
only writer) and `WorkerInfo` (what readers get). The supervisor reads it for readiness, the
heartbeat watchdog and generation acknowledgements; ``weft status`` reads it to show workers.

Rows are per worker *process*, not per slot: during a reload the old and the new worker of one
slot run at once, so size the table at ``2 * max_workers + 2`` rows or more.

Row layout (16 words, two cache lines, so no two workers' rows share a line)::

    0  owner             the pid holding the row: CAS(0 -> pid) to claim, CAS(pid -> 0) to free
    1  sequence          ┐
    2  pid               │ a SeqlockRecord: identity and state, rewritten as a whole on claim;
    3  slot              │ state and acked generation are changed under the sequence
    4  generation        │
    5  state             │
    6  acked generation  │
    7  heartbeat (ns)    │ single words, updated by the worker with one atomic operation each,
    8  in flight         │ no sequence bump: each is one word, so it cannot tear, and the hot
    9  requests          ┘ path (two in-flight updates per request) stays one C call each

Readers read the whole record inside the sequence (`SeqlockRecord.read`), so they never see
one worker's identity with another's state after a row is freed and claimed again: the claim
rewrites every word under the sequence. A row whose record pid differs from its owner word is
being claimed and is left out of `WorkerTable.snapshot`.

Lifecycle: the worker claims a row at boot (`WorkerTable.claim`, state BOOTING), marks READY once
it accepts, DRAINING when it stops accepting, stamps a heartbeat (``time.monotonic_ns()``, the
same clock in every process) and acknowledges generations. The supervisor frees the row of a
dead worker (`WorkerTable.free`) before reaping it, so the pid cannot have been reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from weft.shm.atomics import WORD, Atomics
from weft.shm.seqlock import READ_MAX_WAIT, SeqlockRecord, TornRead
from weft.shm.slots import round_up

__all__ = [
    "BOOTING",
    "DRAINING",
    "NOT_READY",
    "READY",
    "STATE_NAMES",
    "WorkerInfo",
    "WorkerRow",
    "WorkerTable",
    "WorkerTableFull",
]

BOOTING = 1
READY = 2
DRAINING = 3
# Up and serving, but not taking new work it could fail: no usable X.509-SVID (`weft.spiffe`).
NOT_READY = 4
STATE_NAMES = {BOOTING: "BOOTING", READY: "READY", DRAINING: "DRAINING", NOT_READY: "NOT_READY"}

# Word indexes inside the seqlock record (after the owner and sequence words).
_PID, _SLOT, _GENERATION, _STATE, _ACKED, _HEARTBEAT, _INFLIGHT, _REQUESTS = range(8)
_RECORD_WORDS = 8
_ROW_BYTES = round_up(WORD + SeqlockRecord.size_for(_RECORD_WORDS))  # 80 -> 128


class WorkerTableFull(RuntimeError):
    """Every row is taken: the table is smaller than the workers alive at once."""


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker's row as read at one moment."""

    row: int
    pid: int
    slot: int
    generation: int
    state: int
    heartbeat_ns: int
    inflight: int
    requests: int
    acked_generation: int

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, str(self.state))


class WorkerRow:
    """A worker's own row. The worker process is its single writer: do not share it."""

    __slots__ = ("_a", "_heartbeat", "_inflight", "_record", "_requests", "index", "pid")

    def __init__(self, atomics: Atomics, index: int, pid: int, record: SeqlockRecord) -> None:
        self._a = atomics
        self.index = index
        self.pid = pid
        self._record = record
        self._heartbeat = record.word_offset(_HEARTBEAT)
        self._inflight = record.word_offset(_INFLIGHT)
        self._requests = record.word_offset(_REQUESTS)

    def set_state(self, state: int) -> None:
        """BOOTING, READY or DRAINING (under the row's sequence)."""
        self._record.update({_STATE: state})

    def ack_generation(self, generation: int) -> None:
        """Say this worker has taken `generation` (under the row's sequence)."""
        self._record.update({_ACKED: generation})

    def heartbeat(self, now_ns: int) -> None:
        """Stamp ``time.monotonic_ns()``; the supervisor's watchdog compares it with its own."""
        self._a.store(self._heartbeat, now_ns)

    def inflight_add(self, delta: int) -> None:
        self._a.fetch_add(self._inflight, delta)

    def requests_add(self, n: int) -> None:
        self._a.fetch_add(self._requests, n)

    def __repr__(self) -> str:
        return f"<WorkerRow {self.index} pid {self.pid}>"


class WorkerTable:
    """``rows`` worker rows at ``offset`` (see the module docstring)."""

    __slots__ = ("_a", "_records", "offset", "rows")

    def __init__(self, atomics: Atomics, offset: int, rows: int) -> None:
        if offset % WORD:
            raise ValueError(f"worker table offset {offset} is not 8-byte aligned")
        if rows < 1:
            raise ValueError(f"a worker table needs at least one row, not {rows}")
        if offset + WorkerTable.size_for(rows) > atomics.size:
            raise ValueError(
                f"worker table of {rows} rows at offset {offset} does not fit {atomics.size} bytes"
            )
        self._a = atomics
        self.offset = offset
        self.rows = rows
        self._records = [
            SeqlockRecord(atomics, self._owner(i) + WORD, _RECORD_WORDS) for i in range(rows)
        ]

    @staticmethod
    def size_for(rows: int) -> int:
        """Bytes for `rows` rows (two cache lines each)."""
        return _ROW_BYTES * rows

    def _owner(self, row: int) -> int:
        return self.offset + _ROW_BYTES * row

    # -- the worker --------------------------------------------------------------------------

    def claim(self, pid: int, slot: int, generation: int) -> WorkerRow:
        """Claim a free row for worker `pid` (state BOOTING, heartbeat now, counters zero,
        acked generation = `generation`). Raises WorkerTableFull when every row is taken."""
        if pid <= 0:
            raise ValueError(f"worker pid must be positive, not {pid}")
        load, cas = self._a.load, self._a.cas
        for row in range(self.rows):
            owner = self._owner(row)
            if load(owner) == 0 and cas(owner, 0, pid):
                record = self._records[row]
                values = [0] * _RECORD_WORDS
                values[_PID] = pid
                values[_SLOT] = slot
                values[_GENERATION] = generation
                values[_STATE] = BOOTING
                values[_ACKED] = generation
                values[_HEARTBEAT] = time.monotonic_ns()
                record.write(values)
                return WorkerRow(self._a, row, pid, record)
        raise WorkerTableFull(
            f"worker table full: all {self.rows} rows are taken (pid {pid}, slot {slot}); "
            "the table needs a row for every worker alive at once, old generation included"
        )

    # -- the supervisor and readers ----------------------------------------------------------

    def snapshot(self, max_wait: float = READ_MAX_WAIT) -> list[WorkerInfo]:
        """Every claimed, initialised row, each read consistently, in row order.

        A row whose writer is stuck mid-write (stopped, or died there) for `max_wait` seconds
        is left out, as is a row being claimed. Rows are read one by one: the list is not one
        instant of the whole table.
        """
        load = self._a.load
        out = []
        for row, record in enumerate(self._records):
            owner = load(self._owner(row))
            if owner == 0:
                continue
            try:
                v = record.read(max_wait)
            except TornRead:
                continue
            if v[_PID] != owner:
                continue  # claimed, record not yet written
            out.append(
                WorkerInfo(
                    row=row,
                    pid=v[_PID],
                    slot=v[_SLOT],
                    generation=v[_GENERATION],
                    state=v[_STATE],
                    heartbeat_ns=v[_HEARTBEAT],
                    inflight=v[_INFLIGHT],
                    requests=v[_REQUESTS],
                    acked_generation=v[_ACKED],
                )
            )
        return out

    def rows_of(self, pid: int) -> list[int]:
        """Rows whose owner word is `pid`, without reading records (works on a torn row too):
        the supervisor clears a dead worker's other per-row state (in-flight counters) by these
        before `free`."""
        load = self._a.load
        return [row for row in range(self.rows) if load(self._owner(row)) == pid]

    def reclaim(self, pid: int) -> int:
        """`free` as `weft.shm.owners.Reclaimable`: how many rows were freed."""
        rows = len(self.rows_of(pid))
        return rows if self.free(pid) else 0

    def free(self, pid: int) -> bool:
        """Release the row(s) of `pid`, a dead worker not yet reaped. False when it had none."""
        if pid <= 0:
            raise ValueError(f"worker pid must be positive, not {pid}")
        load, cas = self._a.load, self._a.cas
        freed = False
        for row in range(self.rows):
            owner = self._owner(row)
            if load(owner) == pid and cas(owner, pid, 0):
                freed = True
        return freed
