"""Unit tests for weft.config: what a user writes, and what they are told when it is wrong.

Every config mistake a user can make must come back as ``<file>: <key path>: <reason>``, all of
a file's mistakes at once, and a typo must never fall back to a default. The tests write real
files (``load``) so the file name in the messages is the one the user passed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.config import MINIMAL_CONFIG

from weft import config, confread
from weft.schema import ConfigError, Limits, PoolConfig, Timeouts

REPO = Path(__file__).resolve().parents[1]

# The smallest valid file; mistakes below are appended to it, so their paths are
# listeners[1], routes[1], destinations.api, ...
BASE = MINIMAL_CONFIG


def write(tmp_path: Path, text: str, name: str = "weft.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return info.value.errors


def route(extra: str, name: str = "second", prefix: str = "/second/") -> str:
    """A second [[routes]] table (routes[1]) with `extra` lines."""
    return (
        f'\n[[routes]]\nname = "{name}"\npath_prefix = "{prefix}"\ndestination = "web"\n{extra}\n'
    )


def api(extra: str) -> str:
    """A second destination, destinations.api, with `extra` lines."""
    return f"\n[destinations.api]\n{extra}\n"


# -- one mistake, one precise message ------------------------------------------------------------

# (extra TOML appended to BASE, key path of the error, words its reason must contain)
MISTAKES = [
    # A trailing newline must not slip through a regex anchored with "$" (which matches before
    # one): these values end up in request heads.
    pytest.param(
        api('endpoints = ["127.0.0.1:9003"]\nhost_header = "api.example\\n"'),
        "destinations.api.host_header",
        ["not a valid host"],
        id="host-header-with-trailing-newline",
    ),
    pytest.param(
        '[server]\nvia = "weft\\n"',
        "server.via",
        [],
        id="via-with-trailing-newline",
    ),
    pytest.param(
        route("", prefix="/a\\tb/"),
        "routes[1].path_prefix",
        ["control"],
        id="path-prefix-with-a-control-character",
    ),
    pytest.param(
        '[timeouts]\nupstream_heade = "5s"',
        "timeouts.upstream_heade",
        ["unknown key", 'did you mean "upstream_header"?'],
        id="unknown-key-did-you-mean",
    ),
    pytest.param(
        route('timeouts = { upstream_heade = "5s" }'),
        "routes[1].timeouts.upstream_heade",
        ["unknown key", 'did you mean "upstream_header"?'],
        id="unknown-route-timeout-did-you-mean",
    ),
    pytest.param(
        route('path_prefx = "/x/"'),
        "routes[1].path_prefx",
        ['did you mean "path_prefix"?'],
        id="unknown-route-key-did-you-mean",
    ),
    pytest.param(
        '\n[[routes]]\nname = "api"\npath_prefix = "/api/"\ndestination = "ap"\n',
        "routes[1].destination",
        ['unknown destination "ap"', '(known: "web")'],
        id="unknown-destination-lists-known",
    ),
    pytest.param(
        '[timeouts]\nupstream_header = "5 seconds"',
        "timeouts.upstream_header",
        ["duration", "5 seconds"],
        id="bad-duration",
    ),
    pytest.param(
        '[timeouts]\nclient_header = "0s"',
        "timeouts.client_header",
        ["> 0"],
        id="zero-duration",
    ),
    pytest.param(
        '[timeouts]\ndrain = "25h"',
        "timeouts.drain",
        ["at most 86400s"],
        id="duration-over-a-day",
    ),
    pytest.param(
        '[limits]\nmax_body_bytes = "10 megabytes"',
        "limits.max_body_bytes",
        ["size", "8KiB"],
        id="bad-size",
    ),
    pytest.param(
        "[limits]\nmax_headers = true",
        "limits.max_headers",
        ["expected an integer"],
        id="bool-for-integer",
    ),
    pytest.param(
        '[limits]\nmax_request_line = "64KiB"\nmax_header_bytes = "32KiB"',
        "limits.max_request_line",
        ["must not exceed limits.max_header_bytes"],
        id="request-line-over-head-size",
    ),
    pytest.param(
        '\n[[listeners]]\naddress = "127.0.0.1"\nport = 70000\n',
        "listeners[1].port",
        ["between 1 and 65535", "70000"],
        id="port-out-of-range",
    ),
    pytest.param(
        '\n[[listeners]]\naddress = "127.0.0.1"\nport = 8080\n',
        "listeners[1]",
        ["127.0.0.1:8080 is already listeners[0]"],
        id="duplicate-listener",
    ),
    pytest.param(
        '\n[[listeners]]\naddress = "localhost"\nport = 8081\n',
        "listeners[1].address",
        ["IPv4 or IPv6 address", "localhost"],
        id="listener-address-not-an-ip",
    ),
    pytest.param(
        api('endpoints = ["127.0.0.1:9003", "127.0.0.1:9003"]'),
        "destinations.api.endpoints[1]",
        ["127.0.0.1:9003 is already endpoints[0]"],
        id="duplicate-endpoint",
    ),
    pytest.param(
        api("endpoints = []"),
        "destinations.api.endpoints",
        ["non-empty list"],
        id="empty-endpoints",
    ),
    pytest.param(
        api('strategy = "round_robin"'),
        "destinations.api",
        ['needs "endpoints"'],
        id="missing-endpoints",
    ),
    pytest.param(
        api('endpoints = ["not a host:80"]'),
        "destinations.api.endpoints[0]",
        ["not a valid host name", "not a host"],
        id="endpoint-garbage-host",
    ),
    pytest.param(
        api('endpoints = ["127.0.0.1"]'),
        "destinations.api.endpoints[0]",
        ['expected "host:port"'],
        id="endpoint-without-port",
    ),
    pytest.param(
        api('endpoints = [{ address = "127.0.0.1:9003", weight = 0 }]'),
        "destinations.api.endpoints[0].weight",
        ["between 1 and 1000"],
        id="endpoint-weight-zero",
    ),
    pytest.param(
        api('endpoints = ["127.0.0.1:9003"]\nstrategy = "consistent_hash"'),
        "destinations.api",
        ['"consistent_hash" needs "hash_key"'],
        id="consistent-hash-without-key",
    ),
    pytest.param(
        api('endpoints = ["127.0.0.1:9003"]\nstrategy = "least_conn"\nhash_key = "client_ip"'),
        "destinations.api.hash_key",
        ['only used with strategy "consistent_hash"', "least_conn"],
        id="hash-key-on-other-strategy",
    ),
    pytest.param(
        api('endpoints = ["127.0.0.1:9003"]\nhash_key = "query:u"'),
        "destinations.api.hash_key",
        ['"header:<name>"', "query:u"],
        id="bad-hash-key",
    ),
    pytest.param(
        api('endpoints = ["127.0.0.1:9003"]\nstrategy = "random"'),
        "destinations.api.strategy",
        ["unknown strategy 'random'", "consistent_hash"],
        id="bad-strategy",
    ),
    pytest.param(
        api(
            'endpoints = ["127.0.0.1:9003"]\nstrategy = "consistent_hash"\nhash_key = "path"\n'
            "hash_balance_factor = 0.5"
        ),
        "destinations.api.hash_balance_factor",
        ["0 (off) or at least 1"],
        id="hash-balance-factor-below-one",
    ),
    pytest.param(
        '\n[destinations.web.pool]\nidle_timeout = "forever"\n',
        "destinations.web.pool.idle_timeout",
        ["duration"],
        id="pool-bad-duration",
    ),
    pytest.param(
        "\n[destinations.web.pool]\nmax_per_endpiont = 8\n",
        "destinations.web.pool.max_per_endpiont",
        ['did you mean "max_per_endpoint"?'],
        id="pool-unknown-key",
    ),
    pytest.param(
        route('strip_prefix = true\nrewrite_prefix = "/internal/"'),
        "routes[1]",
        ["either strip_prefix or rewrite_prefix"],
        id="strip-and-rewrite-prefix",
    ),
    pytest.param(
        '\n[[routes]]\nname = "api"\nhost = "api.example"\npath_prefix = "api/"\n'
        'destination = "web"\n',
        "routes[1].path_prefix",
        ['must start with "/"', "api/"],
        id="path-prefix-without-slash",
    ),
    pytest.param(
        route('methods = ["GET", "CONNECT"]'),
        "routes[1].methods",
        ["CONNECT is not proxied"],
        id="connect-in-methods",
    ),
    pytest.param(
        route('methods = ["get"]'),
        "routes[1].methods",
        ["not an HTTP method", "upper case"],
        id="lowercase-method",
    ),
    pytest.param(
        route('[routes.timeouts]\nclient_header = "5s"'),
        "routes[1].timeouts.client_header",
        ["cannot be set per route", "[timeouts]"],
        id="route-timeout-not-per-route",
    ),
    pytest.param(
        '[server]\ntrusted_proxies = ["10.0.0.0/8", "10.0.0.0/33"]',
        "server.trusted_proxies[1]",
        ["CIDR", "10.0.0.0/33"],
        id="bad-cidr",
    ),
    pytest.param(
        '[server]\ninstance = "my proxy"',
        "server.instance",
        ["instance name", "my proxy"],
        id="bad-instance-name",
    ),
    pytest.param(
        '\n[[routes]]\nname = "web"\npath_prefix = "/other/"\ndestination = "web"\n',
        "routes[1].name",
        ['"web" is already routes[0]'],
        id="duplicate-route-name",
    ),
    pytest.param(
        '\n[[routes]]\nname = "shadow"\ndestination = "web"\n',
        "routes[1]",
        ["matches exactly what routes[0] matches", "never be chosen"],
        id="duplicate-route-match",
    ),
    pytest.param(
        '\n[[routes]]\nname = "nowhere"\npath_prefix = "/nowhere/"\n',
        "routes[1]",
        ['needs "destination"'],
        id="route-without-destination",
    ),
    pytest.param(
        route('host = "*."'),
        "routes[1].host",
        ['host name or "*.suffix"'],
        id="bad-wildcard-host",
    ),
    pytest.param(
        route('middleware = ["examples.middleware.add_response_header"]'),
        "routes[1].middleware[0]",
        ['import path "package.module:factory"'],
        id="middleware-not-an-import-path",
    ),
    pytest.param(
        '[access_log]\nenabled = "yes"',
        "access_log.enabled",
        ["expected true or false"],
        id="string-for-bool",
    ),
]


@pytest.mark.parametrize(("extra", "key_path", "words"), MISTAKES)
def test_each_mistake_is_reported_once_with_its_key_path_and_reason(
    tmp_path, extra, key_path, words
):
    path = write(tmp_path, BASE + "\n" + extra)

    errors = errors_of(path)

    # Exactly one line: the mistake, not a cascade of follow-up complaints.
    assert len(errors) == 1, errors
    prefix = f"{path}: {key_path}: "
    assert errors[0].startswith(prefix), errors[0]
    reason = errors[0][len(prefix) :]
    for word in words:
        assert word in reason, errors[0]


def test_the_base_used_by_the_mistake_table_is_itself_valid(tmp_path):
    cfg = config.load(write(tmp_path, BASE))
    assert [r.name for r in cfg.routes] == ["web"]


def test_unknown_top_level_section_suggests_the_right_one(tmp_path):
    text = BASE.replace("[[routes]]", "[[rotues]]")
    errors = errors_of(write(tmp_path, text))
    assert f'{tmp_path / "weft.toml"}: rotues: unknown key (did you mean "routes"?)' in errors
    # And the section it was meant to be is reported missing, rather than silently empty.
    assert any(": routes: expected at least one [[routes]] table" in e for e in errors)


@pytest.mark.parametrize(
    ("extra", "key_path"),
    [
        pytest.param(
            api(
                'endpoints = ["127.0.0.1:9003"]\nstrategy = "consistent_hash"\nhash_key = "query:u"'
            ),
            "destinations.api.hash_key",
            id="bad-hash-key-is-not-also-a-missing-one",
        ),
        pytest.param(
            '\n[[routes]]\nname = "api"\npath_prefix = "api/"\ndestination = "web"\n',
            "routes[1].path_prefix",
            id="bad-prefix-does-not-also-duplicate-the-catch-all",
        ),
    ],
)
def test_a_refused_value_causes_no_follow_up_error_about_its_fallback(tmp_path, extra, key_path):
    # A refused value falls back to its default while the rest of the file is read; checks made
    # after that must not complain about the default the user never wrote ("needs hash_key"
    # when one was given, "matches exactly what routes[0] matches" for a prefix of "/").
    path = write(tmp_path, BASE + extra)
    errors = errors_of(path)
    assert [e.split(": ")[1] for e in errors] == [key_path], errors


def test_an_empty_destinations_table_is_reported_once(tmp_path):
    text = BASE.replace('[destinations.web]\nendpoints = ["127.0.0.1:9001"]', "[destinations]")
    errors = errors_of(write(tmp_path, text))
    missing = [e for e in errors if ": destinations: expected at least one" in e]
    assert len(missing) == 1, errors


def test_a_route_host_with_a_port_is_refused_because_it_could_never_match(tmp_path):
    # The router compares the request's host with its port removed (weft.routes), so a route
    # host "example.com:8080" can never be chosen: the config must say so.
    path = write(tmp_path, BASE + route('host = "example.com:8080"'))
    errors = errors_of(path)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: routes[1].host: "), errors[0]


def test_a_route_host_with_a_trailing_dot_matches_the_same_requests_as_without(tmp_path):
    # The router removes the trailing dot of the request's host; a route written with one must
    # either be normalised the same way or refused.
    path = write(tmp_path, BASE + route('host = "example.com."'))
    try:
        cfg = config.load(path)
    except ConfigError as e:
        assert all(": routes[1].host: " in line for line in e.errors), e.errors
    else:
        assert cfg.routes[1].host == "example.com"


# -- many mistakes, one report -------------------------------------------------------------------


def test_every_mistake_of_a_file_is_reported_at_once_each_line_starting_with_the_file(tmp_path):
    text = """
