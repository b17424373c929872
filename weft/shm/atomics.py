"""8-byte atomic operations on words of a shared mapping.

This module owns the only way weft code touches a shared word: `Atomics` over a writable buffer
(an `mmap.mmap` of a segment, or an anonymous shared mapping in tests) with ``load``, ``store``,
``fetch_add``, ``cas`` and ``fence`` on byte offsets. Everything above it (seqlocks, slots, keyed
tables, the worker table, counters) is built from these five operations and nothing else.

Rules:

* **Words are signed 64-bit.** ``load`` returns an int in [-2**63, 2**63); ``store``, ``cas`` and
  ``fetch_add`` accept the same range and raise OverflowError outside it. ``fetch_add`` wraps on
  overflow (two's complement) and takes negative deltas. Pids, counters, nanosecond timestamps
  (good until 2262) and 63-bit hashes all fit.
* **Offsets** are byte offsets into the buffer, 8-byte aligned (the absolute address must be: a
  page-aligned mmap makes that the offset alone). A misaligned offset raises ValueError, one that
  does not leave 8 bytes in the buffer raises IndexError, a non-int raises TypeError. No offset
  can make an operation touch memory outside the buffer.
* **Ordering** is sequentially consistent for every operation (GCC ``__ATOMIC_SEQ_CST``): all
  processes see one total order of all of them. ``fence`` is a seq-cst thread fence; with every
  access already seq-cst it is only needed around plain (non-`Atomics`) memory, but the seqlock
  writes it anyway to state its protocol.
* **Lifetime**: an `Atomics` holds a buffer export of its mapping from construction until
  `release()` (or garbage collection). While it does, ``mmap.close()`` raises BufferError instead
  of unmapping memory that is still pointed into; `weft.shm.segment.Segment.close` releases
  first. After `release()` every operation raises ValueError.
* A forked child inherits the mapping at the same address, so an `Atomics` made before
  ``fork()`` works unchanged in the child.

Backends (`BACKEND` names the one chosen at import):

* ``"c"``: the extension `weft.shm._atomics` (``_atomics.c``), GCC ``__atomic_*`` builtins,
  methods bound straight onto the `Atomics` instance so a call is one C call with no Python
  frame. Built by ``pip install``; see ``scripts/bench_atomics`` for its speed.
* ``"ctypes"``: ``libatomic.so.1`` (``__atomic_load_8`` and friends) through ctypes, with the
  offset checks in Python. About 20 times slower (under 1M ops/s against 7-25M), but needs no
  compiler. Chosen when the extension
  is missing, or when ``WEFT_ATOMICS=ctypes`` is set at import (``WEFT_ATOMICS=c`` makes a
  missing extension an ImportError instead of a silent fallback).

Tests run every structure on both: ``Atomics(buf, backend="ctypes")`` overrides the default.
"""

from __future__ import annotations

import ctypes
import mmap
import operator
import os
from collections.abc import Callable
from typing import Any

__all__ = ["BACKEND", "BACKENDS", "Atomics", "available_backends"]

WORD = 8  # bytes per shared word: every offset handed to Atomics is a multiple of this
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# <stdatomic.h> memory_order_seq_cst as GCC and libatomic number it (__ATOMIC_SEQ_CST).
_SEQ_CST = 5

try:
    from weft.shm import _atomics as _c_ext
except ImportError:  # not built (a source tree on PYTHONPATH, or a build without a compiler)
    _c_ext = None

BACKENDS = ("c", "ctypes")


# -- ctypes over libatomic ------------------------------------------------------------------


class _Libatomic:
    """The four libatomic entry points and the fence, with their C signatures."""

    def __init__(self) -> None:
        # PyDLL keeps the GIL across the call: each is a few nanoseconds, and dropping and
        # re-taking the GIL would cost more than the operation (see scripts/bench_atomics).
        lib = ctypes.PyDLL("libatomic.so.1")
        # lib["..."], not lib.__atomic_...: a dunder-prefixed name in a class body is mangled.
        i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self.load = lib["__atomic_load_8"]
        self.load.argtypes, self.load.restype = [ptr, c_int], i64
        self.store = lib["__atomic_store_8"]
        self.store.argtypes, self.store.restype = [ptr, i64, c_int], None
        self.fetch_add = lib["__atomic_fetch_add_8"]
        self.fetch_add.argtypes, self.fetch_add.restype = [ptr, i64, c_int], i64
        self.cas = lib["__atomic_compare_exchange_8"]
        self.cas.argtypes = [ptr, ctypes.POINTER(i64), i64, c_int, c_int]
        self.cas.restype = ctypes.c_bool
        self.fence = lib.atomic_thread_fence
        self.fence.argtypes, self.fence.restype = [c_int], None


_libatomic: _Libatomic | None = None


def _get_libatomic() -> _Libatomic:
    global _libatomic
    if _libatomic is None:
        _libatomic = _Libatomic()
    return _libatomic


def _value(v: int) -> int:
    v = operator.index(v)
    if not INT64_MIN <= v <= INT64_MAX:
        raise OverflowError(f"Atomics: {v} does not fit a signed 64-bit word")
    return v


