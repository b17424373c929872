"""The Workload API client against a real gRPC agent (grpcio, in a subprocess).

The pure parts first (endpoint syntax, backoff, the retry table), then the client against
`support.workload_api_server`: first fetch, rotation, a broken stream and an agent
restart, refusal then recovery, a stop condition, no agent at all, a message missing a
mandatory field, and FetchJWTSVID. The backoff's sleep is injected (it records the delay and
yields), so no test waits for a real backoff; every wait is bounded.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import trio
from support.wapi_certs import TrustDomain
from support.workload_api_server import WorkloadAPIServer

from weft.grpc_h2 import GrpcError, Status
from weft.spiffe_wire import WireError, X509SVIDResponse
from weft.workload_api import (
    Backoff,
    Endpoint,
    EndpointError,
    WatchStopped,
    WorkloadAPIClient,
    parse_endpoint,
    resolve_endpoint,
    retry_or_stop,
)

WAIT = 15.0  # seconds any one step may take (grpcio in a subprocess on a shared machine)

# -- endpoint syntax (Workload Endpoint spec §4) ------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("unix:///run/agent.sock", Endpoint("unix:///run/agent.sock", path="/run/agent.sock")),
        ("unix:/run/agent.sock", Endpoint("unix:/run/agent.sock", path="/run/agent.sock")),
        ("unix:///tmp/a%20b.sock", Endpoint("unix:///tmp/a%20b.sock", path="/tmp/a b.sock")),
        ("tcp://127.0.0.1:8081", Endpoint("tcp://127.0.0.1:8081", host="127.0.0.1", port=8081)),
        ("tcp://[::1]:8081", Endpoint("tcp://[::1]:8081", host="::1", port=8081)),
    ],
)  # fmt: skip
def test_valid_endpoints(uri: str, expected: Endpoint) -> None:
    assert parse_endpoint(uri) == expected


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("", "empty"),
        (" unix:///a.sock", "spaces"),
        ("/run/spire/agent.sock", "scheme must be unix or tcp"),
        ("http://127.0.0.1:80", "scheme must be unix or tcp"),
        ("unix-abstract:agent", "scheme must be unix or tcp"),
        ("unix:relative/agent.sock", "must be absolute"),
        ("unix://run/spire/agent.sock", r"no authority.*unix:///run/spire/agent.sock"),
        ("unix:///a.sock?x=1", "query"),
        ("unix:///a.sock?", "query"),
        ("unix:///a.sock#frag", "fragment"),
        ("unix://user@/a.sock", "user information"),
        ("unix:///" + "x" * 120, "longer than the 107 bytes"),
        ("unix:///a%00b", "NUL"),
        ("tcp://localhost:8081", "IP address, not a name"),
        ("tcp://127.0.0.1", "needs a port"),
        ("tcp://127.0.0.1:0", "needs a port"),
        ("tcp://127.0.0.1:99999", "not a valid URI"),
        ("tcp://127.0.0.1:8081/foo", "no path"),
        ("tcp://127.0.0.1:8081/", "no path"),
        ("tcp://u:p@127.0.0.1:8081", "user information"),
        ("tcp://127.0.0.1:8081?x", "query"),
    ],
)
def test_invalid_endpoints_say_what_is_wrong(uri: str, why: str) -> None:
    with pytest.raises(EndpointError, match=why):
        parse_endpoint(uri)


def test_the_environment_is_the_fallback_for_an_unset_endpoint() -> None:
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:///env.sock"}
    assert resolve_endpoint("unix:///conf.sock", env).path == "/conf.sock"
    assert resolve_endpoint("", env).path == "/env.sock"
    assert resolve_endpoint(None, env).path == "/env.sock"
    with pytest.raises(EndpointError, match=r"set \[spiffe\] endpoint or \$SPIFFE_ENDPOINT"):
        resolve_endpoint(None, {})


# -- backoff and the retry table ----------------------------------------------------------------


def test_backoff_doubles_to_its_cap_with_equal_jitter() -> None:
    low = Backoff(1.0, 30.0, random=lambda: 0.0)
    high = Backoff(1.0, 30.0, random=lambda: 0.999999)
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30]
    for d in ceilings:
        assert low.next() == d / 2
        assert d / 2 < high.next() <= d
    low.reset()
    assert low.next() == 0.5


def test_only_invalid_argument_and_unimplemented_stop_the_watch() -> None:
    for code in Status:
        stop = retry_or_stop(GrpcError(code, "x"))
        assert (stop is not None) == (code in (Status.INVALID_ARGUMENT, Status.UNIMPLEMENTED))


# -- against a real agent -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def domains() -> tuple[TrustDomain, TrustDomain]:
    return TrustDomain("example.org"), TrustDomain("other.org")


class Recorder:
    """What a watch delivered and reported, and a sleep that records the backoff."""

    def __init__(self) -> None:
        self.updates: list[object] = []
        self.errors: list[GrpcError | WireError] = []
        self.delays: list[float] = []
        self.on_sleep: Callable[[int], object] | None = None

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if self.on_sleep is not None:
            result = self.on_sleep(len(self.delays))
            if result is not None:
                await result  # type: ignore[misc]
        await trio.sleep(0.01)


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll `predicate` (state the client changes from inside its own task) for `WAIT`."""
    with trio.move_on_after(WAIT):
        while not predicate():  # noqa: ASYNC110 - the state has no event to wait on
            await trio.sleep(0.01)
        return
    raise TimeoutError(f"no {what} in {WAIT}s")


