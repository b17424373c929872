"""Rate limiting: GCRA token buckets and nginx-style leaky buckets, one shared word per key.

This module owns the *decision* of ``[[routes.rate_limit]]`` (pure functions of one
theoretical-arrival-time word and a clock) and the one small layer that keeps those words in
the instance's shared `weft.shm.table.KeyedTable`, so that any number of workers admit exactly
the configured rate, not a per-worker share of it. The middleware around it is
`weft.rate_limit_middleware`.

Theory of operation (times in nanoseconds of CLOCK_MONOTONIC, which every process of a host
shares):

* **Token bucket = GCRA** (the Generic Cell Rate Algorithm of ATM, as redis-cell uses it). A
  key's state is its *theoretical arrival time* TAT. With emission interval T = per / count and
  tolerance τ = burst x T, a request at `now` is admitted when ``max(TAT, now) - now <= τ``, and
  then ``TAT = max(TAT, now) + T``. A fresh key admits 1 + burst requests at once, then one per
  T: over d seconds, ``1 + burst + count x d / per`` requests. Refused, it learns exactly when
  the next request would be admitted: ``max(TAT, now) - now - τ`` (Retry-After), and how many it
  may still send now (``RateLimit``'s remaining): ``(τ + T - (TAT' - now)) // T``.
* **Leaky bucket = nginx limit_req.** The same word: a request's slot is ``max(TAT, now)``, and
  it waits until then (``delay``), unless more than ``queue`` slots are already taken ahead
  of it (``max(TAT, now) - now > queue x T``: refused). ``nodelay`` admits a queued request at
  once but still takes its slot, so the next ones wait or are refused as if it had waited.
* **One CAS per decision**: load the word, decide, CAS the new TAT; a lost race decides again
  on the newer word. A refused request writes nothing. No lock, no system call.
* **Keys** live in the shared keyed table (one value word: the TAT), found by a per-worker
  cache of ``key -> entry`` checked with one load (an entry can be evicted and reused under
  us), else by `KeyedTable.find_or_insert`. A key whose TAT is in the past is a full bucket,
  the same as no entry at all, so entries idle for longer than any limit takes to refill are
  evicted (`sweep`) without changing a decision. A table with no room for a new key answers
  None: the middleware counts it and applies ``on_full``.
"""

from __future__ import annotations

import math
import mmap
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from weft.schema import RateLimit
from weft.shm.atomics import Atomics
from weft.shm.table import KeyedTable, key_hash

__all__ = [
    "CAS_TRIES",
    "SharedLimiter",
    "Verdict",
    "leaky_bucket",
    "policy_field",
    "private_table",
    "ratelimit_field",
    "refill_ns",
    "retry_after_seconds",
    "sweep_idle_ns",
    "token_bucket",
]

NS = 1_000_000_000
CAS_TRIES = 64  # lost races before a decision gives up (and admits): never reached in practice
_CACHE_MAX = 4096  # keys a worker remembers the entry of


class Verdict(NamedTuple):
    admit: bool
    tat: int  # the word to write (the old one when refused)
    delay_ns: int  # leaky bucket: how long the request waits for its slot
    retry_after_ns: int  # refused: until the next request would be admitted
    remaining: int  # requests that could still go now
    reset_ns: int  # until the bucket is back to full


