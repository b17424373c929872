"""Unit tests for weft.handler: middleware chains, loading middleware by import path, and the App.

Most App tests end the chain with a middleware that answers itself and records what it was
given (the path after a rewrite, the body limit), so no upstream is involved; one test runs the
whole chain into the real Forwarder against a loopback upstream.
"""

from __future__ import annotations

import logging
import uuid
from functools import partial
from pathlib import Path

import pytest
import trio

from weft import config
from weft.connection import UpstreamPools
from weft.handler import App, chain, load_all_middleware, load_middleware
from weft.http.errors import ClientError
from weft.http.messages import Body, BodyTooLarge, BytesBody, Headers, Request, Response
from weft.schema import ConfigError, MiddlewareSpec

REPO = Path(__file__).resolve().parents[1]


def make_config(*routes: dict, source: str = "test.toml", port: int = 9001, **top) -> config.Config:
    return config.from_dict(
        {
            "listeners": [{"address": "127.0.0.1", "port": 8080}],
            "destinations": {"web": {"endpoints": [f"127.0.0.1:{port}"]}},
            "routes": [{"destination": "web", **r} for r in routes],
            **top,
        },
        source,
    )


def make_app(cfg: config.Config, middleware: dict | None = None) -> App:
    pools = UpstreamPools(cfg.destinations.values(), 10, 1.0)
    return App(cfg, pools, middleware if middleware is not None else {})


def make_request(
    method: str = "GET", target: str = "/", *, host: str | None = "shop.example", body=None
) -> Request:
    return Request(
        method,
        target,
        Headers([(b"host", host.encode())] if host else []),
        body if body is not None else BytesBody(b""),
        client=("127.0.0.1", 40000),
        request_id="rid-1",
        start=trio.current_time(),
    )


class Recorder:
    """A terminal middleware: answers 200 itself and keeps what the request looked like."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    async def __call__(self, request: Request, next) -> Response:
        self.seen.append(
            {
                "path": request.path,
                "upstream_target": request.upstream_target,
                "route": request.route.name,
                "limit": request.body.limit,
            }
        )
        return Response.text(200, "recorded\n")


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """``write(source) -> module name``: a uniquely named module importable for this test."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str) -> str:
        name = f"mw_{uuid.uuid4().hex}"
        (tmp_path / f"{name}.py").write_text(source)
        return name

    return write


@pytest.fixture
def repo_on_path(monkeypatch):
    """The repository root importable and current, as `python -m weft` run from it has it."""
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(REPO)


# -- chain ---------------------------------------------------------------------------------------


async def test_middleware_runs_in_config_order_outermost_first():
    events = []

    def tracer(name):
        async def mw(request, next):
            events.append(f"{name} in")
            response = await next(request)
            events.append(f"{name} out")
            return response

        return mw

    async def terminal(request):
        events.append("terminal")
        return Response.text(200, "ok")

    handler = chain([tracer("auth"), tracer("headers"), tracer("metrics")], terminal)
    response = await handler(make_request())

    assert response.status == 200
    assert events == [
        "auth in",
        "headers in",
        "metrics in",
        "terminal",
        "metrics out",
        "headers out",
        "auth out",
    ]


async def test_an_empty_chain_is_the_terminal_itself():
    async def terminal(request):
        return Response.text(204, "")

    assert chain([], terminal) is terminal


async def test_a_middleware_can_answer_without_calling_the_rest():
    reached = []

    async def refuse(request, next):
        return Response.text(401, "no\n")

    async def later(request, next):
        reached.append("later")
        return await next(request)

    async def terminal(request):
        reached.append("terminal")
        return Response.text(200, "ok")

    response = await chain([refuse, later], terminal)(make_request())

    assert response.status == 401
    assert reached == []


async def test_middleware_sees_and_changes_what_the_next_one_sees():
    async def tag_request(request, next):
        request.headers.set("x-tag", "outer")
        request.ctx["seen_by"] = ["outer"]
        return await next(request)

    async def terminal(request):
        return Response.text(200, f"{request.headers.get('x-tag')} {request.ctx['seen_by']}")

    response = await chain([tag_request], terminal)(make_request())
    assert await response.body.read() == b"outer ['outer']"


# -- loading middleware --------------------------------------------------------------------------


async def test_example_middleware_loads_with_its_config_table(repo_on_path):
    mw = load_middleware(
        MiddlewareSpec("examples.middleware:add_response_header", {"header": "x-a", "value": "1"})
    )

    async def terminal(request):
        return Response.text(200, "ok")

    response = await chain([mw], terminal)(make_request())
    assert response.headers.get("x-a") == "1"


