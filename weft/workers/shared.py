"""The shared-memory state of one weft instance, as the supervisor and its workers use it.

One segment, ``/weft-<instance>-state``, laid out as:

* the **worker table** (`weft.shm.worktable`): a row per worker process, written only by that
  worker (state BOOTING/READY/DRAINING, generation, heartbeat, in-flight, requests), read by the
  supervisor (readiness, watchdog) and by `weft status`;
* the **in-flight matrix** (`weft.shm.counters`): a row per worker-table row, a column per
  upstream endpoint, so least-connections balancing sees every worker's load. Columns are
  assigned by the supervisor per ``destination/endpoint`` name and survive reloads for endpoints
  that still exist; a dead worker's row is cleared before it is reaped;
* the **balancing positions** (`weft.shm.counters.PositionTable`): a word per in-flight column,
  where a round_robin or weighted destination keeps its place in its schedule (`weft.dst`), so
  every worker follows the same sequence. A destination uses the word of its first endpoint's
  column: unique to it (columns are per ``destination/endpoint``), stable across reloads that
  keep that endpoint, and needing no map of its own. A word reused for another destination
  later only hands it an arbitrary starting point;
* the **endpoint records** (`weft.shm.endpoints`): per in-flight column, the words of the
  endpoint's health, prober lease, outlier state and circuit breaker. A column handed to a new
  endpoint has its record zeroed first (`ColumnMap.fresh`), so no endpoint inherits another's
  ejection or open breaker;
* the **rate-limit keys** (`weft.shm.table.KeyedTable`, ``[limits.rate_table] capacity``
  entries of one word, a key's GCRA time, `weft.backpressure`): every worker decides on the
  same word, so a limit is exact across workers, and the buckets survive reloads;
* the **identity generation**: one word the identity process stores after it published a new
  SVID or bundle (`weft.identity`); a worker compares it with the generation it loaded at each
  handshake that needs its SVID (`weft.spiffe`): one atomic load, and a re-read only on change.

Beside it, in a segment of its own (``/weft-<instance>-buffers``, sized by ``[buffers] memory``),
the **buffer pool** (`weft.bufpool`): the supervisor creates it at start and hands it over with
`add_buffers`, so workers inherit it with this state and the supervisor's reclaim walks it.

The supervisor creates it (`SharedState.create`) while holding the instance lock; forked workers
inherit the mapping; `weft status` attaches read-only (`SharedState.attach`). The column map
lives in the supervisor alone: what the readers need of it (where the observed endpoints'
records are) is published in the state file (`observed_columns`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from weft.bufpool import BufferPool
from weft.schema import Config, Destination
from weft.shm.counters import InflightMatrix, PositionTable, SharedPosition
from weft.shm.endpoints import EndpointTable
from weft.shm.owners import OwnerRegistry
from weft.shm.segment import Segment
from weft.shm.table import KeyedTable
from weft.shm.worktable import WorkerRow, WorkerTable

SEGMENT = "state"
ALIGN = 64  # a cache line: rows of different writers never share one


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def endpoint_key(dest: str, authority: str) -> str:
    return f"{dest}/{authority}"


def route_key(name: str) -> str:
    """The column key of a route's own record ('@' is in no destination name)."""
    return f"@route/{name}"


