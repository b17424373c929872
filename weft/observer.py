"""The shared-memory layer of health, outlier ejection and the circuit breaker, per destination.

`weft.health`, `weft.outlier` and `weft.adaptive` decide; this module is the one small layer
that loads their words from the instance's endpoint records (`weft.shm.endpoints`), asks them,
and compare-and-swaps the answer back. Every worker builds one `DestinationObserver` per
observed destination over the same records, so 8 workers see one health state, one ejection and
one breaker per endpoint, and the forwarder (`weft.forward`) asks it three things:

* `excluded()` before each pick: the endpoints balancing must skip now. Unhealthy and ejected
  ones (unless the destination is in panic, `weft.health.excluded`), then every endpoint whose
  breaker refuses calls (OPEN within its time, or HALF_OPEN with the trial out). Panic does not
  override a breaker: an open breaker means "do not call", not "probably down".
* `admit(i)` after a pick: ``0`` go, ``-1`` this call is the endpoint's half-open trial (claimed
  by CAS on the shared trial word: exactly one across all workers), or a positive Retry-After
  when the breaker refuses it (the pick raced a trip; the forwarder picks again without it).
* `report(i, result, status, latency, degraded, trial=)` after each attempt's head phase:
  counts the call in the breaker's window (trips it), ends the trial when the attempt was the
  trial (closes or reopens the breaker, then frees the trial word; the forwarder says which
  attempt it was, since calls sent before the breaker opened may end while the trial is
  out), extends or ends the outlier runs (ejects), and marks an endpoint Degraded when its
  answer carried the degraded header.

The prober (`weft.prober`) uses `take_lease` and `apply_probe`; admin, status and metrics read
`snapshot` (`observed_states`: every endpoint the supervisor publishes). Metrics count what
happens through `on_event`: breaker transitions and ejections, in the worker that made them.
What a call costs: `excluded` loads two or three words per endpoint, `admit` one word in the
closed state, `report` one CAS on the window bucket of now (and more only when a call failed).
No lock, no syscall: the clock is CLOCK_MONOTONIC through the vDSO.

A call that counts as *failed* for the breaker is any result but ``ok`` (`weft.outcome`): a 5xx
answer or a failure of the exchange. 4xx answers are the client's business and count as
successes, as Envoy and resilience4j count them.

Slow start (``outlier.slow_start``): a returning endpoint (its ejection ended, or it came back
from Unhealthy: the prober stamps that moment in the outlier word) is left out of a pick's
candidates with probability 1 - `slow_start_factor`, the factor ramping linearly from 10 % to
1 over the window. This is Envoy's slow-start weight applied to the candidate set, so it works
the same under every balancing strategy (round robin keeps its even split of the rest: the
schedule without the endpoint is used at the same shared position) instead of needing a weight
table per strategy.
"""

from __future__ import annotations

import mmap
import random
import time
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

from weft import adaptive, health, outlier
from weft.outcome import OK
from weft.schema import Destination, OutlierConfig
from weft.shm.atomics import WORD, Atomics
from weft.shm.endpoints import BREAKER, HEALTH, LEASE, OUTLIER, TRIAL, WINDOW, EndpointTable

__all__ = ["DestinationObserver", "LocalRecords", "monotonic_ms", "observed_states", "snapshot"]

# A CAS loop gives up after this many lost races: the words are contended by at most a few
# workers, so this is never reached in practice, and losing one count beats spinning.
CAS_TRIES = 64

# Callbacks for metrics: (destination, endpoint index, what, new state name).
Event = Callable[[str, int, str, str], None]


def monotonic_ms() -> int:
    """CLOCK_MONOTONIC in milliseconds: shared by every process of the host (unlike trio's
    clock), which the shared words' times need."""
    return time.monotonic_ns() // 1_000_000


