"""Build weft.toml text for end-to-end tests, in the format of ``examples/weft.toml``.

A test composes a config from pieces so that what is special about it stands out::

    text = (
        base_config(port, timeouts={"upstream_header": "300ms"})
        + destination("web", [u1.address, u2.address], strategy="round_robin")
        + route("web")
    )

``base_config`` sets what every e2e config wants: a unique instance name (so shared-memory
segments never collide between tests), loopback trusted proxies, a short drain (so stopping
weft is fast), and an access log file. Everything is plain TOML text: a test can append any
literal TOML it needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from weft import config as weft_config
from weft.schema import Config, ConfigError

from .procs import unique_instance

# Durations in test configs are short: the suite runs in minutes on two cores.
TEST_DRAIN = "2s"

# The smallest valid config file, for unit tests that load one but never serve it: one
# listener, destination "web" (one endpoint), route "web". Text appended to it gets the paths
# listeners[1], routes[1], destinations.<name>, ...
MINIMAL_CONFIG = """
[[listeners]]
address = "127.0.0.1"
port = 8080

[destinations.web]
endpoints = ["127.0.0.1:9001"]

[[routes]]
name = "web"
destination = "web"
"""


def toml_value(value: object) -> str:
    """One TOML value: str, bool, int, float, list, or dict (an inline table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def table(header: str, values: Mapping[str, object] | None) -> str:
    """``[header]`` (or ``[[header]]`` when header is written so) followed by ``key = value``."""
    lines = [header]
    for k, v in (values or {}).items():
        lines.append(f"{_key(k)} = {toml_value(v)}")
    return "\n".join(lines) + "\n\n"


def base_config(
    port: int,
    *,
    address: str = "127.0.0.1",
    access_log: Path | str | None = None,
    server: Mapping[str, object] | None = None,
    timeouts: Mapping[str, object] | None = None,
    limits: Mapping[str, object] | None = None,
    upstream: Mapping[str, object] | None = None,
    instance: str | None = None,
) -> str:
    """[server], one [[listeners]], and the optional [timeouts], [limits], [access_log],
    [upstream] sections."""
    # One worker unless a test asks for more: pools, in-flight counts and per-connection
    # behaviour are per worker, and many tests count on a single one.
    server_values: dict[str, object] = {"instance": instance or unique_instance(), "workers": 1}
    server_values.update(server or {})
    timeouts_values: dict[str, object] = {"drain": TEST_DRAIN}
    timeouts_values.update(timeouts or {})
    text = table("[server]", server_values)
    text += table("[[listeners]]", {"address": address, "port": port})
    text += table("[timeouts]", timeouts_values)
    if limits:
        text += table("[limits]", limits)
    if access_log is not None:
        text += table("[access_log]", {"enabled": True, "path": str(access_log)})
    if upstream:
        text += table("[upstream]", upstream)
    return text


def destination(
    name: str,
    endpoints: Sequence[str | Mapping[str, object]],
    *,
    strategy: str = "round_robin",
    pool: Mapping[str, object] | None = None,
    health: Mapping[str, object] | None = None,
    outlier: Mapping[str, object] | None = None,
    breaker: Mapping[str, object] | None = None,
    **keys: object,
) -> str:
    """``[destinations.NAME]`` with its endpoints, strategy, other keys, and the optional
    pool, health, outlier and breaker sections (``{}``: the section with its defaults)."""
    values: dict[str, object] = {"strategy": strategy, "endpoints": list(endpoints)}
    values.update(keys)
    text = table(f"[destinations.{name}]", values)
    if pool:
        text += table(f"[destinations.{name}.pool]", pool)
    for section, given in (("health", health), ("outlier", outlier), ("breaker", breaker)):
        if given is not None:
            text += table(f"[destinations.{name}.{section}]", given)
    return text


def route(
    destination: str,
    *,
    timeouts: Mapping[str, object] | None = None,
    **keys: object,
) -> str:
    """One ``[[routes]]`` entry sending to ``destination`` (path_prefix "/" unless given)."""
    values: dict[str, object] = {"path_prefix": "/", "destination": destination}
    values.update(keys)
    text = table("[[routes]]", values)
    if timeouts:
        text += table("[routes.timeouts]", timeouts)
    return text


def simple_config(port: int, endpoints: Sequence[str | Mapping[str, object]], *,
                  strategy: str = "round_robin", pool: Mapping[str, object] | None = None,
                  route_keys: Mapping[str, object] | None = None,
                  destination_keys: Mapping[str, object] | None = None,
                  **base: object) -> str:
    """One listener, one destination "app", one catch-all route: the common case."""
    return (
        base_config(port, **base)  # type: ignore[arg-type]
        + destination("app", endpoints, strategy=strategy, pool=pool, **(destination_keys or {}))
        + route("app", **(route_keys or {}))
    )


def load_text(tmp_path: Path, text: str) -> Config:
    """`text` written as ``tmp_path/weft.toml`` and loaded (ConfigError as it comes)."""
    path = tmp_path / "weft.toml"
    path.write_text(text)
    return weft_config.load(path)


def config_errors(tmp_path: Path, text: str) -> list[str]:
    """The error lines `weft.config.load` gives for `text` (it must refuse it)."""
    try:
        load_text(tmp_path, text)
    except ConfigError as e:
        return e.errors
    raise AssertionError("the config was accepted")
