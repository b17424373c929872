"""The SPIFFE config (`weft.config_spiffe`): ``[spiffe]``, ``spiffe``/``client_auth`` in
``[listeners.tls]``, ``spiffe``/``expect_ids`` in destination TLS, ``[[routes.authorize]]`` and
``[routes.jwt_svid]``; IDs parsed at load, and one message per mistake naming file and key."""

from __future__ import annotations

import pytest
from support.config import MINIMAL_CONFIG, config_errors
from support.config import load_text as load

from weft.schema import AuthorizeRule, JwtSvidPolicy, SpiffeConfig, UpstreamJwtSvid
from weft.spiffe_id import PathPrefix, SpiffeId

SPIFFE = """
[spiffe]
endpoint = "unix:///run/spire/agent.sock"
svid = "spiffe://example.org/weft"
trust_domains = ["partner.example"]
first_fetch_timeout = "5s"
"""
LISTENER_TLS = """
[listeners.tls]
spiffe = true
client_auth = "optional"
"""
DEST_TLS = """
[destinations.web.tls]
spiffe = true
expect_ids = ["spiffe://example.org/api"]
"""
ROUTE = """
[[routes.authorize]]
allow_ids = ["spiffe://example.org/frontend"]
allow_trust_domains = ["partner.example"]
allow_path_prefixes = ["spiffe://example.org/ns/prod/"]
[routes.jwt_svid]
audience = "spiffe://example.org/api"
algorithms = ["ES256", "RS256"]
"""


def full(**replace: str) -> str:
    """MINIMAL_CONFIG with every SPIFFE piece (a piece replaced by keyword, "" drops it)."""
    pieces = {"spiffe": SPIFFE, "listener": LISTENER_TLS, "dest": DEST_TLS, "route": ROUTE}
    pieces.update(replace)
    text = MINIMAL_CONFIG.replace("port = 8080\n", "port = 8080\n" + pieces["listener"], 1)
    text = text.replace(
        'endpoints = ["127.0.0.1:9001"]\n', 'endpoints = ["127.0.0.1:9001"]\n' + pieces["dest"], 1
    )
    return text + pieces["route"] + pieces["spiffe"]


def test_svid_may_be_a_hint_or_an_id_in_canonical_form(tmp_path):
    text = SPIFFE.replace('"spiffe://example.org/weft"', '"%s"')
    assert load(tmp_path, full(spiffe=text % "internal")).spiffe.svid == "internal"
    cfg = load(tmp_path, full(spiffe=text % "spiffe://example.org/weft"))
    assert cfg.spiffe.svid == "spiffe://example.org/weft"


def test_every_piece_is_read_into_parsed_values(tmp_path):
    cfg = load(tmp_path, full())
    assert cfg.spiffe == SpiffeConfig(
        "unix:///run/spire/agent.sock",
        "spiffe://example.org/weft",
        ("partner.example",),
        5.0,
    )
    tls = cfg.listeners[0].tls
    assert tls.spiffe and tls.client_auth == "optional" and tls.certificates == ()
    assert tls.context is None  # built from the SVID when the Workload API gave one
    up = cfg.destinations["web"].tls
    assert up.spiffe and up.expect_ids == (SpiffeId("example.org", "/api"),)
    assert up.alpn == ("http/1.1",)
    route = cfg.routes[0]
    assert route.authorize == (
        AuthorizeRule(
            frozenset({SpiffeId("example.org", "/frontend")}),
            frozenset({"partner.example"}),
            (PathPrefix("example.org", ("ns", "prod")),),
        ),
    )
    assert route.jwt_svid == JwtSvidPolicy("spiffe://example.org/api", ("ES256", "RS256"))


def test_defaults(tmp_path):
    cfg = load(
        tmp_path,
        full(
            spiffe="[spiffe]\n",
            listener="[listeners.tls]\nspiffe = true\n",
            route='[routes.jwt_svid]\naudience = "api"\n',
        ),
    )
    assert cfg.spiffe == SpiffeConfig()
    assert cfg.listeners[0].tls.client_auth == "required"
    assert cfg.routes[0].jwt_svid.algorithms == ("RS256", "ES256", "PS256")
    assert load(tmp_path, MINIMAL_CONFIG).spiffe is None


def test_a_single_authorize_table_is_one_entry(tmp_path):
    cfg = load(tmp_path, full(route='[routes.authorize]\nallow_trust_domains = ["example.org"]\n'))
    assert cfg.routes[0].authorize == (
        AuthorizeRule(allow_trust_domains=frozenset({"example.org"})),
    )


def test_routes_opt_in_to_the_principal_label_and_may_rate_limit_on_the_principal(tmp_path):
    route = 'metrics_principal = true\n[[routes.rate_limit]]\nkey = "principal"\nrate = "10/s"\n'
    cfg = load(tmp_path, full(route=route + ROUTE))
    assert cfg.routes[0].metrics_principal is True
    assert cfg.routes[0].rate_limits[0].key == "principal"
    assert load(tmp_path, full()).routes[0].metrics_principal is False  # the default


