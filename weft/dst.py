"""Destinations: which endpoint of a destination serves the next request.

This module owns the choice and nothing else: no I/O, no clock. The forwarder says which endpoints
are unusable right now (`excluded`: Unhealthy, breaker open) and how busy each is (`inflight`);
`Balancer.pick` answers with an endpoint index, or None. `HashKeySource` turns a configured
hash-key spec into one request's key bytes.

Strategies (`STRATEGIES`, built by `make_balancer`):

- ``weighted``: nginx's smooth weighted round robin (`ngx_http_upstream_get_peer` in
  ngx_http_upstream_round_robin.c): each pick adds every candidate's weight to its score, takes the
  highest (first on ties) and subtracts the candidates' total from it. 5/1/1 gives a a b a c a a,
  interleaved, not bursty. The sequence is periodic (period = the sum of the weights over their
  gcd), so it is computed once (`smooth_wrr_schedule`) and a pick is ``schedule[position % len]``
  with one `Position.advance`. The position is what workers share (an atomic fetch-add on a
  shared-memory word, `weft.workers.shared`): N workers then follow *one* sequence, and any 5
  consecutive requests to a 3/1/1 destination split 3/1/1, whichever workers serve them. With
  endpoints excluded, the schedule of the remaining ones (cached per excluded set) is used with
  the same position, so the others keep their proportions exactly.
- ``round_robin``: the same with equal weights: the schedule is 0, 1, ..., n-1, skipping excluded
  indices, and the position is shared the same way. A worker's own position (no shared one:
  unsupervised, tests) starts at a random index so that workers built at one reload do not all
  send their first request to 0.
- ``least_conn``: power of two choices (Mitzenmacher, IEEE TPDS 2001): of two distinct random
  candidates the lower inflight/weight wins, the first on ties. O(1), and no herd onto the one
  global minimum that every worker would otherwise see.
- ``consistent_hash``: Maglev (Eisenbud et al., NSDI 2016, section 3.4). Each endpoint walks its own
  permutation of a prime-sized table, derived from a hash of its identity, claiming free slots in
  turns; heavier endpoints get proportionally more turns. A key's slot is a blake2b hash of it
  (unlike `hash()`, stable across processes and runs, so all workers and restarts agree). From the
  key's slot, two rules walk forward, so keys of healthy, unloaded endpoints never move:
    * an excluded endpoint's keys go to the next slot whose endpoint is not excluded;
    * bounded load (Mirrokni, Thorup, Zadimoghaddam, SODA 2018): with ``balance_factor`` c > 0 an
      endpoint is full when inflight + 1 > ceil(c * (sum(inflight) + 1) * weight / W), W the
      candidates' total weight: the paper's ceil(c * load / n) with capacity shared by weight.
  A request without a key (None) falls back to round robin.

An endpoint's identity for the hash is its index unless `make_balancer` gets ``names``; pass the
endpoint addresses so that removing or reordering endpoints moves only the changed ones' keys.
"""

from __future__ import annotations

import hashlib
import math
import random
from abc import ABC, abstractmethod
from array import array
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "STRATEGIES",
    "Balancer",
    "HashKeySource",
    "LocalPosition",
    "Position",
    "make_balancer",
    "smooth_wrr_schedule",
]

STRATEGIES = ("round_robin", "weighted", "least_conn", "consistent_hash")

# Maglev table size: a prime, so that every skip in 1..M-1 walks the whole table. The paper
# (section 3.4) takes M > 100 * n so that endpoints' shares differ by at most 1%, and a larger M
# also keeps the keys moved by a change near the 1/n minimum.
# Measured (CPython 3.11 on a busy 2-CPU box; 50k keys; n=100 -> 101 endpoints moves 1.0% at best):
# M=5003 moves 3.6%, builds in 4 ms; M=20011 2.1%, 17 ms; M=65537 1.45%, 60-110 ms for n=10..100
# (n=10 -> 11 moves 9.3% against 9.1%). A build happens once per (re)load, so the larger table
# wins; stored as array('H') it costs 128 KB per consistent_hash destination per worker.
MAGLEV_TABLE_SIZE = 65537

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class Balancer(ABC):
    """Chooses an endpoint index for each request; one instance per destination per worker."""

    __slots__ = ()

    @abstractmethod
    def pick(
        self,
        *,
        key: bytes | None = None,
        inflight: Sequence[int] = (),
        excluded: Container[int] = (),
    ) -> int | None:
        """Return the index of the chosen endpoint, or None when every endpoint is excluded.

        Args:
            key: the request's hash key (consistent_hash only; None falls back to round robin).
            inflight: current in-flight requests per endpoint index; empty means all zero.
            excluded: indices that must never be chosen (Unhealthy, breaker open, tried
                already); membership is tested per step, so pass a set.
        """


