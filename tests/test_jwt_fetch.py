"""``[routes.upstream_jwt_svid]`` (`weft.jwt_fetch`): weft's JWT-SVID fetched from the real test
agent (grpcio, in a subprocess) when a request needs it, kept to half its life, fetched once for
concurrent requests, kept through an agent failure while it is valid, and a 503 without one."""

from __future__ import annotations

from collections.abc import Iterator

import jwt
import pytest
import trio
from support.workload_api_server import WorkloadAPIServer

from weft.http.messages import BytesBody, Headers, Request, Response
from weft.jwt_fetch import JwtFetchError, JwtSvidSource, make_upstream_jwt_svid
from weft.schema import UpstreamJwtSvid
from weft.workload_api import WorkloadAPIClient, parse_endpoint

WAIT = 15.0
AUD = ("spiffe://example.org/api",)
NOW = 1_000_000.0


@pytest.fixture(scope="module")
def agent() -> Iterator[WorkloadAPIServer]:
    with WorkloadAPIServer() as server:
        yield server


def token(exp: float, sub: str = "spiffe://example.org/weft") -> str:
    return jwt.encode({"sub": sub, "aud": list(AUD), "exp": exp}, "k" * 32, algorithm="HS256")


async def issue(agent: WorkloadAPIServer, value: str) -> None:
    await agent.command("mode", mode="serve")
    await agent.command("jwt", svid={"spiffe_id": "spiffe://example.org/weft", "svid": value})


async def calls(agent: WorkloadAPIServer) -> int:
    log = (await agent.command("log"))["log"]
    return sum(1 for e in log if e["method"] == "FetchJWTSVID")


def source(agent: WorkloadAPIServer, clock: list[float]) -> JwtSvidSource:
    client = WorkloadAPIClient(parse_endpoint(agent.uri))
    return JwtSvidSource(client, "spiffe://example.org/weft", clock=lambda: clock[0])


async def test_a_token_is_kept_for_half_its_life_then_fetched_again(agent) -> None:
    clock = [NOW]
    src = source(agent, clock)
    first, second = token(NOW + 100), token(NOW + 300)
    await issue(agent, first)
    before = await calls(agent)
    with trio.fail_after(WAIT):
        assert await src.token(AUD) == first
        clock[0] = NOW + 49
        assert await src.token(AUD) == first  # cached: no call
        assert await calls(agent) == before + 1
        await issue(agent, second)
        clock[0] = NOW + 50  # half-way from the fetch to exp
        assert await src.token(AUD) == second
        assert await calls(agent) == before + 2


async def test_concurrent_requests_share_one_fetch(agent) -> None:
    clock = [NOW]
    src = source(agent, clock)
    await issue(agent, token(NOW + 100))
    before = await calls(agent)
    got: list[str] = []

    async def one() -> None:
        got.append(await src.token(AUD))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            for _ in range(8):
                n.start_soon(one)
    assert len(set(got)) == 1 and len(got) == 8
    assert await calls(agent) == before + 1


async def test_an_agent_failure_keeps_a_valid_token_and_fails_without_one(agent) -> None:
    clock = [NOW]
    src = source(agent, clock)
    held = token(NOW + 100)
    await issue(agent, held)
    with trio.fail_after(WAIT):
        assert await src.token(AUD) == held
        await agent.command("mode", mode="deny")
        clock[0] = NOW + 60  # past the refresh point, before exp
        assert await src.token(AUD) == held
        clock[0] = NOW + 100
        with pytest.raises(JwtFetchError, match="PERMISSION_DENIED"):
            await src.token(AUD)
    await agent.command("mode", mode="serve")


async def test_an_expired_or_unreadable_token_from_the_agent_is_refused(agent) -> None:
    clock = [NOW]
    src = source(agent, clock)
    with trio.fail_after(WAIT):
        await issue(agent, token(NOW - 1))
        with pytest.raises(JwtFetchError, match="expired"):
            await src.token(AUD)
        await issue(agent, "not.a.jwt")
        with pytest.raises(JwtFetchError, match="no readable exp"):
            await src.token(AUD)


async def test_the_middleware_replaces_authorization_or_answers_503(agent) -> None:
    clock = [NOW]
    src = source(agent, clock)
    value = token(NOW + 100)
    await issue(agent, value)
    seen: list[str | None] = []

    async def upstream(request: Request) -> Response:
        seen.append(request.headers.get("authorization"))
        return Response.text(200, "ok")

    mw = make_upstream_jwt_svid(UpstreamJwtSvid(AUD), src)
    request = Request("GET", "/", Headers([(b"authorization", b"Bearer client")]), BytesBody())
    with trio.fail_after(WAIT):
        resp = await mw(request, upstream)
    assert resp.status == 200 and seen == [f"Bearer {value}"]
    await agent.command("mode", mode="deny")
    clock[0] = NOW + 200
    with trio.fail_after(WAIT):
        resp = await mw(Request("GET", "/", Headers(), BytesBody()), upstream)
    assert resp.status == 503 and len(seen) == 1
    await agent.command("mode", mode="serve")
