"""Routes over real requests: host tiers, longest prefix, methods, prefix rewriting, and the
per-route body limit. Each destination is one named upstream, so ``x-upstream`` tells which
route served a request and /echo's ``target`` what the upstream was sent."""

from __future__ import annotations

import httpx
import pytest
from support.config import base_config, destination, route

pytestmark = pytest.mark.e2e


@pytest.fixture
def routed(upstream, weft, free_port):
    ups = {name: upstream(name) for name in ("api", "wild", "deep", "web", "static")}
    config = (
        base_config(free_port())
        + "".join(destination(n, [u.address]) for n, u in ups.items())
        + route("api", name="api", host="api.example", path_prefix="/v1/", strip_prefix=True,
                methods=["GET", "POST"])
        + route("wild", name="wild", host="*.example")
        + route("deep", name="deep", host="*.deep.example")
        + route("static", name="static", path_prefix="/static/", rewrite_prefix="/files/",
                max_body_bytes=16)
        + route("web", name="web", path_prefix="/")
    )
    return weft(config), ups


def _get(proxy, host: str, path: str, method: str = "GET", **kw) -> httpx.Response:
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        return client.request(method, path, headers={"Host": host}, **kw)


def test_exact_host_then_wildcard_then_any(routed):
    proxy, _ = routed
    assert _get(proxy, "api.example", "/v1/echo").headers["x-upstream"] == "api"
    assert _get(proxy, "shop.example", "/echo").headers["x-upstream"] == "wild"
    assert _get(proxy, "a.b.example", "/echo").headers["x-upstream"] == "wild"
    assert _get(proxy, "x.deep.example", "/echo").headers["x-upstream"] == "deep", \
        "the longer wildcard suffix wins"
    assert _get(proxy, "other.test", "/echo").headers["x-upstream"] == "web"


def test_host_matching_ignores_port_and_case(routed):
    proxy, _ = routed
    assert _get(proxy, "API.Example:8080", "/v1/echo").headers["x-upstream"] == "api"


def test_a_host_tier_has_its_own_url_space(routed):
    proxy, ups = routed
    # api.example only has /v1/: other paths are not found there, not sent to the catch-all
    assert _get(proxy, "api.example", "/echo").status_code == 404
    assert ups["web"].stats()["requests"] == 0


def test_strip_prefix_sends_the_rest_of_the_path(routed):
    proxy, _ = routed
    resp = _get(proxy, "api.example", "/v1/echo?q=1")
    assert resp.json()["target"] == "/echo?q=1"


def test_rewrite_prefix_replaces_the_matched_prefix(routed):
    proxy, _ = routed
    resp = _get(proxy, "any.test", "/static/logo.png?x=y")
    assert resp.headers["x-upstream"] == "static"
    assert resp.json()["target"] == "/files/logo.png?x=y"


def test_longest_prefix_wins(routed):
    proxy, _ = routed
    assert _get(proxy, "any.test", "/static/x").headers["x-upstream"] == "static"
    assert _get(proxy, "any.test", "/staticky").headers["x-upstream"] == "web"


def test_method_outside_the_route_list_gets_405_with_allow(routed):
    proxy, ups = routed
    resp = _get(proxy, "api.example", "/v1/echo", method="DELETE")
    assert resp.status_code == 405
    assert set(resp.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}
    assert ups["api"].stats()["requests"] == 0


def test_route_body_limit_overrides_the_global_one(routed):
    proxy, _ = routed
    assert _get(proxy, "any.test", "/static/echo", method="POST",
                content=b"x" * 17).status_code == 413
    assert _get(proxy, "any.test", "/echo", method="POST",
                content=b"x" * 17).status_code == 200