class _CtypesAtomics:
    """The fallback: same methods and errors as the C type, checks done here."""

    __slots__ = ("_anchor", "_base", "_len", "_lib")

    def __init__(self, buf: Any) -> None:
        self._lib = _get_libatomic()
        # from_buffer takes a writable export of buf (TypeError if read-only) and keeps it
        # until the array is dropped: that is what keeps the mapping from being closed.
        with memoryview(buf) as view:
            if view.readonly:
                raise BufferError("Object is not writable.")  # as the C type says it
            nbytes = view.nbytes
        self._anchor: Any = (ctypes.c_char * nbytes).from_buffer(buf)
        self._base = ctypes.addressof(self._anchor)
        self._len = len(self._anchor)

    @property
    def size(self) -> int:
        return self._len

    def _addr(self, off: int) -> int:
        off = operator.index(off)
        if 0 <= off <= self._len - WORD and not (self._base + off) & 7:
            return self._base + off
        if self._anchor is None:
            raise ValueError("Atomics: the buffer has been released")
        if not 0 <= off <= self._len - WORD:
            raise IndexError(
                f"Atomics: offset {off} out of range for a buffer of {self._len} bytes"
            )
        raise ValueError(f"Atomics: offset {off} is not 8-byte aligned")

    def load(self, off: int) -> int:
        return self._lib.load(self._addr(off), _SEQ_CST)

    def store(self, off: int, value: int) -> None:
        self._lib.store(self._addr(off), _value(value), _SEQ_CST)

    def fetch_add(self, off: int, delta: int) -> int:
        return self._lib.fetch_add(self._addr(off), _value(delta), _SEQ_CST)

    def cas(self, off: int, expected: int, new: int) -> bool:
        addr = self._addr(off)
        # A fresh cell per call: libatomic writes the current value into it on failure, and a
        # shared cell would race between threads using one Atomics.
        cell = ctypes.c_int64(_value(expected))
        return self._lib.cas(addr, ctypes.byref(cell), _value(new), _SEQ_CST, _SEQ_CST)

    def fence(self) -> None:
        self._lib.fence(_SEQ_CST)

    def release(self) -> None:
        self._anchor = None  # drops the export
        self._base = 0
        self._len = 0


# -- selection ------------------------------------------------------------------------------


def available_backends() -> list[str]:
    """The backends that work here, fastest first."""
    found = []
    if _c_ext is not None:
        found.append("c")
    try:
        _get_libatomic()
    except (OSError, AttributeError):
        pass
    else:
        found.append("ctypes")
    return found


def _choose_backend() -> str:
    wanted = os.environ.get("WEFT_ATOMICS", "")
    if wanted not in ("", *BACKENDS):
        raise ImportError(f"WEFT_ATOMICS={wanted!r}: expected one of {', '.join(BACKENDS)}")
    if wanted == "c" and _c_ext is None:
        raise ImportError(
            "WEFT_ATOMICS=c but the extension weft.shm._atomics is not built: reinstall weft "
            "with gcc and the Python headers present (pip install -e .)"
        )
    if wanted:
        return wanted
    return "c" if _c_ext is not None else "ctypes"


BACKEND: str = _choose_backend()


class Atomics:
    """Seq-cst 8-byte atomics on a writable buffer; see the module docstring for the rules.

    Args:
        buf: a writable, C-contiguous buffer, normally the `mmap.mmap` of a segment. Its export
            is held until `release`, so the mapping cannot be closed under this object.
        backend: ``"c"`` or ``"ctypes"``; None takes `BACKEND`. Raises ValueError for an unknown
            name and ImportError when that backend is not available here.

    The operation methods are instance attributes bound to the backend's own methods (no
    wrapper frame per call): ``load(off) -> int``, ``store(off, value) -> None``,
    ``fetch_add(off, delta) -> int`` (the old value), ``cas(off, expected, new) -> bool``,
    ``fence() -> None``.
    """

    __slots__ = ("_impl", "backend", "buf", "cas", "fence", "fetch_add", "load", "size", "store")

    load: Callable[[int], int]
    store: Callable[[int, int], None]
    fetch_add: Callable[[int, int], int]
    cas: Callable[[int, int, int], bool]
    fence: Callable[[], None]

    def __init__(self, buf: mmap.mmap, backend: str | None = None) -> None:
        backend = BACKEND if backend is None else backend
        impl: Any
        if backend == "c":
            if _c_ext is None:
                raise ImportError("the weft.shm._atomics extension is not built")
            impl = _c_ext.Atomics(buf)
        elif backend == "ctypes":
            impl = _CtypesAtomics(buf)
        else:
            raise ValueError(f"unknown atomics backend {backend!r}: expected one of {BACKENDS}")
        self._impl = impl
        self.backend = backend
        self.buf = buf
        self.size: int = impl.size
        self.load = impl.load
        self.store = impl.store
        self.fetch_add = impl.fetch_add
        self.cas = impl.cas
        self.fence = impl.fence

    def release(self) -> None:
        """Drop the buffer export (idempotent). Later operations raise ValueError."""
        self._impl.release()

    def __repr__(self) -> str:
        return f"<Atomics backend={self.backend} size={self.size}>"
