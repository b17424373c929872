"""Unit tests for weft.routes: host tier, then longest prefix, then method.

Routes are built by `weft.config` from TOML-shaped dicts, so every route here is one a user could
write; the value attached to each route is its name.
"""

from __future__ import annotations

import pytest

from weft.config import from_dict
from weft.routes import NoRoute, Router


def router(*routes: dict) -> Router[str]:
    cfg = from_dict(
        {
            "listeners": [{"address": "127.0.0.1", "port": 8080}],
            "destinations": {"web": {"endpoints": ["127.0.0.1:9001"]}},
            "routes": [{"destination": "web", **r} for r in routes],
        },
        "test",
    )
    return Router([(r, r.name) for r in cfg.routes])


def chosen(rt: Router[str], host: str | None, path: str, method: str = "GET") -> str:
    route, value = rt.match(host, path, method)
    assert route.name == value
    return value


def refused(rt: Router[str], host: str | None, path: str, method: str = "GET") -> NoRoute:
    with pytest.raises(NoRoute) as info:
        rt.match(host, path, method)
    return info.value


# -- host tiers ----------------------------------------------------------------------------------

TIERS = router(
    {"name": "any", "path_prefix": "/"},
    {"name": "any-static", "path_prefix": "/static/"},
    {"name": "wild", "host": "*.example.com"},
    {"name": "wild-deep", "host": "*.eu.example.com"},
    {"name": "exact", "host": "api.example.com"},
    {"name": "exact-v2", "host": "api.example.com", "path_prefix": "/v2/"},
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", "exact"),
        ("API.Example.Com", "exact"),  # host names are case-insensitive
        ("api.example.com:8443", "exact"),  # the port is not part of the match
        ("api.example.com.", "exact"),  # nor is the root's trailing dot
        ("www.example.com", "wild"),
        ("a.b.c.example.com", "wild"),  # any depth of subdomain, as nginx's "*.example.com"
        ("shop.eu.example.com", "wild-deep"),  # the longer suffix wins
        ("example.com", "any"),  # "*.example.com" needs a subdomain
        ("notexample.com", "any"),
        ("other.org", "any"),
        ("[::1]:8080", "any"),
        (None, "any"),  # HTTP/1.0 without Host
        ("", "any"),
    ],
)
def test_the_host_chooses_one_tier(host, expected):
    assert chosen(TIERS, host, "/index.html") == expected


def test_a_host_tier_has_its_own_url_space():
    # api.example.com has no "/static/" route; the any-host tier's one is not borrowed.
    assert chosen(TIERS, None, "/static/app.js") == "any-static"
    assert chosen(TIERS, "api.example.com", "/static/app.js") == "exact"
    assert chosen(TIERS, "api.example.com", "/v2/users") == "exact-v2"


def test_a_host_with_only_a_narrow_prefix_is_404_elsewhere_even_with_a_catch_all():
    rt = router({"name": "any"}, {"name": "admin", "host": "admin.example", "path_prefix": "/ui/"})

    assert chosen(rt, "admin.example", "/ui/") == "admin"
    assert refused(rt, "admin.example", "/").status == 404
    assert chosen(rt, "www.example", "/") == "any"


def test_no_route_without_a_host_tier_is_404():
    rt = router({"name": "only", "host": "a.example"})
    e = refused(rt, "b.example", "/")
    assert (e.status, e.allow) == (404, [])
    e = refused(rt, None, "/")
    assert e.status == 404


def test_ipv6_literal_host_matches_with_or_without_port():
    rt = router({"name": "v6", "host": "[::1]"}, {"name": "any"})
    assert chosen(rt, "[::1]:8080", "/") == "v6"
    assert chosen(rt, "[::1]", "/") == "v6"
    assert chosen(rt, "[::2]", "/") == "any"


# -- longest prefix ------------------------------------------------------------------------------


def test_the_longest_matching_prefix_wins_whatever_the_config_order():
    rt = router(
        {"name": "root", "path_prefix": "/"},
        {"name": "api", "path_prefix": "/api/"},
        {"name": "api-v1-users", "path_prefix": "/api/v1/users"},
        {"name": "api-v1", "path_prefix": "/api/v1/"},
    )
    assert chosen(rt, None, "/") == "root"
    assert chosen(rt, None, "/apis") == "root"
    assert chosen(rt, None, "/api/") == "api"
    assert chosen(rt, None, "/api/v2/x") == "api"
    assert chosen(rt, None, "/api/v1/") == "api-v1"
    assert chosen(rt, None, "/api/v1/users/7") == "api-v1-users"
    # Prefixes are plain string prefixes, as nginx's prefix locations.
    assert chosen(rt, None, "/api/v1/usersettings") == "api-v1-users"


def test_a_path_under_no_prefix_is_404():
    rt = router({"name": "api", "path_prefix": "/api/"})
    e = refused(rt, None, "/ap")
    assert (e.status, e.allow) == (404, [])


# -- methods -------------------------------------------------------------------------------------


def test_the_method_chooses_among_routes_with_the_same_prefix():
    rt = router(
        {"name": "catch-all", "path_prefix": "/items/"},
        {"name": "reads", "path_prefix": "/items/", "methods": ["GET", "HEAD"]},
        {"name": "writes", "path_prefix": "/items/", "methods": ["POST", "PUT"]},
    )
    assert chosen(rt, None, "/items/1", "GET") == "reads"
    assert chosen(rt, None, "/items/1", "PUT") == "writes"
    # A route without methods takes the rest, even though it comes first in the file.
    assert chosen(rt, None, "/items/1", "DELETE") == "catch-all"


def test_a_prefix_match_without_the_method_is_405_listing_the_allowed_ones():
    rt = router(
        {"name": "reads", "path_prefix": "/items/", "methods": ["HEAD", "GET"]},
        {"name": "writes", "path_prefix": "/items/", "methods": ["POST"]},
    )
    e = refused(rt, None, "/items/1", "DELETE")
    assert e.status == 405
    assert e.allow == ["GET", "HEAD", "POST"]  # sorted, for a stable Allow header


def test_a_405_on_the_longest_prefix_is_not_rescued_by_a_shorter_prefix():
    # The longest prefix decides the route; its methods decide the answer (nginx location +
    # limit_except): the catch-all at "/" does not take a POST to "/api/".
    rt = router({"name": "root"}, {"name": "api", "path_prefix": "/api/", "methods": ["GET"]})
    e = refused(rt, None, "/api/x", "POST")
    assert (e.status, e.allow) == (405, ["GET"])
    assert chosen(rt, None, "/other", "POST") == "root"


def test_no_route_exception_carries_its_status():
    e = NoRoute(405, {"PUT", "GET"})
    assert e.status == 405
    assert e.allow == ["GET", "PUT"]
    assert NoRoute(404).allow == []
