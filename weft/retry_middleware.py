"""``[routes.retry]`` as built-in middleware: tries, backoff, replay bodies and the shared budget.

`weft.retry` decides (which failures, how long to wait, whether the budget allows); this module
is the middleware around the rest of the route's chain that acts on it, registered in
`weft.builtins.BUILTINS`. A request, step by step:

1. It is counted in the route's budget window (shared bucket words, written `REQUEST_BATCH`
   requests at a time).
2. Its body is kept for replay if it fits ``buffer_body``: read whole before the first try (a
   client that sends ``Expect: 100-continue`` is told to go on by that read, as for any
   request whose body weft reads). A larger body is streamed as usual, after the part read to
   find out, and the request is never retried: weft no longer has what it sent.
3. Each try calls the rest of the chain; the forwarder (`weft.forward`) skips the endpoints
   tried so far when another is usable (``request.ctx["tried"]``, Envoy's previous_hosts) and
   reports the try's result word and status in ``request.ctx["result"]``.
4. A try is retried only when its result matches ``on``, tries are left, the request can be
   replayed, the wait fits in the route's deadline, and the shared budget has room. The wait
   is full-jitter backoff, or a 503's Retry-After when it is no longer than ``backoff_max``
   (a longer one ends the retries: the upstream said when to come back). The failed try's
   response is read to its end when small, so its connection is reused, else closed.
5. ``per_try_timeout`` bounds each try by moving the deadline the forwarder honours; the
   route's ``request_total`` still bounds them all.

The answer of the last try is returned. A retried request carries ``x-weft-attempts: n`` and
leaves ``attempts``, ``retries`` (the reason of each retry) and ``retry_budget_exhausted`` in
``request.ctx`` for the access log and the metrics. Results that are not the endpoint's doing
(no endpoint, open breakers, a full pool queue: ``result`` None) are never retried: another
try would meet the same answer and add load where there is none to spare.

**The budget** is per route and shared by every worker through one record of the instance's
endpoint table (`weft.shm.endpoints`, its window words; the record is keyed ``@route/<name>``
in the column map, so it survives a reload of a route that still exists). A check-then-spend
race between workers can let through one retry per worker above the budget at most; the
budget is a bound on load, not an exact count.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from weft import adaptive, retry
from weft.arena_pool import ReplayBody, keep_body
from weft.builtins import BuiltinContext, Middleware, Next, register
from weft.http.messages import Body, Request, Response
from weft.observer import CAS_TRIES, LocalRecords, monotonic_ms
from weft.schema import RetryPolicy, Route, Timeouts
from weft.shm.atomics import WORD
from weft.shm.endpoints import WINDOW, EndpointTable

__all__ = ["RetryBudget", "make_retry"]

# Requests are added to the shared budget window this many at a time (and before every retry
# decision of the worker): one CAS per request cost 1 % of a worker's CPU on the benchmark, and
# requests a worker has not written yet only make the budget stricter, never looser.
REQUEST_BATCH = 8
# A failed try's body is read to its end (keeping its connection) when at most this long.
DRAIN_MAX = 64 * 1024
ATTEMPTS_HEADER = b"x-weft-attempts"


class RetryBudget:
    """One route's retry budget in shared window words (see the module docstring)."""

    __slots__ = (
        "_base",
        "_cas",
        "_load",
        "clock_ms",
        "min_per_second",
        "owner",
        "pending",
        "percent",
        "slice_ms",
        "window_ms",
    )

    def __init__(
        self,
        table: EndpointTable,
        column: int,
        policy: RetryPolicy,
        clock_ms: Callable[[], int] = monotonic_ms,
    ) -> None:
        self._base = table.address(column, WINDOW)
        self._load = table.atomics.load
        self._cas = table.atomics.cas
        self.percent = policy.budget_percent
        self.min_per_second = policy.budget_min_per_second
        self.window_ms = round(retry.BUDGET_WINDOW * 1000)
        self.slice_ms = self.window_ms // adaptive.BUCKETS
        self.clock_ms = clock_ms
        self.owner: object = None  # what keeps a private mapping alive (`local`)
        self.pending = 0  # requests of this worker not yet in the shared window

    @classmethod
    def local(cls, policy: RetryPolicy, records: LocalRecords | None = None) -> RetryBudget:
        """A budget of this process alone (no supervisor: one in-process worker, tests)."""
        records = records if records is not None else LocalRecords(1)
        budget = cls(records.table, records.columns(1)[0], policy)
        budget.owner = records
        return budget

    def _count(self, requests: int, retries: int) -> None:
        epoch = self.clock_ms() // self.slice_ms  # adaptive.bucket_epoch
        addr = self._base + (epoch % adaptive.BUCKETS) * WORD
        for _ in range(CAS_TRIES):
            old = self._load(addr)
            if self._cas(addr, old, retry.budget_record(old, epoch, requests, retries)):
                return

    def request(self) -> None:
        """Count one request of the route (in batches of `REQUEST_BATCH`, see there)."""
        self.pending += 1
        if self.pending >= REQUEST_BATCH:
            self.flush()

    def flush(self) -> None:
        """Write this worker's requests not yet counted in the shared window."""
        n, self.pending = self.pending, 0
        if n:
            self._count(n, 0)

    def totals(self) -> tuple[int, int]:
        """(requests, retries) in the window, all workers together."""
        now = self.clock_ms()
        buckets = [self._load(self._base + k * WORD) for k in range(adaptive.BUCKETS)]
        return adaptive.window_totals(buckets, now, self.window_ms, 0)

    def spend(self) -> bool:
        """Take one retry from the budget; False when it has none left."""
        self.flush()
        requests, retries = self.totals()
        if not retry.budget_allows(
            requests,
            retries,
            percent=self.percent,
            min_per_second=self.min_per_second,
            window=retry.BUDGET_WINDOW,
        ):
            return False
        self._count(0, 1)
        return True