# Longest schedule precomputed (entries = sum of weights / gcd). Building one costs n steps per
# entry, once per (re)load: measured 0.05 s for 65544 entries over 16 endpoints, 0.19 s for
# 62920 over 65 (CPython 3.11). Longer ones (many endpoints with large coprime weights) keep a
# per-worker smooth WRR instead (`SmoothWeighted`): its split holds per worker only.
SCHEDULE_MAX = 1 << 16
# Schedules kept for distinct excluded sets; a handful exist at once (a few endpoints down).
EXCLUDED_SCHEDULES_MAX = 32


class Position(Protocol):
    """Where a destination is in its schedule. Shared across workers or a worker's own."""

    def advance(self) -> int:
        """Return the position and move it on by one (one atomic step when shared)."""
        ...


class LocalPosition:
    """A `Position` for one process: a plain counter."""

    __slots__ = ("_next",)

    def __init__(self, start: int = 0) -> None:
        self._next = start

    def advance(self) -> int:
        n = self._next
        self._next = n + 1
        return n


def smooth_wrr_schedule(weights: Sequence[int], excluded: Container[int] = ()) -> list[int]:
    """One period of nginx's smooth weighted round robin over `weights` (see the module
    docstring), excluded indices left out: sum(weights) / gcd(weights) entries, each an
    endpoint index, endpoint i appearing weights[i] / gcd times. Empty when all are excluded.
    """
    live = [(i, w) for i, w in enumerate(weights) if not (excluded and i in excluded)]
    if not live:
        return []
    g = math.gcd(*(w for _, w in live))
    live = [(i, w // g) for i, w in live]
    total = sum(w for _, w in live)
    current = [0] * len(live)
    schedule = []
    for _ in range(total):
        best = 0
        for k, (_, w) in enumerate(live):
            current[k] += w
            if current[k] > current[best]:
                best = k
        current[best] -= total
        schedule.append(live[best][0])
    return schedule


class Scheduled(Balancer):
    """Round robin and smooth WRR as a precomputed schedule and a (shared) position."""

    __slots__ = ("_by_excluded", "_n", "_position", "_schedule", "_weights")

    def __init__(self, weights: Sequence[int], position: Position) -> None:
        self._weights = tuple(weights)
        self._n = len(weights)
        self._schedule = smooth_wrr_schedule(self._weights)
        self._position = position
        self._by_excluded: dict[tuple[int, ...], list[int]] = {}

    def pick(
        self,
        *,
        key: bytes | None = None,
        inflight: Sequence[int] = (),
        excluded: Container[int] = (),
    ) -> int | None:
        schedule = self._schedule
        if excluded:
            out = tuple(i for i in range(self._n) if i in excluded)
            if out:
                schedule = self._without(out)
                if not schedule:
                    return None
        return schedule[self._position.advance() % len(schedule)]

    def _without(self, out: tuple[int, ...]) -> list[int]:
        schedule = self._by_excluded.get(out)
        if schedule is None:
            if len(self._by_excluded) >= EXCLUDED_SCHEDULES_MAX:
                self._by_excluded.clear()
            schedule = smooth_wrr_schedule(self._weights, frozenset(out))
            self._by_excluded[out] = schedule
        return schedule


class SmoothWeighted(Balancer):
    """Smooth WRR with a worker's own scores: for weights whose schedule would be longer than
    `SCHEDULE_MAX`. Each worker follows its own sequence (the split holds per worker)."""

    __slots__ = ("_current", "_weights")

    def __init__(self, weights: Sequence[int]) -> None:
        self._weights = tuple(weights)
        self._current = [0] * len(weights)

    def pick(
        self,
        *,
        key: bytes | None = None,
        inflight: Sequence[int] = (),
        excluded: Container[int] = (),
    ) -> int | None:
        current = self._current
        best = -1
        best_score = 0
        total = 0
        for i, w in enumerate(self._weights):
            if excluded and i in excluded:
                continue
            score = current[i] + w
            current[i] = score
            total += w
            if best < 0 or score > best_score:
                best, best_score = i, score
        if best < 0:
            return None
        current[best] = best_score - total
        return best


class LeastConn(Balancer):
    __slots__ = ("_all", "_rng", "_weights")

    def __init__(self, weights: Sequence[int], rng: random.Random) -> None:
        self._weights = tuple(weights)
        self._all = range(len(weights))
        self._rng = rng

    def pick(
        self,
        *,
        key: bytes | None = None,
        inflight: Sequence[int] = (),
        excluded: Container[int] = (),
    ) -> int | None:
        # The common case (nothing excluded) indexes a range: no list built per request.
        candidates = [i for i in self._all if i not in excluded] if excluded else self._all
        m = len(candidates)
        if m < 2:
            return candidates[0] if m else None
        randrange = self._rng.randrange
        a = randrange(m)
        b = randrange(m - 1)  # shifted past a: two distinct picks from two draws, no retry loop
        a, b = candidates[a], candidates[b + 1 if b >= a else b]
        if not inflight:
            return a
        w = self._weights
        # inflight[b]/w[b] < inflight[a]/w[a], cross-multiplied: exact on ints, no division.
        return b if inflight[b] * w[a] < inflight[a] * w[b] else a


class Maglev(Balancer):
    __slots__ = ("_balance_factor", "_fallback", "_n", "_table", "_total_weight", "_weights")

    def __init__(
        self,
        weights: Sequence[int],
        ids: Sequence[bytes],
        balance_factor: float,
        rng: random.Random,
    ) -> None:
        self._weights = tuple(weights)
        self._n = len(weights)
        self._total_weight = sum(weights)
        self._balance_factor = balance_factor
        self._fallback = Scheduled([1] * len(weights), LocalPosition(rng.randrange(len(weights))))
        # Unsigned 16-bit entries: a quarter of a list's memory, ~30 ns slower per lookup, which
        # is small beside the ~1.4 us (measured) spent hashing the key.
        self._table = array("H", build_maglev_table(weights, ids, MAGLEV_TABLE_SIZE))

    def pick(
        self,
        *,
        key: bytes | None = None,
        inflight: Sequence[int] = (),
        excluded: Container[int] = (),
    ) -> int | None:
        if key is None:
            return self._fallback.pick(excluded=excluded)
        table = self._table
        size = len(table)
        slot = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % size
        bounded = self._balance_factor > 0 and len(inflight) > 0
        if not excluded:
            if not bounded:
                return table[slot]
        elif all(i in excluded for i in range(self._n)):
            return None  # checked first so that the walk below always finds a candidate
        weights = self._weights
        scale = 0.0
        if bounded:
            # Summing is O(n) in C; the caller's counts change per request, so no running total.
            cand_weight = self._total_weight
            if excluded:
                cand_weight -= sum(w for i, w in enumerate(weights) if i in excluded)
            scale = self._balance_factor * (sum(inflight) + 1) / cand_weight
        first_candidate = None
        for _ in range(size):
            e = table[slot]
            if not excluded or e not in excluded:
                if not bounded or inflight[e] + 1 <= math.ceil(scale * weights[e]):
                    return e
                if first_candidate is None:
                    first_candidate = e
            slot = slot + 1 if slot + 1 < size else 0
        # Every endpoint owns a slot and, with c >= 1, the capacities sum to more than the load, so
        # some candidate has room; only float rounding of a capacity at c == 1 can land here.
        return first_candidate


def build_maglev_table(weights: Sequence[int], ids: Sequence[bytes], size: int) -> list[int]:
    """Fill a Maglev lookup table of `size` (a prime) slots with endpoint indices.

    Endpoint i walks its own permutation (offset + j * skip) mod size, both from a hash of ids[i],
    and claims the next free slot on each of its turns. Round 1 gives each endpoint one turn, so
    every endpoint owns a slot (the lookup's forward walk relies on it). After that, turns are
    paid by credit: each round an endpoint earns its weight and spends min(weights) per turn.
    Spending max(weights) instead (one turn per round for the heaviest) costs ~M rounds of n
    steps at 1000:1 weights: measured 0.57 s against 0.02 s here for n=100.
    """
    n = len(weights)
    assert n == len(ids) and 0 < n <= size
    pos: list[int] = []
    skips: list[int] = []
    for ident in ids:
        d = hashlib.blake2b(ident, digest_size=16, person=b"weft-maglev").digest()
        pos.append(int.from_bytes(d[:8], "big") % size)
        skips.append(int.from_bytes(d[8:], "big") % (size - 1) + 1)
    table = [-1] * size
    w_min = min(weights)
    turns = [1] * n  # round 1 is one turn each, so that every endpoint owns a slot
    credit = [w - w_min for w in weights]  # what round 1 left unpaid
    left = size
    while True:
        for i in range(n):
            t = turns[i]
            c = pos[i]
            s = skips[i]
            while t:
                while table[c] >= 0:
                    c += s
                    if c >= size:
                        c -= size
                table[c] = i
                left -= 1
                if not left:
                    return table
                t -= 1
            pos[i] = c
            turns[i], credit[i] = divmod(credit[i] + weights[i], w_min)


def make_balancer(
    strategy: str,
    weights: Sequence[int],
    *,
    balance_factor: float = 1.25,
    rng: random.Random | None = None,
    names: Sequence[str] | None = None,
    position: Position | None = None,
) -> Balancer:
    """Build the balancer for one destination's endpoints (index i is weights[i]).

    Args:
        strategy: one of `STRATEGIES`.
        weights: one integer weight >= 1 per endpoint.
        balance_factor: consistent_hash's bounded-load factor c; 0 disables it. 1.25 is the
            default of liblb's bounded balancer and brpc's c_murmurhash_bl.
        rng: randomness for least_conn and round robin's start; seed it for reproducible tests.
        names: stable endpoint identities for consistent_hash (default: the indices).
        position: round_robin's and weighted's place in their schedule, shared by the workers
            (default: this balancer's own, from a random index for round_robin).

    Raises:
        ValueError: unknown strategy, no endpoints, a weight < 1, balance_factor neither 0 nor
            >= 1 (below 1 the capacities sum to less than the load), names not matching, or
            more than 65535 consistent_hash endpoints (the table stores 16-bit indices).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if not weights:
        raise ValueError("a destination needs at least one endpoint")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"endpoint {i} weight must be an integer >= 1, got {w!r}")
    if not (balance_factor == 0 or balance_factor >= 1):
        raise ValueError(f"balance_factor must be 0 (off) or >= 1, got {balance_factor!r}")
    if strategy == "consistent_hash" and len(weights) > 0xFFFF:
        raise ValueError("consistent_hash supports at most 65535 endpoints per destination")
    if names is not None and (len(names) != len(weights) or len(set(names)) != len(names)):
        raise ValueError("names must give one distinct name per endpoint")
    if rng is None:
        rng = random.Random()
    if strategy == "round_robin":
        return Scheduled([1] * len(weights), position or LocalPosition(rng.randrange(len(weights))))
    if strategy == "weighted":
        if sum(weights) // math.gcd(*weights) > SCHEDULE_MAX:
            return SmoothWeighted(weights)
        return Scheduled(weights, position or LocalPosition())
    if strategy == "least_conn":
        return LeastConn(weights, rng)
    ids = [str(i) for i in range(len(weights))] if names is None else names
    return Maglev(weights, [i.encode() for i in ids], balance_factor, rng)


@dataclass(frozen=True, slots=True)
class HashKeySource:
    """Where a request's consistent-hash key comes from: ``kind`` plus a header or cookie name."""

    kind: str  # "client_ip" | "path" | "header" | "cookie"
    name: bytes = b""

    @classmethod
    def parse(cls, spec: str) -> HashKeySource:
        """Parse ``client_ip``, ``path``, ``header:<name>`` or ``cookie:<name>``.

        Raises:
            ValueError: any other form, or a name that is not an RFC 9110 token (header names,
                and cookie names per RFC 6265 section 4.1.1).
        """
        if spec in ("client_ip", "path"):
            return cls(spec)
        kind, sep, name = spec.partition(":")
        if not sep or kind not in ("header", "cookie"):
            raise ValueError(
                f"hash key {spec!r} is not one of: client_ip, path, header:<name>, cookie:<name>"
            )
        raw = name.encode("ascii", "replace")  # a non-ASCII char becomes "?", not a tchar
        if not raw or not all(c in _TCHAR for c in raw):
            raise ValueError(f"hash key {spec!r}: {name!r} is not a valid {kind} name")
        # h11 hands us lowercased header names; browsers match cookie names case-sensitively.
        return cls(kind, raw.lower() if kind == "header" else raw)

    def extract(
        self, headers: Sequence[tuple[bytes, bytes]], client_ip: str, path: bytes
    ) -> bytes | None:
        """Return this request's key, or None when the request carries none.

        An empty value counts as absent: hashing b"" would send every such request to one
        endpoint. Repeated headers are joined with ", " (RFC 9110 section 5.3), so a client that
        splits a field still gets the same key. Of several cookies with the name, the first wins.
        """
        kind = self.kind
        if kind == "client_ip":
            return client_ip.encode() if client_ip else None
        if kind == "path":
            return path or None
        if kind == "header":
            found = None
            for name, value in headers:
                if name == self.name:
                    found = value if found is None else found + b", " + value
            return found or None
        for name, value in headers:
            if name != b"cookie":
                continue
            for pair in value.split(b";"):
                cookie_name, sep, cookie_value = pair.partition(b"=")
                if sep and cookie_name.strip() == self.name:
                    return cookie_value.strip() or None
        return None
