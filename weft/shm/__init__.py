"""Shared memory between the supervisor and its forked workers, without locks.

The supervisor creates every segment before it forks; workers inherit the mappings (MAP_SHARED,
same addresses); ``weft status`` attaches by name. The request path takes no lock: a lock held
by a worker that dies is never released, and a blocking one would stall the trio loop. Shared
state is built instead from 8-byte words changed with seq-cst atomic operations, each word
either owned by one writer or claimed with a CAS that tags it with the claimer's pid, so that
whatever a dead worker held can be found and released by pid.

Modules, bottom up, and what each owns:

``atomics``    `Atomics`: load/store/fetch_add/cas/fence on 8-byte-aligned offsets of a mapping;
               a C extension (``_atomics.c``) with a ctypes-over-libatomic fallback.
``segment``    `Segment`: ``/weft-<instance>-<name>``, created O_EXCL 0600 and posix_fallocate'd,
               a 64-byte header (magic, layout version, size, generation, creator pid, boot id,
               READY written last) checked on attach; `InstanceLock`, the flock on the control
               segment that tells a running instance from a dead one's leftovers.
``seqlock``    `SeqlockRecord`: several words one process writes and others read whole.
``slots``      `SlotArray`: owner-tagged slots, CAS(0 -> pid) / CAS(pid -> 0), reclaim(pid).
``table``      `KeyedTable`: open addressing on a 63-bit key hash, bounded linear probing,
               tombstones, idle eviction, a reservation protocol for concurrent inserts.
``worktable``  `WorkerTable`: a row per worker process (identity and state under a seqlock,
               heartbeat and counters as single words).
``counters``   `InflightMatrix`: per-endpoint in-flight counts, a single-writer row per worker,
               summed on read.

Layout. A segment is its header followed by the caller's structures at byte offsets it
chooses. Every structure has ``size_for(...)`` (a whole number of 64-byte cache lines) and takes
``(atomics, offset, ...)``, so a layout is a running sum::

    off = seg.data_offset                      # 64
    table = WorkerTable(seg.atomics, off, rows); off += WorkerTable.size_for(rows)
    inflight = InflightMatrix(seg.atomics, off, rows, columns)

and the segment size is ``Segment.size_for(sum of the sizes)``. Every process must compute the
same layout from the same parameters (record them in the segment, or derive them from the
config generation the segment was made for); `segment.LAYOUT_VERSION` is bumped when any
structure's layout changes, so a weft of another layout refuses to attach.

Values are signed 64-bit words throughout; times are ``time.monotonic_ns()`` (one clock for
every process on the machine).
"""