def client(agent: WorkloadAPIServer, rec: Recorder, seed: int = 1) -> WorkloadAPIClient:
    return WorkloadAPIClient(
        parse_endpoint(agent.uri), sleep=rec.sleep, random=random.Random(seed).random
    )


async def test_first_fetch_delivers_the_svid_with_the_security_header(agent, domains) -> None:
    example, other = domains
    svid = example.svid("/web", hint="internal")
    # 1. The agent has an SVID for weft, and a federated bundle for other.org.
    await agent.command("x509", svids=[svid.as_json()], federated={other.id: _b64(other.bundle)})
    rec = Recorder()
    c = client(agent, rec)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.watch_x509, rec.updates.append, rec.errors.append)
        # 2. The first message arrives at once (spec §4.3), whole.
        await wait_for(lambda: rec.updates, "the first X.509 update")
        nursery.cancel_scope.cancel()
    first = rec.updates[0]
    assert isinstance(first, X509SVIDResponse)
    assert first.svids[0].spiffe_id == "spiffe://example.org/web"
    assert (first.svids[0].x509_svid, first.svids[0].x509_svid_key) == (svid.chain, svid.key)
    assert first.svids[0].bundle == example.bundle and first.svids[0].hint == "internal"
    assert first.federated_bundles == {other.id: other.bundle}
    # 3. The agent saw the workload.spiffe.io header; nothing failed; the state says so.
    log = (await agent.command("log"))["log"]
    assert [(e["method"], e["header"]) for e in log] == [("FetchX509SVID", True)]
    assert rec.errors == [] and rec.delays == []
    assert c.x509_state.updates == 1 and c.x509_state.last_update is not None


async def test_the_agent_over_loopback_tcp(agent, domains) -> None:
    example, _ = domains
    await agent.command("x509", svids=[example.svid("/web").as_json()])
    rec = Recorder()
    c = WorkloadAPIClient(parse_endpoint(agent.tcp_uri), sleep=rec.sleep)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.watch_x509, rec.updates.append, rec.errors.append)
        await wait_for(lambda: rec.updates, "the first update over TCP")
        nursery.cancel_scope.cancel()
    assert rec.errors == [] and c.endpoint.kind == "tcp"


