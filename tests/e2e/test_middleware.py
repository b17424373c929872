"""User middleware loaded from the config: a module written into the test's directory, put on
the weft subprocess's PYTHONPATH, named in ``routes[].middleware``.

The middleware contract (weft/handler.py): ``factory(config: dict) -> mw`` and
``async def mw(request, next) -> Response``; Request/Response are weft.http.messages'.
"""

from __future__ import annotations

import textwrap

import httpx
import pytest
from support.config import base_config, destination, route

pytestmark = pytest.mark.e2e

MIDDLEWARE = textwrap.dedent('''
    """Test middleware for weft's e2e suite."""
    from weft.http.messages import Response


    def tag(config):
        """Adds a header both ways; counts requests in a per-worker counter."""
        header = config["header"]
        value = config["value"]
        seen = {"n": 0}

        async def mw(request, next):
            seen["n"] += 1
            request.headers.set("x-mw-" + header, value)
            response = await next(request)
            response.headers.set(header, value)
            response.headers.set("x-mw-count", str(seen["n"]))
            return response

        return mw


    def deny_admin(config):
        """Answers /admin itself with the configured status: the upstream never sees it."""
        status = int(config.get("status", 403))

        async def mw(request, next):
            if request.path.startswith("/admin"):
                return Response.text(status, "denied by middleware\\n")
            return await next(request)

        return mw


    def explode(config):
        async def mw(request, next):
            raise RuntimeError("middleware bug")

        return mw
''')


@pytest.fixture
def mw_path(tmp_path):
    d = tmp_path / "mwpkg"
    d.mkdir()
    (d / "e2e_mw.py").write_text(MIDDLEWARE)
    return d


def test_middleware_from_config_sees_request_and_response(upstream, weft, free_port, mw_path):
    up = upstream("mw")
    config = (base_config(free_port())
              + destination("app", [up.address])
              + route("app", middleware=[
                  {"use": "e2e_mw:tag", "header": "x-outer", "value": "first"},
                  {"use": "e2e_mw:tag", "header": "x-inner", "value": "second"},
              ]))
    proxy = weft(config, pythonpath=[mw_path])
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        first = client.get("/echo")
        second = client.get("/echo")
    # 1. both request-side changes reached the upstream
    received = {k.lower(): v for k, v in first.json()["headers"]}
    assert received["x-mw-x-outer"] == "first"
    assert received["x-mw-x-inner"] == "second"
    # 2. both response-side changes reached the client
    assert first.headers["x-outer"] == "first"
    assert first.headers["x-inner"] == "second"
    # 3. the factory ran once (per worker): state persists across requests
    assert second.headers["x-mw-count"] == "2"


def test_middleware_can_answer_without_the_upstream(upstream, weft, free_port, mw_path):
    up = upstream("guarded")
    config = (base_config(free_port())
              + destination("app", [up.address])
              + route("app", middleware=[{"use": "e2e_mw:deny_admin", "status": 451}]))
    proxy = weft(config, pythonpath=[mw_path])
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        denied = client.get("/admin/users")
        allowed = client.get("/echo")
    assert denied.status_code == 451
    assert denied.text == "denied by middleware\n"
    assert allowed.status_code == 200
    assert up.stats()["by_path"] == {"/echo": 1}


def test_middleware_only_runs_on_its_route(upstream, weft, free_port, mw_path):
    up = upstream("tworoutes")
    config = (base_config(free_port())
              + destination("app", [up.address])
              + route("app", name="tagged", path_prefix="/echo",
                      middleware=[{"use": "e2e_mw:tag", "header": "x-tag", "value": "on"}])
              + route("app", name="plain", path_prefix="/"))
    proxy = weft(config, pythonpath=[mw_path])
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        assert client.get("/echo").headers.get("x-tag") == "on"
        assert "x-tag" not in client.get("/fixed", params={"size": 1}).headers


def test_a_failing_middleware_gives_500_for_that_request_only(upstream, weft, free_port,
                                                              mw_path):
    up = upstream("boom")
    config = (base_config(free_port())
              + destination("app", [up.address])
              + route("app", name="broken", path_prefix="/boom",
                      middleware=["e2e_mw:explode"])
              + route("app", name="fine", path_prefix="/"))
    proxy = weft(config, pythonpath=[mw_path])
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        assert client.get("/boom").status_code == 500
        # the worker survived and the connection too
        assert client.get("/echo").status_code == 200
    assert proxy.alive()