[server]
trusted_proxies = ["10.0.0.0/99"]

[[listeners]]
address = "127.0.0.1"
port = 0

[timeouts]
upstream_header = "soon"

[destinations.web]
endpoints = ["127.0.0.1:9001"]
strategy = "fastest"

[[routes]]
name = "web"
path_prefix = "web"
destination = "wbe"
"""
    path = write(tmp_path, text, name="broken.toml")

    with pytest.raises(ConfigError) as info:
        config.load(path)

    errors = info.value.errors
    # 1. Every mistake, in the order of the file's sections, each once.
    paths = [e.split(": ")[1] for e in errors]
    assert paths == [
        "server.trusted_proxies[0]",
        "listeners[0].port",
        "timeouts.upstream_header",
        "destinations.web.strategy",
        "routes[0].path_prefix",
        "routes[0].destination",
    ]
    # 2. Each line names the file first, as the user passed it: editors jump to it.
    assert all(e.startswith(f"{path}: ") for e in errors)
    # 3. The exception's text is those lines, so `weft check` can print it as is.
    assert str(info.value) == "\n".join(errors)


def test_toml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, BASE + "\n[limits\nmax_headers = 10\n", name="typo.toml")
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: TOML syntax: ")
    assert "line" in errors[0]


def test_missing_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "absent.toml"
    errors = errors_of(path)
    assert errors == [f"{path}: cannot read: No such file or directory"]


def test_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(BASE.encode() + b"\n# caf\xe9\n")
    errors = errors_of(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: not UTF-8 text: ")


def test_error_lines_use_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '[[listeners]]\naddress = "127.0.0.1"\nport = 8080\n')
    errors = errors_of(Path("weft.toml"))
    assert errors
    assert all(e.startswith("weft.toml: ") for e in errors), errors


# -- defaults, units, inheritance ----------------------------------------------------------------


def test_a_minimal_file_gets_every_default(tmp_path):
    text = """
