"""The retry built-in (`weft.retry_middleware`) around a scripted next handler: which tries
are retried, what a replayed body is, the budget shared by two "workers", and the headers."""

from __future__ import annotations

import random

import trio

from weft.http.messages import Body, BytesBody, Headers, Request, Response
from weft.observer import LocalRecords
from weft.retry_middleware import RetryBudget, make_retry
from weft.schema import RetryPolicy


class Script:
    """A next handler that answers each try from a list of (result, status, headers)."""

    def __init__(self, answers: list[tuple[str | None, int, list[tuple[bytes, bytes]]]]) -> None:
        self.answers = list(answers)
        self.bodies: list[bytes] = []
        self.tried_seen: list[set[int]] = []

    async def __call__(self, request: Request) -> Response:
        self.bodies.append(await request.body.read())
        self.tried_seen.append(set(request.ctx["tried"]))
        request.ctx["tried"].add(len(self.bodies) - 1)
        result, status, headers = self.answers.pop(0)
        request.ctx["result"] = (result, status)
        return Response(status, Headers(headers), BytesBody(b"x"))


class Chunks(Body):
    """A streamed request body of unknown length."""

    def __init__(self, parts: list[bytes]) -> None:
        super().__init__()
        self.parts = list(parts)
        self.length = None

    async def receive(self) -> bytes:
        return self.parts.pop(0) if self.parts else b""


def request(method: str = "GET", body: Body | None = None) -> Request:
    r = Request(method, "/x", Headers([(b"host", b"h")]), body or BytesBody(b""))
    r.ctx["deadline"] = trio.current_time() + 60
    return r


POLICY = RetryPolicy(backoff_base=0.001, backoff_max=0.002)


def budget(policy: RetryPolicy = POLICY) -> RetryBudget:
    return RetryBudget.local(policy)


async def test_a_listed_failure_is_retried_and_the_answer_says_how_many_tries():
    nxt = Script([("connect_error", 0, []), ("status", 503, []), ("ok", 200, [])])
    mw = make_retry(POLICY, budget(), rng=random.Random(1))
    req = request()
    resp = await mw(req, nxt)
    assert resp.status == 200
    assert resp.headers.get("x-weft-attempts") == "3"
    assert req.ctx["attempts"] == 3 and req.ctx["retries"] == ["connect_error", "503"]
    assert nxt.tried_seen == [set(), {0}, {0, 1}]  # each try knows the endpoints tried


async def test_unlisted_failures_and_failures_not_of_the_endpoint_are_not_retried():
    for answer in [("status", 500, []), (None, 503, [])]:
        nxt = Script([answer, ("ok", 200, [])])
        resp = await make_retry(POLICY, budget())(request(), nxt)
        assert resp.status == answer[1] and len(nxt.bodies) == 1
        assert "x-weft-attempts" not in resp.headers


async def test_a_body_within_buffer_body_is_replayed_identically_and_a_larger_one_is_not():
    policy = RetryPolicy(backoff_base=0, backoff_max=0, buffer_body=10 * 1024)
    small = bytes(range(256)) * 40  # 10 KiB
    nxt = Script([("status", 503, []), ("ok", 200, [])])
    resp = await make_retry(policy, budget(policy))(request("POST", Chunks([small])), nxt)
    assert resp.status == 200 and nxt.bodies == [small, small]
    big = [small, b"one byte too many"]
    nxt = Script([("status", 503, []), ("ok", 200, [])])
    resp = await make_retry(policy, budget(policy))(request("POST", Chunks(big)), nxt)
    assert resp.status == 503 and nxt.bodies == [b"".join(big)]  # sent whole, once


async def test_a_retry_after_longer_than_backoff_max_ends_the_retries():
    nxt = Script([("status", 503, [(b"retry-after", b"30")]), ("ok", 200, [])])
    resp = await make_retry(POLICY, budget())(request(), nxt)
    assert resp.status == 503 and len(nxt.bodies) == 1


async def test_the_budget_is_shared_and_bounds_retries_to_a_share_of_requests():
    policy = RetryPolicy(
        attempts=2, backoff_base=0, backoff_max=0, budget_percent=20, budget_min_per_second=0
    )
    records = LocalRecords(4)
    col = records.columns(1)[0]
    # Two workers' middleware over one budget record.
    mws = [make_retry(policy, RetryBudget(records.table, col, policy)) for _ in range(2)]
    sent = 0
    exhausted = 0
    for i in range(100):
        nxt = Script([("status", 503, []), ("status", 503, [])])
        req = request()
        await mws[i % 2](req, nxt)
        sent += len(nxt.bodies)
        exhausted += bool(req.ctx.get("retry_budget_exhausted"))
    assert sent - 100 == 20  # retries: 20 % of the 100 requests
    assert exhausted == 80


async def test_a_replayed_chunked_body_stays_chunked_with_its_trailers():
    class Trailing(Chunks):
        async def receive(self) -> bytes:
            data = await super().receive()
            if not data:
                self.trailers = [(b"x-checksum", b"abc")]
            return data

    seen: list[tuple[int | None, list[tuple[bytes, bytes]]]] = []

    async def nxt(request: Request) -> Response:
        await request.body.read()
        seen.append((request.body.length, list(request.body.trailers)))
        request.ctx["result"] = ("status", 503) if len(seen) == 1 else ("ok", 200)
        return Response(200, Headers([]), BytesBody(b""))

    policy = RetryPolicy(backoff_base=0, backoff_max=0)
    await make_retry(policy, budget(policy))(request("POST", Trailing([b"ab", b"cd"])), nxt)
    assert seen == [(None, [(b"x-checksum", b"abc")])] * 2