def test_a_module_that_cannot_be_imported_is_refused_with_the_reason(module_dir):
    with pytest.raises(ValueError, match=r"cannot import 'no_such_weft_mw': ModuleNotFoundError"):
        load_middleware(MiddlewareSpec("no_such_weft_mw:factory", {}))

    broken = module_dir("raise RuntimeError('missing secret')\n")
    reason = rf"cannot import '{broken}': RuntimeError: missing secret"
    with pytest.raises(ValueError, match=reason):
        load_middleware(MiddlewareSpec(f"{broken}:factory", {}))


def test_a_missing_factory_is_refused(module_dir):
    name = module_dir("def factory(config):\n    return None\n")
    with pytest.raises(ValueError, match=rf"module '{name}' has no attribute 'facotry'"):
        load_middleware(MiddlewareSpec(f"{name}:facotry", {}))


def test_a_factory_that_raises_is_refused_naming_the_call(repo_on_path):
    # require_header needs a "header" key in its table.
    with pytest.raises(ValueError) as info:
        load_middleware(MiddlewareSpec("examples.middleware:require_header", {"status": 403}))
    assert str(info.value) == (
        "examples.middleware:require_header({'status': 403}) failed: KeyError: 'header'"
    )


def test_a_factory_that_returns_no_callable_is_refused(module_dir):
    name = module_dir("def factory(config):\n    return 42\n")
    with pytest.raises(ValueError, match=r"returned int, not a middleware callable"):
        load_middleware(MiddlewareSpec(f"{name}:factory", {}))


def test_a_factory_gets_its_own_copy_of_the_config_table(module_dir):
    name = module_dir(
        "def factory(config):\n"
        "    config.pop('value')\n"
        "    async def mw(request, next):\n"
        "        return await next(request)\n"
        "    return mw\n"
    )
    spec = MiddlewareSpec(f"{name}:factory", {"value": 1})
    load_middleware(spec)
    load_middleware(spec)  # once per worker: every call sees the whole table
    assert spec.config == {"value": 1}


def test_every_middleware_that_fails_to_load_is_a_config_error_at_its_key_path(module_dir):
    good = module_dir(
        "def factory(config):\n"
        "    async def mw(request, next):\n"
        "        return await next(request)\n"
        "    return mw\n"
    )
    cfg = make_config(
        {"name": "ok", "path_prefix": "/ok/", "middleware": [f"{good}:factory"]},
        {
            "name": "bad",
            "path_prefix": "/bad/",
            "middleware": [f"{good}:factory", "no_such_weft_mw:factory", f"{good}:nope"],
        },
        source="site.toml",
    )

    with pytest.raises(ConfigError) as info:
        load_all_middleware(cfg)

    errors = info.value.errors
    assert len(errors) == 2
    assert errors[0].startswith("site.toml: routes[1].middleware[1]: cannot import ")
    assert errors[1].startswith("site.toml: routes[1].middleware[2]: module ")

    # An App built from that config fails the same way, before any request is served.
    pools = UpstreamPools(cfg.destinations.values(), 10, 1.0)
    with pytest.raises(ConfigError):
        App(cfg, pools)


def test_the_example_config_loads_its_middleware(repo_on_path):
    cfg = config.load("examples/weft.toml")
    mws = load_all_middleware(cfg)
    assert {name: len(chain_) for name, chain_ in mws.items()} == {"api": 0, "web": 1}


# -- App: routing answers ------------------------------------------------------------------------


async def test_no_route_is_a_404_carrying_the_request_id():
    app = make_app(make_config({"name": "api", "path_prefix": "/api/"}))
    request = make_request("GET", "/elsewhere")

    response = await app(request)

    assert response.status == 404
    assert await response.body.read() == b"404 Not Found: no route\n"
    assert response.headers.get("x-request-id") == "rid-1"
    assert "allow" not in response.headers
    assert request.ctx["error"] == "no_route"
    assert request.route is None


async def test_a_method_no_route_takes_is_a_405_with_allow():
    app = make_app(
        make_config(
            {"name": "read", "path_prefix": "/items/", "methods": ["GET", "HEAD"]},
            {"name": "write", "path_prefix": "/items/", "methods": ["POST"]},
        )
    )
    request = make_request("DELETE", "/items/7")

    response = await app(request)

    assert response.status == 405
    assert response.headers.get_all("allow") == ["GET, HEAD, POST"]
    assert request.ctx["error"] == "no_route"


async def test_the_matched_route_runs_its_own_chain():
    api, web = Recorder(), Recorder()
    cfg = make_config({"name": "api", "path_prefix": "/api/"}, {"name": "web"})
    app = make_app(cfg, {"api": [api], "web": [web]})

    request = make_request("GET", "/api/x")
    response = await app(request)

    assert response.status == 200
    assert request.route is cfg.routes[0]
    assert [s["route"] for s in api.seen] == ["api"]
    assert web.seen == []