class _PrefixBody(Body):
    """A body whose first bytes were read already (into the request's arena, to see whether
    it fits the replay buffer), followed by the rest of the original."""

    def __init__(self, head: list[memoryview], rest: Body) -> None:
        super().__init__()
        self._head = head
        self._rest_body = rest
        self.length = rest.length
        self.limit = rest.limit
        self.trailers = rest.trailers

    async def receive(self) -> bytes:
        if self._head:
            return bytes(self._head.pop(0))
        data = await self._rest_body.receive()
        self.trailers = self._rest_body.trailers
        return data

    async def receive_into(self, view: memoryview) -> int:
        if self._head:
            head = self._head[0]
            n = min(len(view), len(head))
            view[:n] = head[:n]
            if n < len(head):
                self._head[0] = head[n:]
            else:
                self._head.pop(0)
            return n
        n = await self._rest_body.receive_into(view)
        self.trailers = self._rest_body.trailers
        return n

    def prefetched(self) -> tuple[list[memoryview], bool]:
        head, self._head = self._head, []
        return head, False

    async def aclose(self) -> None:
        await self._rest_body.aclose()


async def _discard(response: Response, deadline: float) -> None:
    """Let a failed try's response go: read a short body to its end (its connection stays
    reusable), close anything else."""
    body = response.body
    if body.length is not None and body.length <= DRAIN_MAX:
        with trio.move_on_at(deadline):
            try:
                while await body.receive():
                    pass
                return
            except Exception:
                pass
    await body.aclose()


def body_idle(request: Request) -> float:
    """How long a request's reader waits for a buffer: its route's client body-idle timeout."""
    route = request.route
    return (route.timeouts if route is not None else Timeouts()).client_body_idle


def make_retry(
    policy: RetryPolicy,
    budget: RetryBudget,
    clock: Callable[[], float] = trio.current_time,
    rng: random.Random | None = None,
) -> Middleware:
    """The retry middleware of one route."""
    on = retry.RetryOn.parse(policy.on)
    attempts = policy.attempts
    per_try = policy.per_try_timeout

    async def retrying(request: Request, nxt: Next) -> Response:
        budget.request()
        ctx = request.ctx
        original = request.body
        has_body = original.length is None or original.length > 0
        replay: ReplayBody | None = None
        if has_body:
            replay, read = await keep_body(
                request.arena, original, policy.buffer_body, body_idle(request)
            )
            request.body = replay if replay is not None else _PrefixBody(read, original)
        can_replay = not has_body or replay is not None
        total_deadline = ctx.get("deadline", float("inf"))
        tried: set[int] = set()
        ctx["tried"] = tried
        reasons: list[str] = []
        attempt = 0
        try:
            while True:
                attempt += 1
                if attempt > 1:
                    if replay is not None:
                        request.body = replay.again()
                    ctx.pop("result", None)
                    ctx.pop("error", None)
                if per_try:
                    try_deadline = clock() + per_try
                    ctx["per_try_deadline"] = try_deadline < total_deadline
                    ctx["deadline"] = min(total_deadline, try_deadline)
                response = await nxt(request)
                result, status = ctx.get("result", (None, 0))
                if (
                    attempt >= attempts
                    or result is None
                    or not can_replay
                    or not on.matches(result, status)
                ):
                    break
                wait = retry.backoff(attempt, policy.backoff_base, policy.backoff_max, rng)
                if status == 503:
                    ra = response.headers.get("retry-after")
                    try:
                        asked = retry.retry_after(
                            ra.encode("latin-1") if ra is not None else None, policy.backoff_max
                        )
                    except LookupError:
                        break
                    if asked is not None:
                        wait = asked
                if clock() + wait >= total_deadline:
                    break
                if not budget.spend():
                    ctx["retry_budget_exhausted"] = True
                    break
                reasons.append(retry.reason(result, status))
                await _discard(response, min(total_deadline, clock() + 1.0))
                if wait > 0:
                    await trio.sleep(wait)
        finally:
            ctx["deadline"] = total_deadline
            ctx.pop("per_try_deadline", None)
            ctx["attempts"] = attempt
            request.body = original  # the access log reads what came in from it
        if reasons:
            ctx["retries"] = reasons
        if attempt > 1:
            response.headers.set(ATTEMPTS_HEADER, str(attempt).encode())
        return response

    return retrying


def _factory(route: Route, context: BuiltinContext) -> Middleware | None:
    policy = route.retry
    if policy is None:
        return None
    hooks = context.hooks
    budget = hooks.retry_budget_for(route) if hooks is not None else RetryBudget.local(policy)
    return make_retry(policy, budget, context.clock)


register("retry", _factory)