class DestinationObserver:
    """Health, ejection and breaker of one destination's endpoints, in shared memory."""

    def __init__(
        self,
        dest: Destination,
        table: EndpointTable,
        columns: Sequence[int],
        *,
        pid: int,
        clock_ms: Callable[[], int] = monotonic_ms,
        rng: Callable[[], float] = random.random,
        on_event: Event | None = None,
    ) -> None:
        if len(columns) != len(dest.endpoints):
            raise ValueError(f"{dest.name}: {len(columns)} columns for {len(dest.endpoints)}")
        self.dest = dest
        self.name = dest.name
        self.table = table
        self.columns = list(columns)
        self.n = len(columns)
        self.pid = pid
        self.clock_ms = clock_ms
        self.rng = rng
        self.on_event = on_event
        a = table.atomics
        self._load = a.load
        self._cas = a.cas
        addr = table.address
        self._health = [addr(c, HEALTH) for c in columns]
        self._lease = [addr(c, LEASE) for c in columns]
        self._outlier = [addr(c, OUTLIER) for c in columns]
        self._breaker = [addr(c, BREAKER) for c in columns]
        self._trial = [addr(c, TRIAL) for c in columns]
        self._window = [addr(c, WINDOW) for c in columns]
        self.health_cfg = dest.health
        self.outlier_cfg = dest.outlier
        self.breaker_cfg = dest.breaker
        # Panic is a destination property (Envoy's healthy_panic_threshold, default 50 %) that
        # the contract places under [outlier]; without that section its default applies.
        self.panic = (dest.outlier or OutlierConfig()).panic_threshold
        self.health_or_outlier = dest.health is not None or dest.outlier is not None
        self.degraded_header = dest.health.degraded_header.encode() if dest.health else None
        self.slow_start = dest.outlier.slow_start if dest.outlier else 0.0
        b = dest.breaker
        self._window_ms = round(b.window * 1000) if b else 0
        self._slice_ms = max(1, self._window_ms // adaptive.BUCKETS)
        # Endpoints whose half-open trial this process holds (claimed in `admit`).
        self.trials: set[int] = set()

    # -- the pick -----------------------------------------------------------------------------

    def excluded(self) -> Container[int]:
        """Indices balancing must skip now (see the module docstring)."""
        load = self._load
        now = 0
        out: Container[int] = ()
        if self.health_or_outlier:
            # The common case first: every endpoint Healthy and none ever ejected (outlier
            # words below 2**24 hold no ejection end): nothing to skip, no clock read.
            words = [load(h) & 3 for h in self._health]
            outliers = [load(o) for o in self._outlier] if self.outlier_cfg is not None else ()
            if any(words) or any(w >> 24 for w in outliers):
                if outliers:
                    now = self.clock_ms()
                    ejected = [outlier.is_ejected(w, now) for w in outliers]
                else:
                    ejected = [False] * self.n
                out = health.excluded([health.STATES[w] for w in words], ejected, self.panic)
                if self.slow_start:
                    out = self._slow_start(out, outliers, now)
        b = self.breaker_cfg
        if b is not None:
            extra = None
            for i, addr in enumerate(self._breaker):
                word = load(addr)
                if not word & 3:
                    continue  # CLOSED
                if not now:
                    now = self.clock_ms()
                decision = adaptive.admit(word, now, b.open_for, b.max_open_for).decision
                if decision is adaptive.REJECT or (
                    decision is adaptive.TRIAL
                    and word & 3 == adaptive.HALF_OPEN.code
                    and load(self._trial[i])
                ):
                    if extra is None:
                        extra = set(out)
                    extra.add(i)
            if extra is not None:
                out = extra
        return out

    def admit(self, i: int) -> int:
        """0: call endpoint `i`; -1: call it as the breaker's trial (now held by this
        process: `report` or `abandon` must follow); n > 0: refused, Retry-After n seconds."""
        b = self.breaker_cfg
        if b is None:
            return 0
        addr = self._breaker[i]
        word = self._load(addr)
        if not word & 3:
            return 0
        now = self.clock_ms()
        a = adaptive.admit(word, now, b.open_for, b.max_open_for)
        if a.decision is adaptive.REJECT:
            return a.retry_after
        if a.decision is adaptive.ALLOW:
            return 0
        if a.word is not None and self._cas(addr, word, a.word):
            self._event(i, "breaker", adaptive.HALF_OPEN.name)
        if not self._cas(self._trial[i], 0, self.pid):
            return 1  # another call is the trial
        # Claimed. The breaker may have moved on between our load and the claim (a trial
        # that just ended wrote its state, then freed the word we took): look again.
        state = adaptive.unpack(self._load(addr)).state
        if state is adaptive.HALF_OPEN:
            self.trials.add(i)
            return -1
        self._cas(self._trial[i], self.pid, 0)
        if state is adaptive.CLOSED:
            return 0
        again = adaptive.admit(self._load(addr), now, b.open_for, b.max_open_for)
        return again.retry_after if again.decision is adaptive.REJECT else 1

    def breaker_retry_after(self) -> int:
        """Seconds until the first open breaker of the destination admits a call (its
        Retry-After); 0 when no breaker is open."""
        b = self.breaker_cfg
        if b is None:
            return 0
        now = self.clock_ms()
        waits = []
        for addr in self._breaker:
            word = self._load(addr)
            if word & 3:
                a = adaptive.admit(word, now, b.open_for, b.max_open_for)
                waits.append(a.retry_after or 1)
        return min(waits, default=0)

    def slow_start_factor(self, i: int) -> float:
        """The share of picks endpoint `i` keeps now (1 outside slow start)."""
        if not self.slow_start:
            return 1.0
        return outlier.slow_start(
            1.0, self._load(self._outlier[i]), self.clock_ms(), self.slow_start
        )

    def _slow_start(self, out: Container[int], outliers: Sequence[int], now: int) -> Container[int]:
        """`out` plus each endpoint in slow start with probability 1 - its factor, so that it
        gets that share of the picks it would get; never the last endpoint left."""
        extra: set[int] | None = None
        for i, word in enumerate(outliers):
            f = outlier.slow_start(1.0, word, now, self.slow_start)
            if f >= 1.0 or i in out or self.rng() < f:
                continue
            if extra is None:
                extra = set(out)
            if len(extra) + 1 < self.n:
                extra.add(i)
        return out if extra is None else extra

    # -- what traffic says ----------------------------------------------------------------------

    def report(
        self,
        i: int,
        result: str,
        status: int,
        latency: float,
        degraded: bool = False,
        *,
        trial: bool = False,
    ) -> None:
        """One attempt at endpoint `i` ended its head phase (`weft.outcome.Observer`).
        `trial`: this attempt is the half-open trial `admit` gave this process. Only it ends
        the trial: another call to `i` that ends meanwhile in this process was sent before
        the breaker opened, and its answer says nothing of the endpoint now."""
        failed = result != OK
        now = 0
        if self.breaker_cfg is not None:
            now = self.clock_ms()
            if trial and i in self.trials:
                self._end_trial(i, failed, now)
            else:
                self._count_call(i, failed, now)
        if self.outlier_cfg is not None and (failed or self._load(self._outlier[i]) & 0xFFFF):
            # (a success with no run going changes nothing: one load)
            self._observe_outlier(i, result, status, now or self.clock_ms())
        if degraded and self.health_cfg is not None:
            self._health_event(i, health.TRAFFIC_DEGRADED)

    def abandon(self, i: int) -> None:
        """A trial call ended without a result of the endpoint's (the client left, the pool
        was full): free the trial so that the next call is the trial."""
        if i in self.trials:
            self.trials.discard(i)
            self._cas(self._trial[i], self.pid, 0)

    def _count_call(self, i: int, failed: bool, now: int) -> None:
        b = self.breaker_cfg
        assert b is not None
        window_ms = self._window_ms
        epoch = now // self._slice_ms  # adaptive.bucket_epoch, without the call
        bucket = self._window[i] + (epoch % adaptive.BUCKETS) * WORD
        load, cas = self._load, self._cas
        for _ in range(CAS_TRIES):
            old = load(bucket)
            if cas(bucket, old, adaptive.record(old, epoch, failed)):
                break
        if not failed:
            return
        addr = self._breaker[i]
        word = load(addr)
        state, _trips, since = adaptive.unpack(word)
        if state is not adaptive.CLOSED:
            return
        base = self._window[i]
        buckets = [load(base + k * WORD) for k in range(adaptive.BUCKETS)]
        calls, failures = adaptive.window_totals(buckets, now, window_ms, since)
        new = adaptive.on_result(
            word,
            failed=True,
            trial=False,
            calls=calls,
            failures=failures,
            now_ms=now,
            failure_rate=b.failure_rate,
            minimum_calls=b.minimum_calls,
        )
        if new is not None and cas(addr, word, new):
            self._event(i, "breaker", adaptive.OPEN.name)

    def _end_trial(self, i: int, failed: bool, now: int) -> None:
        self.trials.discard(i)
        addr = self._breaker[i]
        load, cas = self._load, self._cas
        for _ in range(CAS_TRIES):
            word = load(addr)
            new = adaptive.on_result(
                word,
                failed=failed,
                trial=True,
                calls=0,
                failures=0,
                now_ms=now,
                failure_rate=0,
                minimum_calls=0,
            )
            if new is None or cas(addr, word, new):
                if new is not None:
                    self._event(i, "breaker", adaptive.unpack(new).state.name)
                break
        # The state is written first, then the trial freed: no second trial in this period.
        cas(self._trial[i], self.pid, 0)

    def _observe_outlier(self, i: int, result: str, status: int, now: int) -> None:
        o = self.outlier_cfg
        assert o is not None
        addr = self._outlier[i]
        load, cas = self._load, self._cas
        for _ in range(CAS_TRIES):
            word = load(addr)
            if outlier.is_ejected(word, now):
                return  # a panic pick or a late answer: the ejection already says it all
            new, due = outlier.observe(
                word,
                result,
                status,
                consecutive_5xx=o.consecutive_5xx,
                consecutive_gateway=o.consecutive_gateway_errors,
            )
            if due:
                ejected = outlier.ejected_count([load(a) for a in self._outlier], now)
                if outlier.can_eject(ejected, self.n, o.max_ejection_percent):
                    new = outlier.eject(
                        new, now, base_ejection=o.base_ejection, max_ejection=o.max_ejection
                    )
                else:
                    due = False  # keep the run: it ejects once another endpoint returns
            if new == word or cas(addr, word, new):
                if due:
                    self._event(i, "ejection", "EJECTED")
                return

    def _health_event(self, i: int, event: health.Event) -> tuple[health.State, health.State]:
        hc = self.health_cfg
        healthy_t = hc.healthy_threshold if hc else 1
        unhealthy_t = hc.unhealthy_threshold if hc else 1
        addr = self._health[i]
        load, cas = self._load, self._cas
        for _ in range(CAS_TRIES):
            word = load(addr)
            new = health.step(word, event, healthy_t, unhealthy_t)
            if new == word or cas(addr, word, new):
                break
        else:
            return health.STATES[word & 3], health.STATES[word & 3]
        old_state, new_state = health.STATES[word & 3], health.STATES[new & 3]
        if new_state is not old_state:
            self._event(i, "health", new_state.name)
        return old_state, new_state

    # -- the prober's side ----------------------------------------------------------------------

    def take_lease(self, i: int, ttl_ms: int) -> bool:
        """Take or renew endpoint `i`'s prober lease for this process until now + `ttl_ms`."""
        addr = self._lease[i]
        word = self._load(addr)
        new = health.lease(word, self.pid, self.clock_ms(), ttl_ms)
        return new is not None and self._cas(addr, word, new)

    def drop_lease(self, i: int) -> None:
        """Give the lease up (the worker is draining): another worker takes it at once."""
        addr = self._lease[i]
        word = self._load(addr)
        if health.lease_owner(word) == self.pid:
            self._cas(addr, word, 0)

    def apply_probe(self, i: int, event: health.Event) -> tuple[health.State, health.State]:
        """Write a probe's result; returns (old state, new state). An endpoint that comes back
        from Unhealthy has the moment stamped in its outlier word, where slow start reads it."""
        old, new = self._health_event(i, event)
        if old is health.UNHEALTHY and new is not health.UNHEALTHY:
            addr = self._outlier[i]
            now = self.clock_ms()
            for _ in range(CAS_TRIES):
                word = self._load(addr)
                _r5, _rg, n, until = outlier.unpack(word)
                if until > now or self._cas(addr, word, outlier.pack(0, 0, n, now)):
                    break
        return old, new

    def health_word(self, i: int) -> int:
        return self._load(self._health[i])

    def _event(self, i: int, what: str, state: str) -> None:
        if self.on_event is not None:
            self.on_event(self.name, i, what, state)


class LocalRecords:
    """Endpoint records of one process (no supervisor: one in-process worker, tests), in an
    anonymous mapping laid out as the shared segment's are."""

    CAPACITY = 4096  # endpoints; 512 KiB of records

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._map = mmap.mmap(-1, EndpointTable.size_for(capacity))
        self.table = EndpointTable(Atomics(self._map), 0, capacity)
        self._next = 0

    def columns(self, n: int) -> list[int]:
        if self._next + n > self.table.columns:
            raise ValueError(f"more than {self.table.columns} observed endpoints")
        first, self._next = self._next, self._next + n
        return list(range(first, first + n))


def snapshot(table: EndpointTable, column: int, now_ms: int) -> dict[str, Any]:
    """What one endpoint record says now, for /status, `weft status` and the metrics."""
    h = health.unpack(table.load(column, HEALTH))
    lease = table.load(column, LEASE)
    o = outlier.unpack(table.load(column, OUTLIER))
    b = adaptive.unpack(table.load(column, BREAKER))
    lease_pid = health.lease_owner(lease)
    lease_left = (lease & ((1 << 40) - 1)) - now_ms
    return {
        "health": h.state.name.lower(),
        "ejected": now_ms < o.until_ms,
        "ejected_for_s": max(0.0, (o.until_ms - now_ms) / 1000),
        "ejections": o.ejections,
        "breaker": b.state.name.lower(),
        "breaker_trips": b.trips,
        "trial_pid": table.load(column, TRIAL),
        "prober_pid": lease_pid if lease_pid and lease_left > 0 else 0,
    }


def observed_states(
    table: EndpointTable, observed: Mapping[str, Mapping[str, Any]], now_ms: int
) -> dict[str, dict[str, Any]]:
    """`snapshot` of every endpoint in `observed` (the state file's ``observed``, written by
    `weft.workers.shared.observed_columns`): the same mapping, with each endpoint's column
    replaced by its snapshot. A column outside `table` (a state file that does not belong to
    this segment) is left out rather than read."""
    out: dict[str, dict[str, Any]] = {}
    for dest, info in observed.items():
        eps = {
            ep: snapshot(table, column, now_ms)
            for ep, column in info.get("endpoints", {}).items()
            if isinstance(column, int) and 0 <= column < table.columns
        }
        out[dest] = {**info, "endpoints": eps}
    return out