# -- App: path rewriting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "target", "path", "upstream_target"),
    [
        ({"path_prefix": "/v1/", "strip_prefix": True}, "/v1/users?id=7", "/users", "/users?id=7"),
        ({"path_prefix": "/v1", "strip_prefix": True}, "/v1/users", "/users", "/users"),
        ({"path_prefix": "/v1/", "strip_prefix": True}, "/v1/", "/", "/"),
        ({"path_prefix": "/v1", "strip_prefix": True}, "/v1", "/", "/"),
        ({"path_prefix": "/v1", "strip_prefix": True}, "/v1?a=b", "/", "/?a=b"),
        (
            {"path_prefix": "/old/", "rewrite_prefix": "/new/"},
            "/old/a/b?q=1",
            "/new/a/b",
            "/new/a/b?q=1",
        ),
        ({"path_prefix": "/app/", "rewrite_prefix": "/"}, "/app/index.html", "/index.html", None),
        ({"path_prefix": "/v1/"}, "/v1/users?id=7", "/v1/users", "/v1/users?id=7"),
    ],
)
async def test_strip_and_rewrite_prefix_change_what_the_upstream_is_asked_for(
    route, target, path, upstream_target
):
    recorder = Recorder()
    app = make_app(make_config({"name": "r", **route}), {"r": [recorder]})

    await app(make_request("GET", target))

    (seen,) = recorder.seen
    assert seen["path"] == path
    assert seen["upstream_target"] == (upstream_target or path)


# -- App: body limit -----------------------------------------------------------------------------


async def test_a_declared_body_over_the_route_limit_is_413_before_any_middleware():
    recorder = Recorder()
    cfg = make_config(
        {"name": "upload", "path_prefix": "/upload/", "max_body_bytes": "1KiB"},
        {"name": "web"},
    )
    app = make_app(cfg, {"upload": [recorder], "web": [recorder]})

    with pytest.raises(BodyTooLarge) as info:
        await app(make_request("POST", "/upload/x", body=BytesBody(b"x" * 1025)))

    assert (info.value.status, info.value.limit) == (413, 1024)
    assert info.value.close is True  # the adapter closes the connection after a 413
    assert recorder.seen == []

    # Exactly at the limit is fine, and another route keeps the [limits] default.
    assert (await app(make_request("POST", "/upload/x", body=BytesBody(b"x" * 1024)))).status == 200
    assert (await app(make_request("POST", "/other", body=BytesBody(b"x" * 2048)))).status == 200
    assert [s["limit"] for s in recorder.seen] == [1024, config.Limits().max_body_bytes]


async def test_a_body_of_unknown_length_carries_the_route_limit_for_the_reader():
    recorder = Recorder()
    app = make_app(make_config({"name": "upload", "max_body_bytes": 100}), {"upload": [recorder]})
    chunked = Body()  # length None: chunked, checked while streaming

    response = await app(make_request("POST", "/", body=chunked))

    assert response.status == 200
    assert chunked.limit == 100
    assert recorder.seen[0]["limit"] == 100


# -- App: failures inside the chain --------------------------------------------------------------


async def test_an_exception_in_middleware_is_a_logged_500_for_that_request_only(caplog):
    calls = []

    async def flaky(request, next):
        calls.append(request.path)
        if request.path == "/boom":
            raise KeyError("session")
        return Response.text(200, "fine\n")

    app = make_app(make_config({"name": "web"}), {"web": [flaky]})

    # 1. The failing request gets a 500 with its id, and the reason is logged with the route.
    with caplog.at_level(logging.ERROR, logger="weft.handler"):
        request = make_request("GET", "/boom")
        response = await app(request)
    assert response.status == 500
    assert await response.body.read() == b"500 Internal Server Error: internal error\n"
    assert response.headers.get("x-request-id") == "rid-1"
    assert request.ctx["error"] == "middleware_error"
    (record,) = caplog.records
    assert "rid-1" in record.getMessage() and "web" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is KeyError

    # 2. The next request on the same app is served normally.
    assert (await app(make_request("GET", "/fine"))).status == 200
    assert calls == ["/boom", "/fine"]


async def test_a_client_error_raised_in_middleware_passes_through():
    async def reads_body(request, next):
        await request.body.read(limit=4)  # raises BodyTooLarge past 4 bytes
        return Response.text(200, "read\n")

    async def refuses(request, next):
        raise ClientError("nope", status=400, reason="bad_token")

    app = make_app(
        make_config({"name": "r", "path_prefix": "/r/"}, {"name": "c", "path_prefix": "/c/"}),
        {"r": [reads_body], "c": [refuses]},
    )

    with pytest.raises(BodyTooLarge):
        await app(make_request("POST", "/r/", body=BytesBody(b"too long")))
    with pytest.raises(ClientError) as info:
        await app(make_request("GET", "/c/"))
    assert info.value.reason == "bad_token"


