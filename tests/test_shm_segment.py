"""weft.shm.segment: creating, attaching and removing segments, and the instance lock.

Every test uses its own instance name (``test-<random>``), and the ``instance`` fixture removes
whatever that instance left in /dev/shm and then checks nothing of it is left. Child processes
are reaped by the ``children`` fixture (killed first if a test failed early); every wait is
bounded.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import time
from collections.abc import Callable, Iterator

import pytest
from support.children import Children

from weft.shm import segment as seg_mod
from weft.shm.segment import (
    HEADER_SIZE,
    InstanceLock,
    InstanceRunning,
    Segment,
    SegmentError,
    SegmentExists,
    remove_instance,
    segment_names,
)

WAIT_S = 30.0  # bound on any wait for a child





class Pipe:
    """One-way messages between a test and its child, every read bounded."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def send(self, msg: str) -> None:
        os.write(self.w, msg.encode() + b"\n")

    def recv(self, timeout: float = WAIT_S) -> str:
        ready, _, _ = select.select([self.r], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no message within {timeout}s")
        return os.read(self.r, 4096).decode().strip()

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def pipes() -> Iterator[Callable[[], Pipe]]:
    made: list[Pipe] = []

    def make() -> Pipe:
        p = Pipe()
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def path_of(name: str) -> str:
    return "/dev/shm" + name


# -- create and attach -----------------------------------------------------------------------


def test_create_then_attach_round_trips_header_and_data(instance: str) -> None:
    size = Segment.size_for(1000)
    assert size == HEADER_SIZE + 1000
    with Segment.create(instance, "state", size, generation=7) as made:
        assert made.name == f"/weft-{instance}-state"
        assert (made.size, made.generation, made.creator_pid) == (size, 7, os.getpid())
        assert made.data_offset == 64 and len(made.buf) == size
        assert stat.S_IMODE(os.stat(path_of(made.name)).st_mode) == 0o600
        made.atomics.store(made.data_offset, 1234)
        made.atomics.store(size - 8, -5)
        with Segment.attach(instance, "state") as seen:
            assert (seen.size, seen.generation, seen.creator_pid) == (size, 7, os.getpid())
            assert seen.atomics.load(seen.data_offset) == 1234
            assert seen.atomics.load(size - 8) == -5
            seen.atomics.fetch_add(seen.data_offset, 1)
        assert made.atomics.load(made.data_offset) == 1235  # one memory, two mappings
    assert segment_names(instance) == [f"/weft-{instance}-state"]  # close keeps the name


def test_create_refuses_an_existing_name(instance: str) -> None:
    with Segment.create(instance, "state", 4096):
        with pytest.raises(SegmentExists, match=f"/weft-{instance}-state already exists"):
            Segment.create(instance, "state", 4096)


def test_create_larger_than_dev_shm_fails_at_once_and_leaves_nothing(instance: str) -> None:
    started = time.monotonic()
    with pytest.raises(SegmentError, match=r"cannot allocate \d+ bytes .*/dev/shm has"):
        Segment.create(instance, "huge", 1 << 50)
    assert time.monotonic() - started < 5.0
    assert segment_names(instance) == []


def test_attach_to_a_missing_segment_names_it(instance: str) -> None:
    with pytest.raises(SegmentError, match=f"no shared-memory segment /weft-{instance}-nope"):
        Segment.attach(instance, "nope")


@pytest.mark.parametrize(
    ("word", "value", "complaint"),
    [
        (seg_mod.H_MAGIC, 0x1234, "magic"),
        (seg_mod.H_VERSION, seg_mod.LAYOUT_VERSION + 1, "layout version"),
        (seg_mod.H_SIZE, 8192, "records 8192 bytes but is 4096"),
        (seg_mod.H_START, 42, "stale"),  # the creator's pid now names another process
        (seg_mod.H_READY, 0, "not READY"),
    ],
    ids=["magic", "version", "size", "creator-start", "not-ready"],
)
def test_attach_refuses_a_bad_header_field(
    instance: str, word: int, value: int, complaint: str
) -> None:
    with Segment.create(instance, "state", 4096) as made:
        made.atomics.store(word, value)
        with pytest.raises(SegmentError, match=complaint) as err:
            Segment.attach(instance, "state")
        assert f"/weft-{instance}-state" in str(err.value)


# Word 5 of the header; it held half of the boot id in layout version 1.
CREATOR_IDENTITY_WORD = 40
DEAD_PID = 4_000_001  # above pid_max's 2**22: never a live process


def test_a_live_instance_lock_proves_a_segment_fresh_whatever_this_proc_shows(
    instance: str,
) -> None:
    """`weft status` beside a systemd unit reads another /proc (ProtectKernelTunables=,
    ProtectProc=, a container): the creator words it sees need not match its own view."""
    # 1. the instance is running: its lock is held, it made the segment
    lock = InstanceLock.acquire(instance)
    try:
        with Segment.create(instance, "state", 4096) as made:
            # 2. as read from another /proc view: another boot id / start time, and a
            #    creator pid this reader cannot see
            made.atomics.store(CREATOR_IDENTITY_WORD, 42)
            made.atomics.store(seg_mod.H_CREATOR, DEAD_PID)
            with Segment.attach(instance, "state") as seen:
                assert seen.creator_pid == DEAD_PID
            # 3. the instance dies (its lock goes): the same segment is stale
            lock.release()
            with pytest.raises(SegmentError, match="stale"):
                Segment.attach(instance, "state")
    finally:
        lock.release()


def test_without_a_lock_the_creators_pid_and_start_time_decide(instance: str) -> None:
    with Segment.create(instance, "state", 4096) as made:
        # 1. made by this live process (no lock: not a supervisor): fresh
        Segment.attach(instance, "state").close()
        # 2. a creator that is gone (a SIGKILLed supervisor, a reboot): stale
        made.atomics.store(seg_mod.H_CREATOR, DEAD_PID)
        with pytest.raises(SegmentError, match=f"stale.*pid {DEAD_PID}"):
            Segment.attach(instance, "state")


def test_attach_refuses_a_segment_whose_creator_died_before_writing_anything(
    instance: str,
) -> None:
    with Segment.create(instance, "state", 4096) as made:
        made.buf[:HEADER_SIZE] = bytes(HEADER_SIZE)  # sized, never written
        with pytest.raises(SegmentError, match="not READY"):
            Segment.attach(instance, "state")


def test_attach_refuses_a_file_too_small_for_a_header(instance: str) -> None:
    fd = os.open(path_of(f"/weft-{instance}-tiny"), os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    with pytest.raises(SegmentError, match="0 bytes, too small"):
        Segment.attach(instance, "tiny")


def test_close_releases_the_atomics_and_unlink_removes_the_name(instance: str) -> None:
    made = Segment.create(instance, "state", 4096)
    atomics = made.atomics
    made.close()
    made.close()  # idempotent
    with pytest.raises(ValueError):
        atomics.load(made.data_offset)
    with pytest.raises(ValueError, match="closed"):
        _ = made.buf
    assert made.unlink() is True
    assert made.unlink() is False
    assert segment_names(instance) == []


def test_a_forked_child_shares_the_mapping(instance: str, children: Children) -> None:
    with Segment.create(instance, "state", 4096) as made:
        off = made.data_offset

        def child() -> None:
            made.atomics.fetch_add(off, 41)

        made.atomics.store(off, 1)
        assert children.wait(children.fork(child)) == 0
        assert made.atomics.load(off) == 42


@pytest.mark.parametrize(
    ("inst", "name"),
    [("a/b", "x"), ("", "x"), ("-a", "x"), ("ok", "with-dash"), ("ok", "a/b"), ("ok", "")],
)
def test_bad_names_are_refused(inst: str, name: str) -> None:
    with pytest.raises(ValueError):
        Segment.create(inst, name, 4096)


def test_the_control_name_is_reserved_for_the_lock(instance: str) -> None:
    with pytest.raises(ValueError, match="instance lock"):
        Segment.create(instance, "control", 4096)


def test_segment_names_never_include_an_instance_sharing_the_prefix(instance: str) -> None:
    other = f"{instance}-sub"
    try:
        with Segment.create(instance, "a", 4096), Segment.create(other, "b", 4096):
            assert segment_names(instance) == [f"/weft-{instance}-a"]
            assert remove_instance(instance) == [f"/weft-{instance}-a"]
            assert segment_names(other) == [f"/weft-{other}-b"]
    finally:
        remove_instance(other)


# -- the instance lock -----------------------------------------------------------------------


def test_lock_acquire_records_the_pid_and_release_unlinks_the_control_segment(
    instance: str,
) -> None:
    lock = InstanceLock.acquire(instance)
    control = path_of(f"/weft-{instance}-control")
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
    with open(control) as f:
        assert int(f.read()) == os.getpid()
    assert segment_names(instance) == [f"/weft-{instance}-control"]
    lock.release()
    lock.release()  # idempotent
    assert segment_names(instance) == []
    with InstanceLock.acquire(instance) as again:  # free again
        assert again.held
    assert not again.held


def test_a_second_acquire_while_a_live_process_holds_it_raises_instance_running(
    instance: str, children: Children, pipes: Callable[[], Pipe]
) -> None:
    up, down = pipes(), pipes()

    def holder() -> None:
        lock = InstanceLock.acquire(instance)
        up.send("locked")
        assert down.recv() == "done"
        lock.release()

    pid = children.fork(holder)
    assert up.recv() == "locked"
    with pytest.raises(InstanceRunning, match=f"already running \\(pid {pid}\\)") as err:
        InstanceLock.acquire(instance)
    assert (err.value.instance, err.value.pid) == (instance, pid)
    down.send("done")
    assert children.wait(pid) == 0
    InstanceLock.acquire(instance).release()


def test_acquire_after_a_sigkilled_instance_removes_its_stale_segments(
    instance: str, children: Children, pipes: Callable[[], Pipe]
) -> None:
    up = pipes()

    def supervisor() -> None:
        InstanceLock.acquire(instance)
        Segment.create(instance, "state", 4096)
        Segment.create(instance, "buckets", 4096)
        up.send("running")
        time.sleep(WAIT_S)

    pid = children.fork(supervisor)
    assert up.recv() == "running"
    os.kill(pid, signal.SIGKILL)
    assert children.wait(pid) == -signal.SIGKILL
    assert len(segment_names(instance)) == 3  # control, state, buckets: all left behind
    lock = InstanceLock.acquire(instance)  # the lock died with its holder
    assert segment_names(instance) == [f"/weft-{instance}-control"]
    Segment.create(instance, "state", 4096).close()  # the name is free again
    lock.release()
    remove_instance(instance)
    assert segment_names(instance) == []


def test_a_forked_child_closing_or_releasing_its_copy_keeps_the_parent_locked(
    instance: str, children: Children, pipes: Callable[[], Pipe]
) -> None:
    up = pipes()
    lock = InstanceLock.acquire(instance)
    try:

        def worker() -> None:
            lock.release()  # in a child: only closes its copy, never unlocks the parent's
            lock.close_in_child()
            assert not lock.held
            up.send("closed")

        assert children.wait(children.fork(worker)) == 0
        assert up.recv() == "closed"

        def contender() -> None:
            try:
                InstanceLock.acquire(instance)
            except InstanceRunning as e:
                up.send(str(e.pid))
            else:
                up.send("acquired")

        assert children.wait(children.fork(contender)) == 0
        assert up.recv() == str(os.getpid())
        assert os.path.exists(path_of(f"/weft-{instance}-control"))
    finally:
        lock.release()


def test_a_worker_that_kept_the_lock_open_is_named_in_the_error(
    instance: str, children: Children, pipes: Callable[[], Pipe]
) -> None:
    # A supervisor that dies while a forked worker still holds the lock's descriptor: the lock
    # stays held, and the message says the pid that took it has exited.
    up = pipes()
    grandchild = 0

    def supervisor() -> None:
        InstanceLock.acquire(instance)
        worker = os.fork()
        if worker == 0:  # keeps the inherited descriptor open
            time.sleep(WAIT_S)
            os._exit(0)
        up.send(str(worker))

    sup = children.fork(supervisor)
    try:
        grandchild = int(up.recv())
        assert children.wait(sup) == 0
        with pytest.raises(InstanceRunning, match=f"pid {sup} that took the lock has exited"):
            InstanceLock.acquire(instance)
    finally:
        if grandchild:  # not our child (reparented): kill it and wait until it is gone
            os.kill(grandchild, signal.SIGKILL)
            deadline = time.monotonic() + WAIT_S
            while _running(grandchild) and time.monotonic() < deadline:
                time.sleep(0.01)
    InstanceLock.acquire(instance).release()  # the last descriptor closed: free


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False
