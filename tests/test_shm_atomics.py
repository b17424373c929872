"""weft.shm.atomics on both backends: values, errors, lifetime, and exact counts across processes.

Multi-process tests fork (as the supervisor does) and share an anonymous MAP_SHARED mapping;
every child is reaped by the ``children`` fixture, killed first if a test failed early, and every
wait is bounded.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from support.children import Children

from weft.shm import atomics as atomics_mod
from weft.shm.atomics import INT64_MAX, INT64_MIN, Atomics

WAIT_S = 60.0  # bound on any child's run; generous for a loaded 2-core CI machine




@pytest.fixture(params=atomics_mod.BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def buf() -> Iterator[mmap.mmap]:
    m = mmap.mmap(-1, 4096)  # anonymous and MAP_SHARED: forked children share it
    yield m
    m.close()


@pytest.fixture
def atomics(buf: mmap.mmap, backend: str) -> Iterator[Atomics]:
    a = Atomics(buf, backend=backend)
    yield a
    a.release()


def spin_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")


# -- selection -------------------------------------------------------------------------------


def test_both_backends_are_available_and_the_extension_is_the_default() -> None:
    # The package build compiles weft.shm._atomics; a silent fallback would halve throughput.
    assert atomics_mod.available_backends() == ["c", "ctypes"]
    if "WEFT_ATOMICS" not in os.environ:
        assert atomics_mod.BACKEND == "c"


@pytest.mark.parametrize(
    ("value", "expected"), [("ctypes", "ctypes"), ("c", "c"), ("", "c"), ("bogus", None)]
)
def test_weft_atomics_env_selects_the_backend_at_import(value: str, expected: str | None) -> None:
    env = {**os.environ, "WEFT_ATOMICS": value}
    code = "import weft.shm.atomics as a; print(a.BACKEND, a.Atomics(bytearray(8)).backend)"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=WAIT_S
    )
    if expected is None:
        assert proc.returncode != 0
        assert "WEFT_ATOMICS='bogus'" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [expected, expected]


def test_unknown_backend_argument_is_refused(buf: mmap.mmap) -> None:
    with pytest.raises(ValueError, match="unknown atomics backend"):
        Atomics(buf, backend="asm")


# -- single-process semantics ----------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, -1, 4_194_304, INT64_MAX, INT64_MIN, 1 << 62])
def test_store_then_load_round_trips_signed_64_bit_values(atomics: Atomics, value: int) -> None:
    atomics.store(8, value)
    assert atomics.load(8) == value
    assert atomics.load(0) == 0 and atomics.load(16) == 0  # neighbours untouched


def test_fetch_add_returns_the_old_value_and_takes_negative_deltas(atomics: Atomics) -> None:
    assert atomics.fetch_add(0, 5) == 0
    assert atomics.fetch_add(0, -7) == 5
    assert atomics.load(0) == -2
    assert atomics.fetch_add(0, 2) == -2
    assert atomics.load(0) == 0


def test_fetch_add_wraps_at_the_ends_of_the_signed_range(atomics: Atomics) -> None:
    atomics.store(0, INT64_MAX)
    assert atomics.fetch_add(0, 1) == INT64_MAX
    assert atomics.load(0) == INT64_MIN
    assert atomics.fetch_add(0, -1) == INT64_MIN
    assert atomics.load(0) == INT64_MAX


def test_cas_swaps_only_when_the_word_holds_the_expected_value(atomics: Atomics) -> None:
    assert atomics.cas(24, 0, 1234) is True
    assert atomics.load(24) == 1234
    assert atomics.cas(24, 0, 99) is False
    assert atomics.load(24) == 1234
    assert atomics.cas(24, 1234, -1) is True
    assert atomics.cas(24, -1, INT64_MIN) is True
    assert atomics.load(24) == INT64_MIN
    atomics.fence()


def test_words_are_little_endian_int64_in_the_buffer(atomics: Atomics, buf: mmap.mmap) -> None:
    atomics.store(32, -2)
    assert buf[32:40] == (-2).to_bytes(8, "little", signed=True)
    buf[40:48] = (77).to_bytes(8, "little")
    assert atomics.load(40) == 77


@pytest.mark.parametrize(
    ("off", "error"),
    [
        (4, ValueError),  # misaligned
        (4092, IndexError),  # fewer than 8 bytes left (and misaligned)
        (4096, IndexError),  # one past the end
        (-8, IndexError),
        (1 << 70, IndexError),
        (1.0, TypeError),
        ("8", TypeError),
    ],
)
def test_bad_offsets_raise_instead_of_touching_memory(
    atomics: Atomics, off: object, error: type[Exception]
) -> None:
    for op in (
        lambda: atomics.load(off),  # type: ignore[arg-type]
        lambda: atomics.store(off, 1),  # type: ignore[arg-type]
        lambda: atomics.fetch_add(off, 1),  # type: ignore[arg-type]
        lambda: atomics.cas(off, 0, 1),  # type: ignore[arg-type]
    ):
        with pytest.raises(error):
            op()


def test_last_word_of_the_buffer_is_addressable(atomics: Atomics) -> None:
    atomics.store(4088, 9)
    assert atomics.load(4088) == 9


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1, 1 << 64])
def test_values_outside_int64_raise_overflow(atomics: Atomics, value: int) -> None:
    with pytest.raises(OverflowError):
        atomics.store(0, value)
    with pytest.raises(OverflowError):
        atomics.fetch_add(0, value)
    with pytest.raises(OverflowError):
        atomics.cas(0, 0, value)
    assert atomics.load(0) == 0


def test_alignment_is_of_the_address_not_just_the_offset(buf: mmap.mmap, backend: str) -> None:
    view = memoryview(buf)[4:]
    a = Atomics(view, backend=backend)  # type: ignore[arg-type]
    try:
        with pytest.raises(ValueError, match="aligned"):
            a.load(0)
        assert a.load(4) == 0  # buffer offset 4 is address offset 8
    finally:
        a.release()
        view.release()


def test_a_read_only_buffer_is_refused(backend: str) -> None:
    m = mmap.mmap(-1, 64, prot=mmap.PROT_READ)
    try:
        with pytest.raises(BufferError):
            Atomics(m, backend=backend)
    finally:
        m.close()


def test_the_mapping_cannot_be_closed_under_a_live_atomics(backend: str) -> None:
    m = mmap.mmap(-1, 64)
    a = Atomics(m, backend=backend)
    with pytest.raises(BufferError):
        m.close()
    a.store(0, 1)
    a.release()
    a.release()  # idempotent
    with pytest.raises(ValueError, match="released"):
        a.load(0)
    m.close()  # the export is gone


# -- across processes ------------------------------------------------------------------------

N_ADDS = 100_000
GO, READY_COUNT, COUNTER = 0, 8, 64  # word offsets in the shared buffer


def _start_together(a: Atomics) -> None:
    """Child side of a start barrier: say ready, wait for the parent's go."""
    a.fetch_add(READY_COUNT, 1)
    spin_until(lambda: a.load(GO) == 1)