async def test_rotation_is_delivered_on_the_open_stream(agent, domains) -> None:
    example, other = domains
    await agent.command("x509", svids=[example.svid("/web").as_json()])
    rec = Recorder()
    c = client(agent, rec)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.watch_x509, rec.updates.append, rec.errors.append)
        await wait_for(lambda: len(rec.updates) == 1, "the first update")
        # 1. The agent rotates the SVID and adds a second one: the same stream carries it.
        rotated = example.svid("/web")
        second = other.svid("/web", hint="external")
        await agent.command("x509", svids=[rotated.as_json(), second.as_json()])
        await wait_for(lambda: len(rec.updates) == 2, "the rotated update")
        # 2. It drops the second again (a redaction is a full update too, spec §4.4).
        await agent.command("x509", svids=[rotated.as_json()])
        await wait_for(lambda: len(rec.updates) == 3, "the redacting update")
        nursery.cancel_scope.cancel()
    assert [len(u.svids) for u in rec.updates] == [1, 2, 1]  # type: ignore[attr-defined]
    assert rec.updates[1].svids[0].x509_svid == rotated.chain  # type: ignore[attr-defined]
    assert rec.updates[1].svids[1].spiffe_id == "spiffe://other.org/web"  # type: ignore[attr-defined]
    log = (await agent.command("log"))["log"]
    assert len(log) == 1  # one stream all along
    assert rec.errors == []


async def test_a_lost_stream_reconnects_with_growing_jittered_backoff(agent, domains) -> None:
    example, _ = domains
    await agent.command("x509", svids=[example.svid("/web").as_json()])
    rec = Recorder()
    c = client(agent, rec, seed=7)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.watch_x509, rec.updates.append, rec.errors.append)
        await wait_for(lambda: c.x509_state.updates == 1, "the first update")
        # 1. The test breaks the stream: the watch reconnects after a first-step delay (the
        # stream had delivered, so the backoff was reset) and gets the state again.
        await agent.command("break")
        await wait_for(lambda: c.x509_state.updates == 2, "the update after the break")
        # 2. The agent restarts (connections cut): the same again.
        await agent.command("restart")
        await wait_for(lambda: c.x509_state.updates == 3, "the update after the restart")
        assert len(rec.delays) == 2 and all(0.5 <= d <= 1.0 for d in rec.delays)
        assert c.x509_state.connected and c.x509_state.last_error_code == "UNAVAILABLE"
        # 3. The agent answers UNAVAILABLE from now on: each failed attempt waits longer.
        await agent.command("mode", mode="unavailable")
        await wait_for(lambda: len(rec.delays) >= 2 + 8, "eight more attempts")
        nursery.cancel_scope.cancel()
    assert not c.x509_state.connected and c.x509_state.last_error == "agent is starting"
    assert c.x509_state.failures >= 8 and c.x509_state.stopped is None
    delays = rec.delays[2:10]
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30]  # 1 s doubling, capped at 30 s
    for d, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= d <= ceiling
    assert all(d not in (c / 2, c) for d, c in zip(delays, ceilings, strict=True))  # jittered
    log = (await agent.command("log"))["log"]
    assert len(log) >= 3 + 8 and all(e["header"] for e in log)


async def test_permission_denied_is_reported_and_retried_until_issued(agent, domains) -> None:
    example, _ = domains
    # 1. The agent has no identity for weft: PERMISSION_DENIED "no identity issued".
    await agent.command("mode", mode="deny")
    rec = Recorder()
    c = client(agent, rec)

    async def on_sleep(n: int) -> None:
        if n == 3:  # the registration entry appears after the third refusal
            await agent.command("x509", svids=[example.svid("/web").as_json()])
            await agent.command("mode", mode="serve")

    rec.on_sleep = on_sleep
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.watch_x509, rec.updates.append, rec.errors.append)
        await wait_for(lambda: rec.updates, "the SVID once issued")
        nursery.cancel_scope.cancel()
    # 2. Each refusal was reported, with the agent's words, and retried after a backoff.
    assert len(rec.errors) == 3
    for e in rec.errors:
        assert isinstance(e, GrpcError) and e.code == Status.PERMISSION_DENIED
        assert e.message == "no identity issued"
    assert len(rec.delays) == 3 and rec.delays[2] > rec.delays[0] / 2
    # 3. The state shows the recovery and keeps the last error for the report.
    s = c.x509_state
    assert s.connected and s.failures == 0 and s.updates == 1
    assert s.last_error_code == "PERMISSION_DENIED" and s.stopped is None


