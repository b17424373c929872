"""`weft check -c FILE`: every mistake a user can make in a config gets a message that names the
file, the key path and the reason, and the exit status is 1.

Each case is a small valid config with one thing broken. The assertions name the key path and a
word of the reason, not the whole sentence, so wording can improve without breaking tests.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from support.procs import REPO_ROOT, run_weft_cli

pytestmark = pytest.mark.e2e

VALID = textwrap.dedent("""\
    [server]
    instance = "checkme"
    trusted_proxies = ["127.0.0.1/32"]

    [[listeners]]
    address = "127.0.0.1"
    port = 8080

    [timeouts]
    upstream_header = "5s"

    [limits]
    max_body_bytes = "1MiB"

    [destinations.web]
    strategy = "round_robin"
    endpoints = ["127.0.0.1:9001", "127.0.0.1:9002"]

    [destinations.static]
    strategy = "weighted"
    endpoints = [{ address = "127.0.0.1:9003", weight = 2 }]

    [[routes]]
    name = "static"
    path_prefix = "/static/"
    destination = "static"

    [[routes]]
    name = "web"
    path_prefix = "/"
    destination = "web"
""")


def _check(tmp_path: Path, text: str, name: str = "weft.toml"):
    (tmp_path / name).write_text(text)
    # cwd = tmp_path and a relative path: the message names the file as the user gave it
    return run_weft_cli(["check", "-c", name], cwd=tmp_path, timeout=30.0)


def _break(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new, 1)


def test_valid_config_passes(tmp_path):
    result = _check(tmp_path, VALID)
    assert result.returncode == 0, result.stderr
    assert "weft.toml" in result.stdout


def test_the_shipped_example_config_passes(tmp_path):
    # examples/weft.toml documents every key: it must stay a valid config.
    shutil.copy(REPO_ROOT / "examples" / "weft.toml", tmp_path / "weft.toml")
    result = run_weft_cli(["check", "-c", str(tmp_path / "weft.toml")], timeout=30.0)
    assert result.returncode == 0, result.stderr + result.stdout


CASES = [
    # (id, broken config, key path, a word of the reason)
    ("unknown-destination",
     _break('destination = "web"', 'destination = "api"'),
     "routes[1].destination", "unknown destination"),
    ("typo-key",
     _break('instance = "checkme"', 'instanse = "checkme"'),
     "server.instanse", "unknown key"),
    ("bad-duration",
     _break('upstream_header = "5s"', 'upstream_header = "5 minutes"'),
     "timeouts.upstream_header", "duration"),
    ("bad-size",
     _break('max_body_bytes = "1MiB"', 'max_body_bytes = "lots"'),
     "limits.max_body_bytes", "size"),
    ("unknown-strategy",
     _break('strategy = "round_robin"', 'strategy = "random"'),
     "destinations.web.strategy", "strategy"),
    ("hash-without-key",
     _break('strategy = "round_robin"', 'strategy = "consistent_hash"'),
     "destinations.web", "hash_key"),
    ("endpoint-without-port",
     _break('"127.0.0.1:9002"', '"localhost"'),
     "destinations.web.endpoints[1]", "host:port"),
    ("duplicate-endpoint",
     _break('"127.0.0.1:9002"', '"127.0.0.1:9001"'),
     "destinations.web.endpoints[1]", "already"),
    ("port-out-of-range",
     _break("port = 8080", "port = 70000"),
     "listeners[0].port", "65535"),
    ("listener-hostname",
     _break('address = "127.0.0.1"\nport', 'address = "localhost"\nport'),
     "listeners[0].address", "address"),
    ("bad-cidr",
     _break('["127.0.0.1/32"]', '["10.0.0.0/33"]'),
     "server.trusted_proxies[0]", "CIDR"),
    ("path-prefix-without-slash",
     _break('path_prefix = "/static/"', 'path_prefix = "static/"'),
     "routes[0].path_prefix", "/"),
    ("strip-and-rewrite",
     _break('path_prefix = "/static/"',
            'path_prefix = "/static/"\nstrip_prefix = true\nrewrite_prefix = "/s/"'),
     "routes[0]", "strip_prefix"),
    ("per-route-connection-timeout",
     _break('destination = "static"',
            'destination = "static"\ntimeouts = { client_header = "1s" }'),
     "routes[0].timeouts.client_header", "route"),
    ("connect-method",
     _break('destination = "static"', 'destination = "static"\nmethods = ["GET", "CONNECT"]'),
     "routes[0].methods", "CONNECT"),
    ("weight-not-integer",
     _break("weight = 2", 'weight = "heavy"'),
     "destinations.static.endpoints[0].weight", "integer"),
    ("unknown-section",
     VALID + "\n[telemetry]\nenabled = true\n",
     "telemetry", "unknown key"),
    ("missing-middleware-module",
     _break('destination = "static"',
            'destination = "static"\nmiddleware = ["no_such_module_xyz:factory"]'),
     "routes[0].middleware[0]", "import"),
    ("negative-timeout",
     _break('upstream_header = "5s"', 'upstream_header = -1'),
     "timeouts.upstream_header", "0"),
    ("max-headers-type",
     _break('max_body_bytes = "1MiB"', 'max_headers = "many"'),
     "limits.max_headers", "integer"),
]


@pytest.mark.parametrize(("text", "key_path", "reason"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_mistake_is_reported_with_file_key_path_and_reason(tmp_path, text, key_path, reason):
    result = _check(tmp_path, text)
    output = result.stderr + result.stdout
    assert result.returncode == 1, output
    lines = [ln for ln in output.splitlines() if f": {key_path}: " in ln]
    assert lines, f"no line names {key_path!r}:\n{output}"
    assert any(ln.startswith("weft.toml: ") for ln in lines), output
    assert any(reason.lower() in ln.lower() for ln in lines), output
    assert "Traceback" not in output


def test_unknown_destination_lists_the_known_ones(tmp_path):
    result = _check(tmp_path, _break('destination = "web"', 'destination = "api"'))
    assert result.returncode == 1
    assert 'routes[1].destination: unknown destination "api"' in result.stderr
    assert '"web"' in result.stderr and '"static"' in result.stderr


def test_typo_gets_a_suggestion(tmp_path):
    result = _check(tmp_path, _break('instance = "checkme"', 'instanse = "checkme"'))
    assert "instance" in result.stderr.split("server.instanse", 1)[1]


def test_every_mistake_is_reported_at_once(tmp_path):
    text = _break('upstream_header = "5s"', 'upstream_header = "soon"')
    text = text.replace('strategy = "round_robin"', 'strategy = "random"')
    text = text.replace("port = 8080", "port = 0")
    result = _check(tmp_path, text)
    assert result.returncode == 1
    for key_path in ("timeouts.upstream_header", "destinations.web.strategy", "listeners[0].port"):
        assert f": {key_path}: " in result.stderr, result.stderr


def test_toml_syntax_error_names_the_file(tmp_path):
    result = _check(tmp_path, VALID + "\n[broken\n")
    assert result.returncode == 1
    assert result.stderr.startswith("weft.toml: ")
    assert "TOML" in result.stderr or "line" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_is_reported(tmp_path):
    result = run_weft_cli(["check", "-c", "nowhere.toml"], cwd=tmp_path, timeout=30.0)
    assert result.returncode == 1
    assert "nowhere.toml" in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_file_names_what_is_missing(tmp_path):
    result = _check(tmp_path, "")
    assert result.returncode == 1
    for key in ("listeners", "destinations", "routes"):
        assert f"weft.toml: {key}: " in result.stderr, result.stderr


def test_run_refuses_an_invalid_config_with_the_same_messages(tmp_path):
    (tmp_path / "weft.toml").write_text(_break('destination = "web"', 'destination = "api"'))
    result = run_weft_cli(["run", "-c", "weft.toml"], cwd=tmp_path, timeout=30.0)
    assert result.returncode == 1
    assert "weft.toml: routes[1].destination: unknown destination" in result.stderr


def test_run_usage_errors_exit_2(tmp_path):
    (tmp_path / "weft.toml").write_text(VALID)
    both = run_weft_cli(["run", "-c", "weft.toml", "--listen", "127.0.0.1:1",
                         "--upstream", "127.0.0.1:2"], cwd=tmp_path, timeout=30.0)
    neither = run_weft_cli(["run"], cwd=tmp_path, timeout=30.0)
    assert both.returncode == 2, both.stderr
    assert neither.returncode == 2, neither.stderr


def test_quick_mode_bad_upstream_is_reported(tmp_path):
    result = run_weft_cli(["run", "--listen", "127.0.0.1:1", "--upstream", "nowhere"],
                          cwd=tmp_path, timeout=30.0)
    assert result.returncode == 1
    assert "--upstream" in result.stderr and "host:port" in result.stderr