async def test_request_total_bounds_the_whole_chain(autojump_clock):
    async def stalls(request, next):
        await trio.sleep(3600)
        return Response.text(200, "too late\n")

    app = make_app(
        make_config({"name": "slow", "timeouts": {"request_total": "30s"}}), {"slow": [stalls]}
    )
    request = make_request("GET", "/")
    start = trio.current_time()

    response = await app(request)

    assert trio.current_time() - start == pytest.approx(30.0)
    assert response.status == 504
    assert request.ctx["error"] == "request_timeout"
    assert request.ctx["deadline"] == pytest.approx(request.start + 30.0)


async def test_request_total_zero_means_no_deadline(autojump_clock):
    async def slow(request, next):
        await trio.sleep(3600)
        return Response.text(200, "eventually\n")

    app = make_app(
        make_config({"name": "slow", "timeouts": {"request_total": 0}}), {"slow": [slow]}
    )
    request = make_request("GET", "/")

    response = await app(request)

    assert response.status == 200
    assert request.ctx["deadline"] == float("inf")


# -- App: the whole chain into a real upstream ---------------------------------------------------


async def echo_head(stream: trio.SocketStream) -> None:
    """A one-request upstream that answers with the request line and Host it received."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
    lines = buf.split(b"\r\n\r\n")[0].split(b"\r\n")
    body = b"\n".join([lines[0], *(line for line in lines if line.lower().startswith(b"host:"))])
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    while await stream.receive_some(65536):
        pass


async def test_a_request_goes_through_middleware_and_prefix_strip_to_the_upstream(
    nursery, repo_on_path
):
    listeners = await nursery.start(partial(trio.serve_tcp, echo_head, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    cfg = make_config(
        {
            "name": "api",
            "path_prefix": "/v1/",
            "strip_prefix": True,
            "middleware": [
                {"use": "examples.middleware:add_response_header", "header": "x-served-by"}
            ],
        },
        port=port,
    )
    pools = UpstreamPools(cfg.destinations.values(), 10, 1.0)
    await nursery.start(pools.run)
    try:
        app = App(cfg, pools)  # middleware loaded from the config

        response = await app(make_request("GET", "/v1/users?page=2"))
        body = await response.body.read()
        await response.body.aclose()

        # The upstream got the stripped path with the query and the client's Host; the
        # middleware added its header on the way back.
        assert response.status == 200
        assert body == b"GET /users?page=2 HTTP/1.1\nhost: shop.example"
        assert response.headers.get("x-served-by") == "weft"
        assert response.headers.get("x-request-id") == "rid-1"
        # The exchange ended cleanly, so its connection went back to the pool.
        assert pools.stats()["web"][0]["idle"] == 1
    finally:
        await pools.aclose()


async def test_only_a_route_without_user_middleware_marks_its_requests_validated(nursery):
    # A route whose chain is weft's alone lets the data path skip re-checking header fields;
    # one with user middleware must not (middleware may write anything into them).
    listeners = await nursery.start(partial(trio.serve_tcp, echo_head, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    seen = {}

    async def answer(request: Request, next) -> Response:
        seen[request.route.name] = request.validated
        return Response(204)

    cfg = make_config(
        {"name": "mw", "path_prefix": "/mw/"}, {"name": "plain", "path_prefix": "/"}, port=port
    )
    pools = UpstreamPools(cfg.destinations.values(), 10, 1.0)
    await nursery.start(pools.run)
    try:
        app = App(cfg, pools, {"mw": [answer]})
        await app(make_request("GET", "/mw/x"))
        assert seen == {"mw": False}

        plain = make_request("GET", "/x")
        assert plain.validated is False  # until the App says so
        response = await app(plain)
        assert await response.body.read() == b"GET /x HTTP/1.1\nhost: shop.example"
        await response.body.aclose()
        assert plain.validated is True
    finally:
        await pools.aclose()


async def test_a_header_field_injected_by_middleware_is_refused_not_sent(nursery):
    # The forwarder re-checks fields for routes with user middleware: a CR LF smuggled into a
    # value is refused by h11 (a 500 for the middleware's request), and nothing reaches the
    # upstream.
    got: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        got.append(await stream.receive_some(65536))
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    listeners = await nursery.start(partial(trio.serve_tcp, record, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]

    async def inject(request: Request, next) -> Response:
        request.headers.add("x-note", "a\r\nx-admin: yes")
        return await next(request)

    cfg = make_config({"name": "web", "path_prefix": "/"}, port=port)
    pools = UpstreamPools(cfg.destinations.values(), 10, 1.0)
    await nursery.start(pools.run)
    try:
        app = App(cfg, pools, {"web": [inject]})
        request = make_request("GET", "/")
        response = await app(request)
        await response.body.aclose()
        assert response.status == 500 and request.validated is False
        await trio.sleep(0.05)
        assert got == []
    finally:
        await pools.aclose()