async def test_invalid_argument_stops_the_watch(agent) -> None:
    await agent.command("mode", mode="invalid")
    rec = Recorder()
    c = client(agent, rec)
    with trio.fail_after(WAIT), pytest.raises(WatchStopped, match="InvalidArgument"):
        await c.watch_x509(rec.updates.append, rec.errors.append)
    assert rec.delays == []  # no retry
    assert c.x509_state.stopped is not None and "bug in weft" in c.x509_state.stopped
    assert len((await agent.command("log"))["log"]) == 1


async def test_no_agent_is_reported_clearly_then_the_agent_appears(agent, domains) -> None:
    example, _ = domains
    await agent.command("stop")  # no socket at all
    await agent.command("x509", svids=[example.svid("/web").as_json()])
    rec = Recorder()
    c = client(agent, rec)

    async def on_sleep(n: int) -> None:
        if n == 2:
            await agent.command("start")

    rec.on_sleep = on_sleep
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.watch_x509, rec.updates.append, rec.errors.append)
        await wait_for(lambda: rec.updates, "the SVID once the agent listens")
        nursery.cancel_scope.cancel()
    assert len(rec.errors) == 2
    first = rec.errors[0]
    assert isinstance(first, GrpcError) and first.code == Status.UNAVAILABLE
    assert f"cannot connect to {agent.uri}" in first.message
    assert "No such file or directory" in first.message


async def test_a_message_missing_a_mandatory_field_is_discarded_and_reported(
    agent, domains
) -> None:
    example, _ = domains
    good = example.svid("/web")
    bad = {**good.as_json(), "x509_svid_key": ""}
    await agent.command("x509", svids=[bad])
    rec = Recorder()
    c = client(agent, rec)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.watch_x509, rec.updates.append, rec.errors.append)
        await wait_for(lambda: rec.errors, "the report of the bad message")
        # The stream stays up: the next (good) message is delivered on it.
        await agent.command("x509", svids=[good.as_json()])
        await wait_for(lambda: rec.updates, "the good message")
        nursery.cancel_scope.cancel()
    assert isinstance(rec.errors[0], WireError) and "x509_svid_key" in str(rec.errors[0])
    assert rec.delays == [] and len((await agent.command("log"))["log"]) == 1


async def test_fetch_jwt_svid(agent, domains) -> None:
    rec = Recorder()
    c = client(agent, rec)
    # 1. No identity: PERMISSION_DENIED, raised to the caller (no retry here).
    with trio.fail_after(WAIT), pytest.raises(GrpcError) as info:
        await c.fetch_jwt_svid(["weft-test"])
    assert info.value.code == Status.PERMISSION_DENIED
    # 2. Issued: the JWT-SVID, for the audience asked.
    svid = {"spiffe_id": "spiffe://example.org/web", "svid": "h.p.s"}
    await agent.command("jwt", svid=svid)
    with trio.fail_after(WAIT):
        resp = await c.fetch_jwt_svid(["weft-test", "second"], "spiffe://example.org/web")
    assert resp.svids[0].svid == "h.p.s"
    log = (await agent.command("log"))["log"]
    assert log[-1]["audience"] == ["weft-test", "second"] and log[-1]["header"]
    with pytest.raises(ValueError, match="audience"):
        await c.fetch_jwt_svid([])


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