def _release_children(a: Atomics, n: int) -> None:
    spin_until(lambda: a.load(READY_COUNT) == n)
    a.store(GO, 1)


def test_fetch_add_from_two_processes_loses_no_update(atomics: Atomics, children: Children) -> None:
    def adder() -> None:
        _start_together(atomics)
        for _ in range(N_ADDS):
            atomics.fetch_add(COUNTER, 1)

    pids = [children.fork(adder) for _ in range(2)]
    _release_children(atomics, 2)
    assert [children.wait(p) for p in pids] == [0, 0]
    assert atomics.load(COUNTER) == 2 * N_ADDS


def test_cas_increment_loops_from_two_processes_lose_no_update(
    atomics: Atomics, children: Children
) -> None:
    n = N_ADDS // 2
    retries = 128  # word offset: how often a CAS lost a race (shows there was contention)

    def incrementer() -> None:
        _start_together(atomics)
        for _ in range(n):
            while True:
                v = atomics.load(COUNTER)
                if atomics.cas(COUNTER, v, v + 1):
                    break
                atomics.fetch_add(retries, 1)

    pids = [children.fork(incrementer) for _ in range(2)]
    _release_children(atomics, 2)
    assert [children.wait(p) for p in pids] == [0, 0]
    assert atomics.load(COUNTER) == 2 * n


def test_the_two_backends_are_atomic_with_each_other(buf: mmap.mmap, children: Children) -> None:
    # A worker on the fallback and one on the extension must agree on the same words.
    views = {b: Atomics(buf, backend=b) for b in atomics_mod.BACKENDS}
    try:

        def adder(b: str) -> Callable[[], None]:
            def run() -> None:
                _start_together(views[b])
                for _ in range(N_ADDS // 2):
                    views[b].fetch_add(COUNTER, -1)

            return run

        pids = [children.fork(adder(b)) for b in atomics_mod.BACKENDS]
        _release_children(views["c"], 2)
        assert [children.wait(p) for p in pids] == [0, 0]
        assert views["ctypes"].load(COUNTER) == -N_ADDS
    finally:
        for a in views.values():
            a.release()