[[listeners]]
address = "::1"
port = 8080

[destinations.web]
endpoints = ["127.0.0.1:9001"]

[[routes]]
destination = "web"
"""
    cfg = config.load(write(tmp_path, text))

    assert cfg.instance == "default"
    assert cfg.via == "weft"
    assert cfg.request_id_header == "x-request-id"
    assert cfg.trusted_proxies == ()
    assert cfg.limits == Limits()
    assert cfg.timeouts == Timeouts()
    assert cfg.access_log == config.AccessLog(enabled=True, path="-")
    assert cfg.upstream_max_connections == 4096
    assert cfg.listeners == (config.Listener("::1", 8080, 1024),)

    web = cfg.destinations["web"]
    assert web.endpoints == (config.Endpoint("127.0.0.1", 9001, 1),)
    assert (web.strategy, web.host_header, web.hash_key) == ("round_robin", "pass", None)
    assert web.hash_balance_factor == 1.25
    assert web.pool == PoolConfig()

    (r,) = cfg.routes
    assert r.name == "route0"  # named after its index when the file gives none
    assert (r.host, r.path_prefix, r.methods) == (None, "/", None)
    assert (r.strip_prefix, r.rewrite_prefix, r.middleware) == (False, None, ())
    assert r.timeouts == cfg.timeouts
    assert r.max_body_bytes == Limits().max_body_bytes


def test_defaults_follow_the_documented_values():
    # These numbers are promised in examples/weft.toml; changing one is a user-visible change.
    t = Timeouts()
    assert (t.client_header, t.client_keepalive, t.upstream_header, t.request_total) == (
        10.0,
        60.0,
        60.0,
        300.0,
    )
    lim = Limits()
    assert (lim.max_request_line, lim.max_header_bytes, lim.max_headers) == (8192, 32768, 100)
    assert lim.max_body_bytes == 100 * 1024 * 1024
    p = PoolConfig()
    assert (p.max_per_endpoint, p.max_idle_per_endpoint, p.queue_size) == (256, 64, 1024)
    assert (p.idle_timeout, p.queue_timeout, p.max_requests) == (60.0, 5.0, 10000)


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ('"250ms"', 0.25),
        ('"10s"', 10.0),
        ('"5m"', 300.0),
        ('"1.5m"', 90.0),
        ('"1h"', 3600.0),
        ('"7"', 7.0),
        ("15", 15.0),
        ("2.5", 2.5),
    ],
)
def test_durations_accept_units_and_plain_seconds(tmp_path, written, seconds):
    cfg = config.load(write(tmp_path, BASE + f"\n[timeouts]\nupstream_header = {written}\n"))
    assert cfg.timeouts.upstream_header == seconds


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("512", 512),
        ('"512"', 512),
        ('"512B"', 512),
        ('"64KiB"', 64 * 1024),
        ('"8k"', 8 * 1024),
        ('"8MiB"', 8 * 1024**2),
        ('"1GiB"', 1024**3),
        ('"1KB"', 1000),
        ('"2MB"', 2_000_000),
        ("0", 0),
    ],
)
def test_sizes_accept_binary_and_decimal_units(tmp_path, written, size):
    cfg = config.load(write(tmp_path, BASE + f"\n[limits]\nmax_body_bytes = {written}\n"))
    assert cfg.limits.max_body_bytes == size
    # A route without its own limit takes the [limits] one.
    assert cfg.routes[0].max_body_bytes == size


def test_request_total_zero_turns_it_off_but_other_timeouts_must_be_positive(tmp_path):
    cfg = config.load(write(tmp_path, BASE + '\n[timeouts]\nrequest_total = "0s"\n'))
    assert cfg.timeouts.request_total == 0.0

    errors = errors_of(write(tmp_path, BASE + "\n[timeouts]\nupstream_header = 0\n"))
    assert errors == [f"{tmp_path / 'weft.toml'}: timeouts.upstream_header: must be > 0, got 0"]


def test_route_timeouts_inherit_from_the_timeouts_section_not_from_builtin_defaults(tmp_path):
    text = (
        BASE
        + """
