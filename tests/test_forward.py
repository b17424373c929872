"""Unit tests for the seams around the forwarder: outcome reports to a destination's observer,
and built-in middleware in a route's chain.

The upstreams are small loopback servers in the test's own trio run, each scripted for one
outcome (an answer with a status, a close before answering, silence); the forwarder and the
h1 adapter under test are the real ones.
"""

from __future__ import annotations

from functools import partial

import trio

from weft import config
from weft.builtins import BuiltinContext
from weft.connection import UpstreamPools
from weft.forward import GrpcEnd
from weft.handler import App
from weft.http.messages import BytesBody, Headers, Request, Response
from weft.outcome import CONNECT_ERROR, OK, RESET, STATUS, TIMEOUT
from weft.schema import Config, Route
from weft.workers.worker import Hooks


class RecordingObserver:
    """An Observer that keeps every report and excludes what a test says."""

    degraded_header = None

    def __init__(self) -> None:
        self.reports: list[tuple[int, str, int]] = []
        self.skip: set[int] = set()

    def report(
        self, index: int, result: str, status: int, latency: float, degraded: bool = False,
        *, trial: bool = False,
    ) -> None:
        assert latency >= 0
        self.reports.append((index, result, status))

    def excluded(self) -> set[int]:
        return self.skip

    def admit(self, index: int) -> int:
        return 0

    def abandon(self, index: int) -> None:
        pass

    def breaker_retry_after(self) -> int:
        return 0


class ObservingHooks(Hooks):
    def __init__(self) -> None:
        self.observers: dict[str, RecordingObserver] = {}

    def observer_for(self, dest):  # type: ignore[no-untyped-def]
        return self.observers.setdefault(dest.name, RecordingObserver())


def make_config(*ports: int, timeouts: dict | None = None) -> Config:
    return config.from_dict(
        {
            "listeners": [{"address": "127.0.0.1", "port": 8080}],
            "destinations": {"web": {"endpoints": [f"127.0.0.1:{p}" for p in ports]}},
            "routes": [{"name": "web", "destination": "web", "path_prefix": "/"}],
            "timeouts": timeouts or {},
        },
        "test.toml",
    )


def make_request(path: str = "/") -> Request:
    return Request(
        "GET",
        path,
        Headers([(b"host", b"t")]),
        BytesBody(b""),
        client=("127.0.0.1", 40000),
        request_id="rid-1",
        start=trio.current_time(),
    )


async def serve(nursery: trio.Nursery, handler) -> int:  # type: ignore[no-untyped-def]
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