MISTAKES = [
    # [routes] keys that read the principal
    ({"route": "metrics_principal = 1\n"}, "routes[0].metrics_principal", "true or false"),
    # [spiffe]
    ({"spiffe": '[spiffe]\nendpoint = "/run/agent.sock"\n'}, "spiffe.endpoint", "unix:///"),
    ({"spiffe": '[spiffe]\nendpoint = "tcp://spire:8081"\n'}, "spiffe.endpoint", "IP address"),
    ({"spiffe": '[spiffe]\nsvid = "spiffe://example.org/"\n'}, "spiffe.svid", "end with '/'"),
    ({"spiffe": '[spiffe]\nsvid = " front"\n'}, "spiffe.svid", "SPIFFE ID or an SVID's hint"),
    (
        {"spiffe": '[spiffe]\nsvid = "spiffe://example.org"\n'},
        "spiffe.svid",
        "names a trust domain",
    ),
    (
        {"spiffe": '[spiffe]\ntrust_domains = ["Partner.example"]\n'},
        "spiffe.trust_domains[0]",
        "lower case",
    ),
    (
        {"spiffe": '[spiffe]\ntrust_domains = ["a.org", "a.org"]\n'},
        "spiffe.trust_domains[1]",
        "twice",
    ),
    (
        {"spiffe": '[spiffe]\nfirst_fetch_timeout = "1h"\n'},
        "spiffe.first_fetch_timeout",
        "boot_timeout",
    ),
    ({"spiffe": "[spiffe]\nsocket = 1\n"}, "spiffe.socket", "unknown key"),
    # [listeners.tls]
    (
        {"listener": LISTENER_TLS.replace('"optional"', '"maybe"')},
        "listeners[0].tls.client_auth",
        'expected "required"',
    ),
    (
        {"listener": LISTENER_TLS + 'client_ca = "/ca.pem"\n'},
        "listeners[0].tls.client_ca",
        "not used with spiffe",
    ),
    (
        {"listener": LISTENER_TLS + "certificates = []\n"},
        "listeners[0].tls.certificates",
        "not used with spiffe",
    ),
    (
        {
            "listener": '[listeners.tls]\nclient_auth = "required"\n'
            'certificates = [{cert = "/c", key = "/k"}]\n'
        },
        "listeners[0].tls.client_auth",
        "only used with spiffe = true",
    ),
    # destination TLS
    (
        {"dest": "[destinations.web.tls]\nspiffe = true\n"},
        "destinations.web.tls",
        'needs "expect_ids"',
    ),
    (
        {"dest": "[destinations.web.tls]\nspiffe = true\nexpect_ids = []\n"},
        "destinations.web.tls.expect_ids",
        "at least one",
    ),
    (
        {"dest": DEST_TLS.replace("/api", "/API/")},
        "destinations.web.tls.expect_ids[0]",
        "end with '/'",
    ),
    (
        {"dest": DEST_TLS + "verify = false\n"},
        "destinations.web.tls.verify",
        "not used with spiffe",
    ),
    ({"dest": DEST_TLS + 'ca = "/ca.pem"\n'}, "destinations.web.tls.ca", "not used with spiffe"),
    (
        {"dest": '[destinations.web.tls]\nexpect_ids = ["spiffe://example.org/api"]\n'},
        "destinations.web.tls.expect_ids",
        "only used with spiffe = true",
    ),
    (
        {"dest": DEST_TLS.replace("example.org/api", "other.org/api")},
        "destinations.web.tls.expect_ids[0]",
        "other.org is not trusted",
    ),
    # routes
    ({"route": "[[routes.authorize]]\n"}, "routes[0].authorize[0]", "admits no one"),
    (
        {"route": '[[routes.authorize]]\nallow_ids = ["spiffe://example.org/a?b"]\n'},
        "routes[0].authorize[0].allow_ids[0]",
        "query",
    ),
    (
        {"route": '[[routes.authorize]]\nallow_path_prefixes = ["spiffe://example.org/ns/prod"]\n'},
        "routes[0].authorize[0].allow_path_prefixes[0]",
        'ends with "/"',
    ),
    (
        {"route": '[[routes.authorize]]\nallow_trust_domains = ["example.org:443"]\n'},
        "routes[0].authorize[0].allow_trust_domains[0]",
        "port",
    ),
    (
        {"route": '[[routes.authorize]]\nallow_trust_domains = ["nowhere.org"]\n'},
        "routes[0].authorize[0].allow_trust_domains",
        "nowhere.org is not trusted",
    ),
    (
        {"route": '[[routes.authorize]]\nallow_ids = ["x"]\nallow = 1\n'},
        "routes[0].authorize[0].allow",
        "unknown key",
    ),
    ({"route": "[routes.jwt_svid]\n"}, "routes[0].jwt_svid", 'needs "audience"'),
    (
        {"route": '[routes.jwt_svid]\naudience = "a"\nalgorithms = ["HS256"]\n'},
        "routes[0].jwt_svid.algorithms[0]",
        "never accepted",
    ),
    (
        {"route": '[routes.jwt_svid]\naudience = "a"\nalgorithms = ["none"]\n'},
        "routes[0].jwt_svid.algorithms[0]",
        "never accepted",
    ),
    (
        {"route": '[routes.jwt_svid]\naudience = "a"\nalgorithms = ["EdDSA"]\n'},
        "routes[0].jwt_svid.algorithms[0]",
        "unknown algorithm",
    ),
    (
        {"route": '[routes.jwt_svid]\naudience = "a"\nalgorithms = []\n'},
        "routes[0].jwt_svid.algorithms",
        "at least one",
    ),
    (
        {"route": '[routes.jwt_svid]\naudience = "a b"\n'},
        "routes[0].jwt_svid.audience",
        "expected an audience",
    ),
    # [routes.upstream_jwt_svid]
    ({"route": "[routes.upstream_jwt_svid]\n"}, "routes[0].upstream_jwt_svid", 'needs "audience"'),
    (
        {"route": "[routes.upstream_jwt_svid]\naudience = []\n"},
        "routes[0].upstream_jwt_svid.audience",
        "at least one",
    ),
    (
        {"route": '[routes.upstream_jwt_svid]\naudience = "a"\nheader = "x y"\n'},
        "routes[0].upstream_jwt_svid.header",
        "header field name",
    ),
    (
        {"route": '[routes.upstream_jwt_svid]\naudience = "a"\nfoo = 1\n'},
        "routes[0].upstream_jwt_svid.foo",
        "unknown",
    ),
]