def token_bucket(tat: int, now: int, interval: int, burst: int) -> Verdict:
    """The GCRA decision (see the module docstring)."""
    tau = burst * interval
    t = tat if tat > now else now
    wait = t - now
    if wait > tau:
        return Verdict(False, tat, 0, wait - tau, 0, wait)
    new = t + interval
    return Verdict(True, new, 0, 0, (tau + interval - (new - now)) // interval, new - now)


def leaky_bucket(tat: int, now: int, interval: int, queue: int, nodelay: bool) -> Verdict:
    """nginx limit_req's decision (see the module docstring)."""
    t = tat if tat > now else now
    wait = t - now
    room = queue * interval
    if wait > room:
        return Verdict(False, tat, 0, wait - room, 0, wait)
    new = t + interval
    delay = 0 if nodelay else wait
    return Verdict(True, new, delay, 0, (room + interval - (new - now)) // interval, new - now)


def decide(limit: RateLimit, tat: int, now: int) -> Verdict:
    if limit.algorithm == "leaky_bucket":
        return leaky_bucket(tat, now, limit.interval_ns, limit.queue, limit.nodelay)
    return token_bucket(tat, now, limit.interval_ns, limit.burst)


def refill_ns(limit: RateLimit) -> int:
    """How long a bucket of `limit` takes to go from empty to full: a key unused for longer is
    the same as a fresh one."""
    extra = limit.queue if limit.algorithm == "leaky_bucket" else limit.burst
    return (extra + 1) * limit.interval_ns


def retry_after_seconds(ns: int) -> int:
    """Retry-After in whole seconds, rounded up (at least 1: 0 would invite a retry storm)."""
    return max(1, math.ceil(ns / NS))


def policy_field(names: Sequence[str], limits: Sequence[RateLimit]) -> bytes:
    """``RateLimit-Policy`` (draft-ietf-httpapi-ratelimit-headers): one item per limit, the
    quota per window in ``q``/``w`` and weft's own burst or queue as a prefixed parameter."""
    items = []
    for name, limit in zip(names, limits, strict=True):
        w = max(1, round(limit.per))
        extra = (
            f";weft-queue={limit.queue}"
            if limit.algorithm == "leaky_bucket"
            else f";weft-burst={limit.burst}"
        )
        items.append(f'"{name}";q={limit.count};w={w}{extra}')
    return ", ".join(items).encode()


def ratelimit_field(name: str, verdict: Verdict) -> bytes:
    """``RateLimit`` for the limit with the least remaining: remaining requests and the
    seconds until the bucket is full again."""
    return f'"{name}";r={max(0, verdict.remaining)};t={math.ceil(verdict.reset_ns / NS)}'.encode()


class SharedLimiter:
    """The decisions of one worker over the instance's shared key table (or a private one)."""

    def __init__(self, table: KeyedTable, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.table = table
        self.clock_ns = clock_ns
        a = table.atomics
        self._load = a.load
        self._cas = a.cas
        self._store = a.store
        # key -> (entry index, key hash, key word, used word, value word): see `_entry`
        self._cache: dict[bytes, tuple[int, int, int, int, int]] = {}
        #: decisions that found no entry (the table full), since the worker started
        self.full = 0

    def _entry(self, key: bytes, now: int) -> tuple[int, int, int, int, int] | None:
        """(index, key hash, key word, used word, value word) of `key`'s entry, inserting it;
        None when the table has no room. A remembered entry is checked with one load: it may
        have been evicted and reused since."""
        e = self._cache.get(key)
        if e is not None and self._load(e[2]) == e[1]:
            return e
        table = self.table
        index = table.find_or_insert(key, now)
        if index is None:
            self.full += 1
            return None
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        e = (index, key_hash(key), *table.addresses(index))
        self._cache[key] = e
        return e

    def decide(self, key: bytes, limit: RateLimit) -> Verdict | None:
        """Decide one request of `key` under `limit`; None when the table has no room."""
        now = self.clock_ns()
        e = self._entry(key, now)
        if e is None:
            return None
        addr = e[4]
        load, cas = self._load, self._cas
        verdict = None
        for _ in range(CAS_TRIES):
            tat = load(addr)
            verdict = decide(limit, tat, now)
            if not verdict.admit or cas(addr, tat, verdict.tat):
                break
        self._store(e[3], now)  # last used: keeps the entry from the idle sweep
        return verdict

    def blocked_for(self, key: bytes) -> int:
        """Nanoseconds `key` is still known to be over its limit (0: not known), from the
        Redis backend's refusals (`block`); one lookup, no insert."""
        e = self._cache.get(key)
        if e is not None and self._load(e[2]) == e[1]:
            addr = e[4]
        else:
            index = self.table.find(key)
            if index is None:
                return 0
            addr = self.table.value_offset(index, 0)
        left = self._load(addr) - self.clock_ns()
        return left if left > 0 else 0

    def block(self, key: bytes, ns: int) -> None:
        """Remember that `key` is over its limit for `ns` more nanoseconds (every worker
        refuses it without asking the backend until then)."""
        now = self.clock_ns()
        e = self._entry(key, now)
        if e is None:
            return  # a full table: the next request asks the backend again
        addr = e[4]
        until = now + ns
        for _ in range(CAS_TRIES):
            old = self._load(addr)
            if old >= until or self._cas(addr, old, until):
                return

    def sweep(self, idle_ns: int) -> int:
        """Evict entries unused for `idle_ns` (longer than any configured bucket takes to
        refill, so no decision changes); returns how many."""
        self._cache.clear()
        return self.table.evict_idle(self.clock_ns() - idle_ns)


def private_table(capacity: int = 4096) -> KeyedTable:
    """A key table of this process alone, in an anonymous mapping (no supervisor: one
    in-process worker, tests); the mapping lives as long as the table."""
    return KeyedTable(Atomics(mmap.mmap(-1, KeyedTable.size_for(capacity, 1))), 0, capacity, 1)


def sweep_idle_ns(limits: Sequence[RateLimit]) -> int:
    """How long a key must stay unused before `SharedLimiter.sweep` may evict it: longer than
    the slowest configured bucket takes to refill, plus a minute."""
    return max((refill_ns(x) for x in limits), default=0) + 60 * NS