def answering(status: int):  # type: ignore[no-untyped-def]
    async def handler(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n\r\nok" % status)
        await trio.sleep(1)

    return handler


async def closing(stream: trio.SocketStream) -> None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(65536)
    await stream.aclose()


async def silent(stream: trio.SocketStream) -> None:
    await trio.sleep(30)


async def run(app: App, request: Request) -> Response:
    response = await app(request)
    while await response.body.receive():
        pass
    return response


async def test_every_attempt_is_reported_to_the_destinations_observer(nursery):
    """1. A 200 is `ok`, a 503 is `status` with its code. 2. A close before any response
    byte is `reset` (reported once: a fresh connection is never retried). 3. A refused
    connect is `connect_error`. 4. No head within upstream_header is `timeout`."""
    good = await serve(nursery, answering(200))
    bad = await serve(nursery, answering(503))
    gone = await serve(nursery, closing)
    quiet = await serve(nursery, silent)
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        refused = s.getsockname()[1]  # bound, never listening: connections are refused
        cfg = make_config(good, bad, gone, refused, quiet, timeouts={"upstream_header": "0.5s"})
        pools = UpstreamPools(cfg.destinations.values(), 10, 1.0)
        await nursery.start(pools.run)
        hooks = ObservingHooks()
        app = App(cfg, pools, {}, hooks=hooks)
        statuses = [(await run(app, make_request())).status for _ in range(5)]  # round robin
        await pools.aclose()
    assert sorted(statuses) == [200, 502, 502, 503, 504]
    assert sorted(hooks.observers["web"].reports) == [
        (0, OK, 200),
        (1, STATUS, 503),
        (2, RESET, 0),
        (3, CONNECT_ERROR, 0),
        (4, TIMEOUT, 0),
    ]


async def test_builtin_middleware_runs_outermost_and_keeps_the_validated_fast_path(nursery):
    """A built-in (weft's own middleware, by route keys) is built once per worker with the
    context, runs before user middleware, and a route with only built-ins still counts as a
    route without user middleware (`request.validated`)."""
    port = await serve(nursery, answering(200))
    cfg = make_config(port)
    seen: list[tuple[str, bool]] = []
    built: list[tuple[str, BuiltinContext]] = []

    def factory(route: Route, context: BuiltinContext):  # type: ignore[no-untyped-def]
        built.append((route.name, context))

        async def mw(request: Request, next):  # type: ignore[no-untyped-def]
            seen.append(("builtin", request.validated))
            response = await next(request)
            response.headers.set("x-builtin", "1")
            return response

        return mw

    async def user(request: Request, next):  # type: ignore[no-untyped-def]
        seen.append(("user", request.validated))
        return await next(request)

    pools = UpstreamPools(cfg.destinations.values(), 10, 1.0)
    await nursery.start(pools.run)
    plain = App(cfg, pools, {}, builtins=[("test", factory)])
    response = await run(plain, make_request())
    assert response.status == 200 and response.headers.get("x-builtin") == "1"
    assert seen == [("builtin", True)]
    assert [name for name, _ in built] == ["web"] and built[0][1].config is cfg

    seen.clear()
    with_user = App(cfg, pools, {"web": [user]}, builtins=[("test", factory)])
    await run(with_user, make_request())
    assert seen == [("builtin", False), ("user", False)]
    await pools.aclose()


async def test_the_balancer_skips_what_the_observer_excludes(nursery):
    """The forwarder feeds the observer's view to `Balancer.pick(excluded=...)`: an excluded
    endpoint gets nothing, and with every endpoint excluded the answer is 503 no_endpoint."""
    ports = [await serve(nursery, answering(200)) for _ in range(3)]
    cfg = make_config(*ports)
    pools = UpstreamPools(cfg.destinations.values(), 10, 1.0)
    await nursery.start(pools.run)
    hooks = ObservingHooks()
    app = App(cfg, pools, {}, hooks=hooks)
    observer = hooks.observers["web"]
    observer.skip = {1}
    for _ in range(6):
        assert (await run(app, make_request())).status == 200
    assert sorted({index for index, _, _ in observer.reports}) == [0, 2]
    observer.skip = {0, 1, 2}
    request = make_request()
    response = await run(app, request)
    assert response.status == 503 and request.ctx["error"] == "no_endpoint"
    await pools.aclose()


class TrialObserver(RecordingObserver):
    """Also records the trial flag and the abandons (what GrpcEnd must get right)."""

    def __init__(self) -> None:
        super().__init__()
        self.trials: list[bool] = []
        self.abandoned: list[int] = []

    def report(
        self, index: int, result: str, status: int, latency: float, degraded: bool = False,
        *, trial: bool = False,
    ) -> None:
        super().report(index, result, status, latency, degraded, trial=trial)
        self.trials.append(trial)

    def abandon(self, index: int) -> None:
        self.abandoned.append(index)


def test_a_grpc_call_is_reported_when_its_trailers_say_how_it_went() -> None:
    """`GrpcEnd`: UNAVAILABLE in the trailers is a 503 to the observer, any other status a
    200; a body cut short is the head's 200; the report comes once, whether the body ended
    before or after the forwarder armed it; a half-open trial is reported as the trial and
    then freed."""
    obs = TrialObserver()

    def response(trailers: list[tuple[bytes, bytes]]) -> Response:
        r = Response(200, Headers([(b"content-type", b"application/grpc")]), BytesBody(b""))
        r.body.trailers = trailers
        return r

    end = GrpcEnd()
    end.arm(obs, 0, response([(b"grpc-status", b"14")]), 0.01, False)
    assert obs.reports == []
    end.ended(True)
    end.ended(True)  # once only
    assert obs.reports == [(0, STATUS, 503)]

    end = GrpcEnd()
    end.ended(True)  # the body ended with the head, before the forwarder armed it
    end.arm(obs, 1, response([(b"grpc-status", b"5")]), 0.01, False)
    assert obs.reports[-1] == (1, OK, 200)

    end = GrpcEnd()
    end.arm(obs, 2, response([(b"grpc-status", b"14")]), 0.01, True)
    end.ended(False)  # cut short: its trailers say nothing
    assert obs.reports[-1] == (2, OK, 200)
    assert obs.trials[-1] is True and obs.abandoned == [2]