[timeouts]
upstream_header = "30s"
client_body_idle = "20s"
request_total = "120s"

[[routes]]
name = "slow-api"
path_prefix = "/api/"
destination = "web"
max_body_bytes = "1MiB"
[routes.timeouts]
upstream_header = "5s"
request_total = 0
"""
    )
    cfg = config.load(write(tmp_path, text))
    web, api_route = cfg.routes

    # 1. A route without [routes.timeouts] uses [timeouts] as a whole.
    assert web.timeouts == cfg.timeouts
    assert web.timeouts.upstream_header == 30.0
    # 2. A route overrides what it names...
    assert api_route.timeouts.upstream_header == 5.0
    assert api_route.timeouts.request_total == 0.0
    # 3. ...and inherits the rest from [timeouts], not from the built-in defaults.
    assert api_route.timeouts.client_body_idle == 20.0
    assert api_route.timeouts.client_header == Timeouts().client_header
    # 4. Its own body limit wins over [limits].
    assert api_route.max_body_bytes == 1024 * 1024
    assert web.max_body_bytes == Limits().max_body_bytes


def test_values_are_normalised(tmp_path):
    text = (
        BASE
        + """
[server]
request_id_header = "X-Trace-Id"
trusted_proxies = ["10.1.2.3/8", "::1/128"]

