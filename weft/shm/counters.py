"""Counters shared by workers: per-endpoint in-flight counts, and balancing positions.

`PositionTable` (at the end) is the other kind: one word per destination that every worker
advances with ``fetch_add``, so round robin and smooth WRR follow one schedule across workers
(`weft.dst`). It has many writers but no owner: a dead worker leaves nothing to release there.


This module owns `InflightMatrix`, what least-connections balancing reads to see every worker's
load on an endpoint, not only its own. One row per worker-table row (`weft.shm.worktable`), one
column per endpoint; the caller maps endpoints to columns and keeps that map stable across
reloads.

Theory of operation:

* Each row has one writer, the worker holding that worker-table row, so an update is a single
  ``fetch_add`` on its own word and never contends with another worker's: rows are padded to
  whole cache lines, so two workers' counters never share one.
* ``total(column)`` sums the column over all rows. The rows are read one after another, not at
  one instant; for a balancing heuristic that is as good as exact, and each word is exact.
* A worker that dies leaves its counts in its row. The supervisor clears the row
  (``clear_row``) before the worker-table row is freed, so the next worker to claim that row
  starts from zero. While the row is held nobody but its worker writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from weft.shm.atomics import WORD, Atomics
from weft.shm.slots import round_up

__all__ = ["InflightMatrix", "PositionTable", "SharedPosition"]


class InflightMatrix:
    """``rows`` x ``columns`` signed counters at ``offset`` (see the module docstring)."""

    __slots__ = ("_a", "_rows", "_stride", "columns", "offset", "rows")

    def __init__(self, atomics: Atomics, offset: int, rows: int, columns: int) -> None:
        if offset % WORD:
            raise ValueError(f"in-flight matrix offset {offset} is not 8-byte aligned")
        if rows < 1 or columns < 1:
            raise ValueError(f"in-flight matrix of {rows} rows x {columns} columns")
        if offset + InflightMatrix.size_for(rows, columns) > atomics.size:
            raise ValueError(
                f"in-flight matrix {rows}x{columns} at offset {offset} does not fit "
                f"{atomics.size} bytes"
            )
        self._a = atomics
        self.offset = offset
        self.rows = rows
        self.columns = columns
        self._stride = InflightMatrix._row_bytes(columns)
        self._rows = [offset + self._stride * r for r in range(rows)]

    @staticmethod
    def _row_bytes(columns: int) -> int:
        return round_up(WORD * columns)

    @staticmethod
    def size_for(rows: int, columns: int) -> int:
        """Bytes for the matrix (each row a whole number of cache lines)."""
        return InflightMatrix._row_bytes(columns) * rows

    def _col(self, column: int) -> int:
        if not 0 <= column < self.columns:
            raise IndexError(f"column {column} out of range (0..{self.columns - 1})")
        return WORD * column

    def add(self, row: int, column: int, delta: int) -> None:
        """Add `delta` to this worker's own count (`row` is its worker-table row)."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range (0..{self.rows - 1})")
        self._a.fetch_add(self._rows[row] + self._col(column), delta)

    def get(self, row: int, column: int) -> int:
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range (0..{self.rows - 1})")
        return self._a.load(self._rows[row] + self._col(column))

    def total(self, column: int) -> int:
        """In flight on `column` summed over every worker."""
        load, col = self._a.load, self._col(column)
        return sum([load(r + col) for r in self._rows])

    def totals(self, columns: Sequence[int]) -> list[int]:
        """`total` of each of `columns`, in order."""
        load, rows = self._a.load, self._rows
        out = []
        for column in columns:
            col = self._col(column)
            out.append(sum([load(r + col) for r in rows]))
        return out

    def clear_row(self, row: int) -> None:
        """Zero a dead worker's row (supervisor, before its worker-table row is freed)."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range (0..{self.rows - 1})")
        store, base = self._a.store, self._rows[row]
        for column in range(self.columns):
            store(base + WORD * column, 0)


class PositionTable:
    """``count`` position words at ``offset``, each on its own cache line (many writers: two
    destinations' words on one line would make their workers contend for it)."""

    __slots__ = ("_a", "count", "offset")

    def __init__(self, atomics: Atomics, offset: int, count: int) -> None:
        if offset % WORD:
            raise ValueError(f"position table offset {offset} is not 8-byte aligned")
        if count < 1:
            raise ValueError(f"a position table needs at least one word, not {count}")
        if offset + PositionTable.size_for(count) > atomics.size:
            raise ValueError(
                f"position table of {count} words at offset {offset} does not fit "
                f"{atomics.size} bytes"
            )
        self._a = atomics
        self.offset = offset
        self.count = count

    @staticmethod
    def size_for(count: int) -> int:
        return round_up(WORD) * count

    def position(self, index: int) -> SharedPosition:
        """The position word `index` as a `weft.dst.Position`."""
        if not 0 <= index < self.count:
            raise IndexError(f"position {index} out of range (0..{self.count - 1})")
        return SharedPosition(self._a, self.offset + round_up(WORD) * index)


class SharedPosition:
    """One position word: `advance` is a single atomic fetch-add, returning the old value."""

    __slots__ = ("_a", "_offset")

    def __init__(self, atomics: Atomics, offset: int) -> None:
        self._a = atomics
        self._offset = offset

    def advance(self) -> int:
        return self._a.fetch_add(self._offset, 1)
