"""Named POSIX shared-memory segments of a weft instance, and the lock that says it is running.

This module owns the lifecycle of shared memory: creating a segment (sized up front, header
written, READY last), attaching to one (every header field checked), listing and removing an
instance's segments, and `InstanceLock`, the flock that tells a running instance from the
leftovers of a dead one.

Names. A segment is ``/weft-<instance>-<name>`` (``/dev/shm/weft-<instance>-<name>`` on Linux).
An instance name may contain ``-``; a segment name may not, so the owner of a file is read off
its last ``-`` and instance ``a`` never claims instance ``a-b``'s segments. The segment name
``control`` is the lock's own (`InstanceLock`), never a `Segment`.

Header. The first `HEADER_SIZE` (64) bytes are eight signed 64-bit words, written and read
through `weft.shm.atomics.Atomics` like every other shared word::

    0 magic "WEFTSHM\\0"   1 layout version    2 total size       3 generation
    4 creator pid          5 creator start time (field 22 of /proc/<pid>/stat)   6 zero
    7 READY word: written last, with a seq-cst store, so a reader that sees it sees the rest

`Segment.data_offset` is the first byte after the header (64: cache-line aligned). Callers lay
out their structures from there; each structure's ``size_for`` gives its bytes and
`Segment.size_for` turns the sum into the segment size.

Theory of operation:

* `Segment.create` opens with O_CREAT|O_EXCL and mode 0600 (an existing name is an error, never
  silently shared), then sizes the file with ``posix_fallocate``: tmpfs reserves the pages now,
  so a segment larger than /dev/shm fails at once with ENOSPC instead of killing a worker with
  SIGBUS on first touch of a page that cannot be had. The pages are zero; the header goes in,
  READY last. On any failure the half-made segment is unlinked.
* `Segment.attach` refuses, with a `SegmentError` naming the segment and the field, anything
  that is not a finished segment of this weft layout made by a live instance.
* Live means: the instance lock is held (the supervisor takes it before it creates anything,
  and the kernel drops it when the holder dies), or, where the lock cannot be probed (no
  control file, as for a segment made outside a supervisor, or one this user cannot open),
  the creator pid still runs with the start time recorded. Neither depends on which /proc
  view the reader has: a boot id did (systemd's ProtectKernelTunables=/ProtectProc= and
  containers show another /proc, and a `weft status` beside the unit called a live segment
  "made during another boot"). A reboot or a killed supervisor leaves the lock free; a
  reused pid has another start time.
* `InstanceLock` (below) is a non-blocking exclusive ``flock`` on ``/dev/shm/weft-<instance>-
  control``. The kernel drops a flock when the last descriptor of its open file description
  closes, so a supervisor that was SIGKILLed leaves the lock free: its segments are stale and
  the next `InstanceLock.acquire` removes them before anything is created.

flock and fork. A flock belongs to the *open file description*; ``fork()`` gives the child a
descriptor of the same description. So (1) while any child keeps its copy open, the lock stays
held after the supervisor dies, and the next start reports the instance as running; (2) a child
that calls ``flock(LOCK_UN)`` would unlock the supervisor's lock. A forked worker must therefore
close its copy without unlocking: `InstanceLock.close_in_child` (or ``os.close(lock.fileno())``).
`release` called in a process other than the one that acquired does exactly that too, never
unlocks or unlinks. The descriptor is O_CLOEXEC, so an ``exec`` drops it by itself.

mmap and fork. The mapping is MAP_SHARED: a forked child sees the same memory at the same
address, so segments are created before forking and inherited, not re-attached. Python's
``mmap`` keeps a ``dup()`` of the segment descriptor for as long as the mapping is open; a child
that closes every inherited descriptor by number closes that one too, which is harmless to the
mapping, but a later ``mmap.close()`` in the child would then close whatever reused the number:
a child should end with ``os._exit`` rather than closing inherited segments.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import time

import posix_ipc

from weft.shm.atomics import Atomics

__all__ = [
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "InstanceLock",
    "InstanceRunning",
    "Segment",
    "SegmentError",
    "SegmentExists",
    "remove_instance",
    "segment_names",
]

SHM_DIR = "/dev/shm"  # where glibc's shm_open puts POSIX shared memory on Linux
PREFIX = "weft"
CONTROL = "control"  # the InstanceLock's segment

HEADER_SIZE = 64  # eight words; one cache line, so data_offset is cache-line aligned
# Bump when the header or the layout of any structure in weft.shm changes: attach then refuses
# a segment made by a weft that lays memory out differently.
LAYOUT_VERSION = 3  # 2: creator start time instead of the boot id; 3: endpoint records
MAGIC = int.from_bytes(b"WEFTSHM\0", "little", signed=True)
READY = int.from_bytes(b"READY\0\0\0", "little", signed=True)

# Header word offsets.
H_MAGIC = 0
H_VERSION = 8
H_SIZE = 16
H_GENERATION = 24
H_CREATOR = 32
H_START = 40
H_SPARE = 48
H_READY = 56

NAME_MAX = 255  # <limits.h>: longest file name in /dev/shm
_INSTANCE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")


class SegmentError(Exception):
    """A segment cannot be created or attached; the message names it and says why."""


class SegmentExists(SegmentError):
    """`Segment.create` found the name taken (O_EXCL)."""


class InstanceRunning(Exception):
    """The instance lock is held: another process runs this instance.

    ``pid`` is the pid recorded by the holder (0 when it could not be read).
    """

    def __init__(self, instance: str, pid: int) -> None:
        self.instance = instance
        self.pid = pid
        path = _path(_segment_name(instance, CONTROL))
        if pid and not _alive(pid):
            msg = (
                f"weft instance {instance!r} is locked, but pid {pid} that took the lock has "
                f"exited: a process it forked still holds {path} open (a leftover worker?); "
                f"`fuser -v {path}` names it"
            )
        elif pid:
            msg = f"weft instance {instance!r} is already running (pid {pid})"
        else:
            msg = f"weft instance {instance!r} is already running (lock {path} is held)"
        super().__init__(msg)


def _check_instance(instance: str) -> None:
    if not _INSTANCE_RE.fullmatch(instance):
        raise ValueError(
            f"instance name {instance!r}: use letters, digits, '_', '.' and '-' "
            "(not starting with '.' or '-')"
        )


def _segment_name(instance: str, name: str) -> str:
    _check_instance(instance)
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"segment name {name!r}: use letters, digits, '_' and '.' (no '-': it separates "
            "the instance from the segment name)"
        )
    full = f"/{PREFIX}-{instance}-{name}"
    if len(full) - 1 > NAME_MAX:
        raise ValueError(f"segment name {full!r} is longer than {NAME_MAX} characters")
    return full


def _path(segment: str) -> str:
    return SHM_DIR + segment


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


def start_time(pid: int | str = "self") -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot.

    With the pid it tells a process from a later one that reuses the pid. None when the
    process cannot be seen (gone, or hidden from this reader).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may itself contain ") ".
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22; fields[0] is field 3


def lock_held(instance: str) -> bool | None:
    """Whether some process holds `instance`'s lock: True, False, or None (cannot tell:
    no control file, or not ours to open).

    Probes with a shared, non-blocking flock released at once. An `InstanceLock.acquire`
    racing the probe retries (`_ACQUIRE_BUSY_RETRIES`) rather than report a running instance.
    """
    path = _path(_segment_name(instance, CONTROL))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the probe's lock, if it got one
    return False


def segment_names(instance: str) -> list[str]:
    """Names (``/weft-<instance>-<name>``) of this instance's segments, sorted, control included."""
    _check_instance(instance)
    owner = f"{PREFIX}-{instance}"
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted("/" + e for e in entries if e.startswith(owner) and e.rpartition("-")[0] == owner)