def test_upstream_jwt_svid_takes_one_audience_or_several(tmp_path):
    one = '[routes.upstream_jwt_svid]\naudience = "spiffe://example.org/api"\n'
    cfg = load(tmp_path, full(route=one))
    assert cfg.routes[0].upstream_jwt_svid == UpstreamJwtSvid(("spiffe://example.org/api",))
    two = '[routes.upstream_jwt_svid]\naudience = ["a", "b"]\nheader = "X-Token"\n'
    cfg = load(tmp_path, full(route=two))
    assert cfg.routes[0].upstream_jwt_svid == UpstreamJwtSvid(("a", "b"), "x-token")
    errors = config_errors(tmp_path, full(spiffe="", listener="", dest="", route=one))
    assert [e.split(": ")[1] for e in errors] == ["routes[0].upstream_jwt_svid"]


@pytest.mark.parametrize(
    ("pieces", "key", "words"), MISTAKES, ids=[f"{m[1]}: {m[2]}" for m in MISTAKES]
)
def test_each_mistake_names_the_file_and_key_path(tmp_path, pieces, key, words):
    errors = config_errors(tmp_path, full(**pieces))
    prefix = f"{tmp_path / 'weft.toml'}: {key}: "
    assert any(e.startswith(prefix) and words in e for e in errors), errors


def test_spiffe_features_without_a_spiffe_table_are_refused_where_they_are(tmp_path):
    errors = config_errors(tmp_path, full(spiffe=""))
    keys = [e.split(": ")[1] for e in errors]
    assert keys == [
        "listeners[0].tls.spiffe",
        "destinations.web.tls.spiffe",
        "routes[0].authorize",
        "routes[0].jwt_svid",
    ]
    assert all("needs a [spiffe] table" in e for e in errors)


def test_what_reads_the_principal_without_a_spiffe_table_is_refused_at_its_key(tmp_path):
    route = (
        'metrics_principal = true\n[[routes.rate_limit]]\nrate = "1/s"\n'
        '[[routes.rate_limit]]\nkey = "principal"\nrate = "1/s"\n'
    )
    errors = config_errors(tmp_path, full(spiffe="", listener="", dest="", route=route))
    prefix = f"{tmp_path / 'weft.toml'}: "
    assert [e.removeprefix(prefix).split(": ")[0] for e in errors] == [
        "routes[0].metrics_principal",
        "routes[0].rate_limit[1].key",
    ]
    assert all("SPIFFE ID, which needs a [spiffe] table" in e for e in errors), errors


def test_every_mistake_of_a_file_is_reported_in_one_run(tmp_path):
    errors = config_errors(
        tmp_path,
        full(
            listener=LISTENER_TLS.replace('"optional"', '"maybe"'),
            route='[[routes.authorize]]\nallow_ids = ["spiffe://Example.org/x", "spiffe://example.org/"]\n',
        ),
    )
    assert len(errors) == 3, errors