[destinations.api]
strategy = "consistent_hash"
hash_key = "header:X-User-Id"
endpoints = ["[0:0::1]:9003", { address = "localhost:9004", weight = 3 }]

[[routes]]
name = "api"
host = "API.Example.COM"
path_prefix = "/api/"
methods = ["POST", "GET", "GET"]
destination = "api"
"""
    )
    cfg = config.load(write(tmp_path, text))

    assert cfg.request_id_header == "x-trace-id"
    assert [str(n) for n in cfg.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    dest = cfg.destinations["api"]
    assert dest.hash_key == "header:x-user-id"
    assert dest.endpoints == (
        config.Endpoint("::1", 9003, 1),
        config.Endpoint("localhost", 9004, 3),
    )
    assert [e.authority for e in dest.endpoints] == ["[::1]:9003", "localhost:9004"]
    r = cfg.routes[1]
    assert r.host == "api.example.com"
    assert r.methods == frozenset({"GET", "POST"})


def test_config_objects_are_frozen(tmp_path):
    cfg = config.load(write(tmp_path, BASE))
    with pytest.raises(AttributeError):
        cfg.instance = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.routes[0].path_prefix = "/x/"  # type: ignore[misc]


def test_hash_identifies_the_file_contents(tmp_path):
    a = config.load(write(tmp_path, BASE, name="a.toml"))
    b = config.load(write(tmp_path, BASE, name="b.toml"))
    c = config.load(write(tmp_path, BASE + "\n# a comment changes the bytes\n", name="c.toml"))

    assert re.fullmatch(r"[0-9a-f]{16}", a.hash)
    assert a.hash == b.hash
    assert a.hash != c.hash
    assert a.source == str(tmp_path / "a.toml")


# -- the example file ----------------------------------------------------------------------------


def test_the_documented_example_file_loads(monkeypatch):
    monkeypatch.chdir(REPO)

    cfg = config.load("examples/weft.toml")

    assert cfg.source == "examples/weft.toml"
    assert [(lst.address, lst.port) for lst in cfg.listeners] == [("127.0.0.1", 8080)]
    assert [str(n) for n in cfg.trusted_proxies] == ["127.0.0.1/32", "::1/128"]
    web, api_dest = cfg.destinations["web"], cfg.destinations["api"]
    assert web.strategy == "weighted"
    assert [e.weight for e in web.endpoints] == [1, 3]
    assert web.pool == PoolConfig()  # the example spells out every default
    assert cfg.buffers.memory == 64 << 20
    assert (api_dest.strategy, api_dest.hash_key) == ("consistent_hash", "header:x-user-id")
    assert api_dest.host_header == "endpoint"
    api_route, web_route = cfg.routes
    assert (api_route.host, api_route.path_prefix, api_route.strip_prefix) == (
        "api.example.com",
        "/v1/",
        True,
    )
    assert api_route.methods == frozenset({"GET", "POST"})
    assert api_route.max_body_bytes == 1024 * 1024
    assert (api_route.timeouts.upstream_header, api_route.timeouts.request_total) == (5.0, 30.0)
    assert web_route.middleware == (
        config.MiddlewareSpec(
            "examples.middleware:add_response_header", {"header": "x-served-by", "value": "weft"}
        ),
    )
    # The example spells out every default; the [timeouts] section equals the built-in one.
    assert cfg.timeouts == Timeouts()
    assert cfg.limits == Limits()


# -- quick mode ----------------------------------------------------------------------------------


def test_quick_mode_builds_one_round_robin_route_to_every_upstream():
    cfg = config.quick("127.0.0.1:8080", ["127.0.0.1:9001", "[::1]:9002"], access_log=False)

    assert cfg.source == "<quick mode>"
    assert cfg.listeners == (config.Listener("127.0.0.1", 8080),)
    (dest,) = cfg.destinations.values()
    assert dest.strategy == "round_robin"
    assert dest.endpoints == (config.Endpoint("127.0.0.1", 9001), config.Endpoint("::1", 9002))
    (r,) = cfg.routes
    assert (r.name, r.path_prefix, r.destination) == ("default", "/", dest.name)
    assert cfg.access_log.enabled is False


def test_quick_mode_hash_tells_flag_sets_apart():
    a = config.quick("127.0.0.1:8080", ["127.0.0.1:9001"])
    b = config.quick("127.0.0.1:8080", ["127.0.0.1:9001"])
    c = config.quick("127.0.0.1:8080", ["127.0.0.1:9002"])
    assert a.hash == b.hash != c.hash


def test_quick_mode_reports_every_bad_flag_by_its_name():
    with pytest.raises(ConfigError) as info:
        config.quick("localhost:8080", [])
    errors = info.value.errors
    assert len(errors) == 2, errors
    assert errors[0].startswith("--listen: ")
    assert "localhost" in errors[0]
    assert errors[1] == "--upstream: give at least one upstream host:port"

    with pytest.raises(ConfigError) as info:
        config.quick("127.0.0.1:80", ["127.0.0.1:9001", "127.0.0.1", "[::1]:0"])
    assert [e.split(": ")[0] for e in info.value.errors] == [
        "--upstream 127.0.0.1",
        "--upstream [::1]:0",
    ]
    assert 'expected "host:port"' in info.value.errors[0]
    assert "between 1 and 65535" in info.value.errors[1]


# -- parse_hostport ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("[0:0:0::1]:443", ("::1", 443)),  # addresses come back in canonical form
        ("backend.internal:9000", ("backend.internal", 9000)),
        ("web_1:65535", ("web_1", 65535)),
    ],
)
def test_parse_hostport_accepts_names_ipv4_and_bracketed_ipv6(text, expected):
    assert confread.parse_hostport(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("::1:80", 'expected "host:port"'),  # IPv6 needs brackets
        ("backend", 'expected "host:port"'),
        ("backend:", 'expected "host:port"'),
        ("backend:0", "between 1 and 65535"),
        ("backend:65536", "between 1 and 65535"),
        ("[backend]:80", 'expected "host:port"'),
        ("bad host:80", "not a valid host name"),
        ("-bad.example:80", "not a valid host name"),
    ],
)
def test_parse_hostport_refuses_with_a_reason(text, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        confread.parse_hostport(text)
