"""The config of the shared buffer pool: ``[buffers]``.

`weft.config` hands the table here; this module owns its keys and the reasons a user reads when
one is wrong. `weft.bufpool` decides what ``memory`` becomes (its split into size classes), and
its bounds come from there: the least that holds one buffer of every class, and the most whose
reclaim after a worker's death stays short.

The pool is made once, at start: a reload that changes ``memory`` keeps the running pool and
says that the new size applies at the next restart (`weft.reload`).
"""

from __future__ import annotations

from typing import Any

from weft import confread as cr
from weft.bufpool import CLASS_SIZES, MAX_MEMORY, MIN_MEMORY
from weft.schema import Buffers

__all__ = ["read_buffers"]

_KEYS = tuple(Buffers.__dataclass_fields__)


def _memory(v: Any) -> int:
    n = cr.size(v, lo=0, hi=1 << 62)
    if n > MAX_MEMORY:
        raise cr.Bad(
            f"{v!r} is above {MAX_MEMORY >> 30}GiB: the supervisor reads every buffer's owner "
            "word when a worker dies, and that must stay short"
        )
    if n < MIN_MEMORY:
        classes = ", ".join(f"{s >> 10}KiB" if s >= 1024 else f"{s}B" for s in CLASS_SIZES)
        raise cr.Bad(
            f"{v!r} cannot hold one buffer of each size class ({classes}): "
            f"at least {MIN_MEMORY} bytes"
        )
    return n


def read_buffers(r: cr.Reader, raw: Any, path: str = "buffers") -> Buffers:
    t = r.table(raw, path)
    if t is None:
        return Buffers()
    d = Buffers()
    b = Buffers(memory=r.take(t, "memory", path, _memory, d.memory))
    r.unknown(t, path, _KEYS)
    return b