def observed_columns(config: Config, columns: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Where the records of the observed destinations' endpoints are, for processes that have
    no column map: the supervisor writes this into its state file (``observed``), and the admin
    process and `weft status` read the records through it (`weft.observer.observed_states`).

    ``{destination: {"health": bool, "outlier": bool, "breaker": bool,
    "endpoints": {authority: column}}}``, the flags saying which sections the destination has.
    An endpoint without a column is left out: a state file written in the middle of a reload
    (a TTIN then) may pair the serving config with the next one's columns.
    """
    out: dict[str, dict[str, Any]] = {}
    for d in config.destinations.values():
        if not d.observed:
            continue
        eps = {
            e.authority: columns[key]
            for e in d.endpoints
            if (key := endpoint_key(d.name, e.authority)) in columns
        }
        out[d.name] = {
            "health": d.health is not None,
            "outlier": d.outlier is not None,
            "breaker": d.breaker is not None,
            "endpoints": eps,
        }
    return out


class SharedState:
    def __init__(self, segment: Segment, rows: int, columns: int, rate_keys: int = 16) -> None:
        self.segment = segment
        self.rows = rows
        self.columns = columns
        self.rate_keys = rate_keys
        atomics = segment.atomics
        off = _align(segment.data_offset)
        self.table = WorkerTable(atomics, off, rows)
        off = _align(off + WorkerTable.size_for(rows))
        self.inflight = InflightMatrix(atomics, off, rows, columns)
        off = _align(off + InflightMatrix.size_for(rows, columns))
        self.positions = PositionTable(atomics, off, columns)
        off = _align(off + PositionTable.size_for(columns))
        self.endpoints = EndpointTable(atomics, off, columns)
        off = _align(off + EndpointTable.size_for(columns))
        # Rate-limit keys (`weft.backpressure`): one value word, the key's TAT.
        self.rate_table = KeyedTable(atomics, off, rate_keys, 1)
        off = _align(off + KeyedTable.size_for(rate_keys, 1))
        # The identity generation (`weft.spiffe`): one word, on a cache line of its own.
        self._identity_word = off
        self._atomics = atomics
        # What the supervisor releases when a worker dies. The in-flight rows are found
        # through the worker table's, so they go first.
        self.owners = OwnerRegistry()
        self.owners.register("inflight", _InflightOfRows(self.table, self.inflight))
        self.owners.register("worker_table", self.table)
        self.owners.register("endpoints", self.endpoints)
        self.owners.register("rate_table", self.rate_table)
        self.buffers: BufferPool | None = None  # see add_buffers

    @staticmethod
    def size_for(rows: int, columns: int, rate_keys: int = 16) -> int:
        return (
            ALIGN * 2  # header slack
            + _align(WorkerTable.size_for(rows))
            + _align(InflightMatrix.size_for(rows, columns))
            + _align(PositionTable.size_for(columns))
            + _align(EndpointTable.size_for(columns))
            + _align(KeyedTable.size_for(rate_keys, 1))
            + ALIGN  # the identity generation
            + 4096  # the segment header
        )

    @classmethod
    def create(
        cls, instance: str, rows: int, columns: int, generation: int, rate_keys: int = 16
    ) -> SharedState:
        size = cls.size_for(rows, columns, rate_keys) + 24  # three words recording the shape
        seg = Segment.create(instance, SEGMENT, size, generation)
        shape = seg.size - 24
        seg.atomics.store(shape, rows)
        seg.atomics.store(shape + 8, columns)
        seg.atomics.store(shape + 16, rate_keys)
        return cls(seg, rows, columns, rate_keys)

    @classmethod
    def attach(cls, instance: str) -> SharedState:
        seg = Segment.attach(instance, SEGMENT)
        shape = seg.size - 24
        load = seg.atomics.load
        return cls(seg, load(shape), load(shape + 8), load(shape + 16))

    def identity_generation(self) -> int:
        """The generation of the identity the identity process published last (0: none yet)."""
        return self._atomics.load(self._identity_word)

    def publish_identity(self, generation: int) -> None:
        """Called by the identity process after it wrote `generation`'s files (`weft.identity`)."""
        self._atomics.store(self._identity_word, generation)

    def add_buffers(self, pool: BufferPool) -> None:
        """Make `pool` (`BufferPool.create`, its own segment) part of this state: processes
        forked from now on inherit it as ``buffers``, a dead worker's buffers are reclaimed
        with the rest of what it held, and `close` unmaps it."""
        if self.buffers is not None:
            raise ValueError("this shared state has a buffer pool already")
        self.owners.register("buffers", pool)
        self.buffers = pool

    def close(self) -> None:
        try:
            if self.buffers is not None:
                self.buffers.close()
                self.buffers = None
        finally:
            self.segment.close()


class _InflightOfRows:
    """The in-flight matrix as a `Reclaimable`: its rows are the worker table's, and a dead
    worker's are zeroed (rows_of, not snapshot: a row the worker died in the middle of
    writing must be cleared too)."""

    def __init__(self, table: WorkerTable, matrix: InflightMatrix) -> None:
        self.table = table
        self.matrix = matrix

    def reclaim(self, pid: int) -> int:
        rows = self.table.rows_of(pid)
        for row in rows:
            self.matrix.clear_row(row)
        return len(rows)


class ColumnMap:
    """Stable columns of the in-flight matrix for ``destination/endpoint`` names.

    Lives in the supervisor; a reload keeps the columns of endpoints that still exist and
    gives new ones free columns. A column is reused only after every worker that counted on
    it has exited (its row cleared), which `retire` is told by the supervisor.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.columns: dict[str, int] = {}
        self.retired: dict[str, int] = {}
        # Columns the last `assign` gave to endpoints that had none: their shared records
        # (`SharedState.endpoints`) must be zeroed before the new workers start.
        self.fresh: list[int] = []

    def assign(self, config: Config) -> dict[str, int]:
        """Columns for every endpoint of `config`. Raises ValueError when there are too many."""
        wanted = [
            endpoint_key(d.name, e.authority)
            for d in config.destinations.values()
            for e in d.endpoints
        ]
        # A route with retries keeps its budget in a record of its own (`weft.retry_middleware`).
        wanted += [route_key(r.name) for r in config.routes if r.retry is not None]
        used = set(self.columns.values()) | set(self.retired.values())
        self.fresh = []
        for key in wanted:
            if key in self.columns:
                continue
            if key in self.retired:
                self.columns[key] = self.retired.pop(key)
                continue
            free = next((c for c in range(self.capacity) if c not in used), None)
            if free is None:
                raise ValueError(
                    f"more than {self.capacity} endpoints in total: restart weft to grow the "
                    "shared in-flight table"
                )
            self.columns[key] = free
            self.fresh.append(free)
            used.add(free)
        for key in list(self.columns):
            if key not in wanted:
                self.retired[key] = self.columns.pop(key)
        return dict(self.columns)

    def release_retired(self) -> None:
        """The old generation is gone: retired columns may be given to new endpoints."""
        self.retired.clear()


class SharedInflight:
    """In-flight counts of one destination summed over every worker (for least_conn)."""

    __slots__ = ("_cols", "_local", "_matrix", "_row")

    def __init__(self, matrix: InflightMatrix, row: int, columns: Sequence[int]) -> None:
        self._matrix = matrix
        self._row = row
        self._cols = list(columns)
        self._local = [0] * len(self._cols)

    def add(self, index: int, delta: int) -> None:
        self._local[index] += delta
        self._matrix.add(self._row, self._cols[index], delta)

    def view(self) -> Sequence[int]:
        return self._matrix.totals(self._cols)


def inflight_for(
    state: SharedState, row: WorkerRow, columns: dict[str, int], dest: Destination
) -> SharedInflight:
    cols = [columns[endpoint_key(dest.name, e.authority)] for e in dest.endpoints]
    return SharedInflight(state.inflight, row.index, cols)


def wrr_position_for(
    state: SharedState, columns: dict[str, int], dest: Destination
) -> SharedPosition:
    """The shared schedule position of a round_robin or weighted destination (see the module
    docstring: its first endpoint's column)."""
    return state.positions.position(columns[endpoint_key(dest.name, dest.endpoints[0].authority)])