def _unlink(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False  # gone already (another remover, or a racing release)
    return True


def remove_instance(instance: str) -> list[str]:
    """Unlink every segment of `instance`, the control segment included; return their names.

    Unlinking only removes names: processes that still map a segment keep using its memory
    until they unmap it, but nobody can attach to it any more.
    """
    return [name for name in segment_names(instance) if _unlink(name)]


class Segment:
    """One mapped segment. Make it with `create` or `attach`; `close` unmaps, `unlink` removes."""

    def __init__(self, name: str, buf: mmap.mmap, atomics: Atomics) -> None:
        self._name = name
        self._buf: mmap.mmap | None = buf
        self._atomics = atomics
        self._size = len(buf)

    # -- making one --------------------------------------------------------------------------

    @staticmethod
    def size_for(data_bytes: int) -> int:
        """The segment size that gives `data_bytes` usable bytes after the header."""
        return HEADER_SIZE + (data_bytes + 7) // 8 * 8

    @classmethod
    def create(cls, instance: str, name: str, size: int, generation: int = 0) -> Segment:
        """Create ``/weft-<instance>-<name>`` of `size` bytes in all (header included).

        The memory is reserved now (posix_fallocate) and zero; the header is written with READY
        last. Raises SegmentExists when the name is taken, SegmentError when /dev/shm cannot
        hold `size` bytes or the segment cannot be made, ValueError for a bad name or a size
        smaller than the header. On failure nothing is left behind.
        """
        full = _segment_name(instance, name)
        if name == CONTROL:
            raise ValueError(f"segment name {CONTROL!r} is the instance lock's own")
        if size < HEADER_SIZE:
            raise ValueError(f"segment {full}: size {size} is smaller than its header")
        try:
            shm = posix_ipc.SharedMemory(full, posix_ipc.O_CREX, mode=0o600)
        except posix_ipc.ExistentialError:
            raise SegmentExists(
                f"shared-memory segment {full} already exists: instance {instance!r} is "
                "running, or left it behind (InstanceLock.acquire removes a dead instance's)"
            ) from None
        except posix_ipc.Error as e:
            raise SegmentError(f"cannot create shared-memory segment {full}: {e}") from None
        buf: mmap.mmap | None = None
        atomics: Atomics | None = None
        try:
            try:
                os.posix_fallocate(shm.fd, 0, size)
            except OSError as e:
                free = _free_bytes()
                raise SegmentError(
                    f"cannot allocate {size} bytes for shared-memory segment {full}: "
                    f"{os.strerror(e.errno or 0)} ({SHM_DIR} has {free} bytes free: lower the "
                    f"configured capacities or enlarge {SHM_DIR})"
                ) from None
            buf = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            atomics = Atomics(buf)
            for off, value in (
                (H_MAGIC, MAGIC),
                (H_VERSION, LAYOUT_VERSION),
                (H_SIZE, size),
                (H_GENERATION, generation),
                (H_CREATOR, os.getpid()),
                (H_START, start_time() or 0),
            ):
                atomics.store(off, value)
            atomics.store(H_READY, READY)  # last: a reader that sees READY sees all of the above
        except BaseException:
            if atomics is not None:
                atomics.release()
            if buf is not None:
                buf.close()
            shm.close_fd()
            _unlink(full)
            raise
        # The mapping holds its own dup of the descriptor; this one is no longer needed.
        shm.close_fd()
        return cls(full, buf, atomics)

    @classmethod
    def attach(cls, instance: str, name: str) -> Segment:
        """Map an existing segment after checking its header.

        Raises SegmentError, naming the segment and what is wrong, when it does not exist, is
        too small, has another magic or layout version, a size other than its file's, no READY
        word (still being created, or its creator died while creating), or is stale (neither
        the instance lock is held nor does its creator still run: see the module docstring).
        """
        full = _segment_name(instance, name)
        try:
            shm = posix_ipc.SharedMemory(full)
        except posix_ipc.ExistentialError:
            raise SegmentError(
                f"no shared-memory segment {full}: is weft instance {instance!r} running?"
            ) from None
        except posix_ipc.Error as e:
            raise SegmentError(f"cannot open shared-memory segment {full}: {e}") from None
        try:
            size = shm.size
            if size < HEADER_SIZE:
                raise SegmentError(
                    f"shared-memory segment {full} is {size} bytes, too small for a weft "
                    "header: not made by weft, or its creator died while sizing it"
                )
            buf = mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            shm.close_fd()
        atomics = Atomics(buf)
        try:
            _check_header(full, atomics, size)
            _check_creator(full, instance, atomics)
        except BaseException:
            atomics.release()
            buf.close()
            raise
        return cls(full, buf, atomics)

    # -- using one ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """``/weft-<instance>-<name>``."""
        return self._name

    @property
    def buf(self) -> mmap.mmap:
        if self._buf is None:
            raise ValueError(f"segment {self._name} is closed")
        return self._buf

    @property
    def atomics(self) -> Atomics:
        return self._atomics

    @property
    def data_offset(self) -> int:
        """First byte after the header (64-byte aligned)."""
        return HEADER_SIZE

    @property
    def size(self) -> int:
        """Total bytes, header included (as passed to `create`)."""
        return self._size

    @property
    def generation(self) -> int:
        """The generation recorded by the creator."""
        return self._atomics.load(H_GENERATION)

    @property
    def creator_pid(self) -> int:
        return self._atomics.load(H_CREATOR)

    def close(self) -> None:
        """Unmap (idempotent). The segment stays for others until `unlink`.

        Releases this segment's `Atomics` first, so structures built on it raise ValueError
        from then on instead of touching unmapped memory. Raises BufferError if some other
        export of `buf` (a memoryview, another Atomics) is still alive.
        """
        if self._buf is None:
            return
        self._atomics.release()
        self._buf.close()
        self._buf = None

    def unlink(self) -> bool:
        """Remove the name (mappings stay valid). False when it was already gone."""
        return _unlink(self._name)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._buf is None else f"{self._size} bytes"
        return f"<Segment {self._name} {state}>"


def _free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _check_header(full: str, atomics: Atomics, size: int) -> None:
    # READY first: its seq-cst load orders the reads of the other words after it.
    ready = atomics.load(H_READY)
    magic = atomics.load(H_MAGIC)
    if ready != READY and magic == 0:
        raise SegmentError(
            f"shared-memory segment {full} is not READY: its creator is still writing it, or "
            "died while creating it"
        )
    if magic != MAGIC:
        raise SegmentError(
            f"shared-memory segment {full} has magic {magic:#x}, not weft's {MAGIC:#x}: "
            "not a weft segment"
        )
    version = atomics.load(H_VERSION)
    if version != LAYOUT_VERSION:
        raise SegmentError(
            f"shared-memory segment {full} has layout version {version}, this weft uses "
            f"{LAYOUT_VERSION}: it was made by another weft version (restart the instance)"
        )
    recorded = atomics.load(H_SIZE)
    if recorded != size:
        raise SegmentError(
            f"shared-memory segment {full} records {recorded} bytes but is {size} bytes: "
            "resized or damaged"
        )
    if ready != READY:
        raise SegmentError(
            f"shared-memory segment {full} is not READY: its creator (pid "
            f"{atomics.load(H_CREATOR)}) is still writing it, or died while creating it"
        )


def _check_creator(full: str, instance: str, atomics: Atomics) -> None:
    if lock_held(instance):
        return
    pid, started = atomics.load(H_CREATOR), atomics.load(H_START)
    if pid > 0 and start_time(pid) == started:
        return
    raise SegmentError(
        f"shared-memory segment {full} is stale: the instance lock is not held and its "
        f"creator (pid {pid}) no longer runs (killed, or before a reboot); the next start of "
        f"instance {instance!r} removes it"
    )


# -- the instance lock ----------------------------------------------------------------------

# acquire() retries when the file it locked was unlinked by the previous holder's release()
# between its open and its flock; each retry needs another release to race it, so a few do.
_ACQUIRE_ATTEMPTS = 8
# A probe holds its shared lock for a few microseconds: 5 x 2 ms rides over one by far.
_ACQUIRE_BUSY_RETRIES = 5
_ACQUIRE_BUSY_WAIT = 0.002
_PID_FIELD = 11  # bytes: a pid right-aligned in 10 digits (pid_max <= 2**22) and a newline


class InstanceLock:
    """The running instance's exclusive flock on ``/dev/shm/weft-<instance>-control``.

    Held by the supervisor from start to exit. The control segment holds the holder's pid as
    text, for `InstanceRunning`'s message and for people (``cat /dev/shm/weft-x-control``). See
    the module docstring for what fork does to the lock.
    """

    def __init__(self, instance: str, fd: int, path: str) -> None:
        self.instance = instance
        self.path = path
        self._fd: int | None = fd
        self._ino = os.fstat(fd).st_ino
        self._owner = os.getpid()

    @classmethod
    def acquire(cls, instance: str) -> InstanceLock:
        """Take the lock, then remove every other segment of `instance` (a dead one's).

        Raises InstanceRunning when another process holds the lock; SegmentError when the
        control segment cannot be opened. Never blocks.
        """
        path = _path(_segment_name(instance, CONTROL))
        for _ in range(_ACQUIRE_ATTEMPTS):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise SegmentError(f"cannot open the instance lock {path}: {e.strerror}") from None
            try:
                _flock_exclusive(fd)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise InstanceRunning(instance, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder's release() may have unlinked the file between our open and
            # our flock: then we hold a lock nobody else can see. Locked the current file?
            try:
                current = os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        else:
            raise SegmentError(f"cannot take the instance lock {path}: it keeps being replaced")
        lock = cls(instance, fd, path)
        try:
            control = _segment_name(instance, CONTROL)
            for name in segment_names(instance):
                if name != control:
                    _unlink(name)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid():>{_PID_FIELD - 1}}\n".encode(), 0)
        except BaseException:
            lock.release()
            raise
        return lock

    def fileno(self) -> int:
        """The locked descriptor (for a forked child's close list). ValueError once closed."""
        if self._fd is None:
            raise ValueError(f"instance lock {self.path} is closed")
        return self._fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def close_in_child(self) -> None:
        """In a forked child: close the inherited descriptor without unlocking (idempotent).

        The parent keeps the lock (same open file description); the child stops holding it
        alive.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        """Unlink the control segment, unlock and close (idempotent).

        In a process other than the one that acquired (a forked child), only closes the
        descriptor, as `close_in_child`: the lock is the acquirer's to give up.
        """
        if self._fd is None:
            return
        if os.getpid() != self._owner:
            self.close_in_child()
            return
        fd, self._fd = self._fd, None
        try:
            # Unlink only our own file: after remove_instance() another starter may already
            # have made and locked a new one under the same name.
            try:
                if os.stat(self.path, follow_symlinks=False).st_ino == self._ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<InstanceLock {self.path} {'held' if self.held else 'released'}>"


def _flock_exclusive(fd: int) -> None:
    """LOCK_EX|LOCK_NB, tried again a few times: a `lock_held` probe holds a shared lock for
    microseconds and must not make a starting instance look like a running one. Raises
    BlockingIOError while someone really holds it."""
    for _ in range(_ACQUIRE_BUSY_RETRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(_ACQUIRE_BUSY_WAIT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_pid(fd: int) -> int:
    try:
        text = os.pread(fd, _PID_FIELD, 0)
        return int(text.strip() or 0)
    except (OSError, ValueError):
        return 0
