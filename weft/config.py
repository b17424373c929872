"""Configuration: a TOML file (or quick-mode flags) turned into frozen dataclasses.

This module owns the whole configuration language: its keys, their defaults, their ranges, and
the error messages a user sees when a file is wrong. Nothing else in weft reads TOML or raw
dicts; the rest of the code receives a `Config` whose every value has been checked.

Theory of operation:

* Parsing is a walk over the TOML tree; every key is read with its key path
  (``routes[1].timeouts.upstream_header``). Each section reader pops the keys it knows from a
  copy of its table and reports what is left as unknown keys: a typo must never silently fall
  back to a default. The value parsers and the error-collecting `Reader` are in
  `weft.confread`, shared with every section added later; the schema is `weft.schema`.
* Errors are collected, not raised one by one, so `weft check` shows every mistake of a file in
  one go. Each is ``<file>: <key path>: <reason>``.
* Cross-references (a route's destination, duplicate names) are checked after every section was
  read, with the known names in the message.
* `Config.hash` is a digest of the file's bytes (or of the quick-mode flags); reload and status
  use it to tell configs apart.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from weft import confread as cr
from weft.config_buffers import read_buffers
from weft.config_h2 import read_h2_limits
from weft.config_ratelimit import read_rate_limit_backend, read_rate_limits, read_rate_table
from weft.config_resilience import read_breaker, read_health, read_outlier, read_retry
from weft.config_spiffe import (
    check_references,
    read_authorize,
    read_jwt_svid,
    read_spiffe,
    read_upstream_jwt_svid,
)
from weft.config_tls import read_listener_tls, read_upstream_tls
from weft.schema import (
    ROUTE_TIMEOUTS,
    STRATEGIES,
    AccessLog,
    Admin,
    Buffers,
    Config,
    ConfigError,
    Destination,
    Endpoint,
    Limits,
    Listener,
    Metrics,
    MiddlewareSpec,
    PoolConfig,
    RateLimitBackend,
    Route,
    Timeouts,
)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")


_TIMEOUT_KEYS = tuple(Timeouts.__dataclass_fields__)
_LIMIT_KEYS = tuple(Limits.__dataclass_fields__)
_POOL_KEYS = tuple(PoolConfig.__dataclass_fields__)


def _read_timeouts(
    r: cr.Reader, raw: Any, path: str, base: Timeouts, allowed: tuple[str, ...]
) -> Timeouts:
    t = r.table(raw, path)
    if t is None:
        return base
    values = {}
    for key in allowed:
        zero_ok = key == "request_total"
        values[key] = r.take(
            t, key, path, lambda v, z=zero_ok: cr.duration(v, allow_zero=z), getattr(base, key)
        )
    for key in list(t):
        if key in _TIMEOUT_KEYS:
            t.pop(key)
            r.error(cr.join(path, key), "cannot be set per route (set it in [timeouts])")
    r.unknown(t, path, allowed)
    return replace(base, **values)


def _read_limits(r: cr.Reader, raw: Any) -> Limits:
    t = r.table(raw, "limits")
    if t is None:
        return Limits()
    d = Limits()
    lim = Limits(
        max_request_line=r.take(
            t,
            "max_request_line",
            "limits",
            lambda v: cr.size(v, lo=64, hi=1 << 20),
            d.max_request_line,
        ),
        max_header_bytes=r.take(
            t,
            "max_header_bytes",
            "limits",
            lambda v: cr.size(v, lo=256, hi=1 << 24),
            d.max_header_bytes,
        ),
        max_headers=r.take(
            t, "max_headers", "limits", lambda v: cr.integer(v, lo=1, hi=10000), d.max_headers
        ),
        max_body_bytes=r.take(
            t, "max_body_bytes", "limits", lambda v: cr.size(v, lo=0, hi=1 << 50), d.max_body_bytes
        ),
        max_connections=r.take(
            t,
            "max_connections",
            "limits",
            lambda v: cr.integer(v, lo=1, hi=1 << 20),
            d.max_connections,
        ),
        rate_table=read_rate_table(r, t.pop("rate_table"), "limits.rate_table")
        if "rate_table" in t
        else d.rate_table,
    )
    h2 = t.pop("h2", None)
    r.unknown(t, "limits", _LIMIT_KEYS)
    lim = replace(lim, h2=read_h2_limits(r, h2, "limits.h2", lim.max_header_bytes))
    if lim.max_request_line > lim.max_header_bytes:
        r.error(
            "limits.max_request_line",
            f"must not exceed limits.max_header_bytes ({lim.max_header_bytes})",
        )
    return lim


def _read_listeners(r: cr.Reader, raw: Any) -> tuple[Listener, ...]:
    if not isinstance(raw, list) or not raw:
        r.error("listeners", "expected at least one [[listeners]] table")
        return ()
    out = []
    seen: dict[tuple[str, int], int] = {}
    for i, item in enumerate(raw):
        path = f"listeners[{i}]"
        t = r.table(item, path)
        if t is None:
            continue
        if "address" not in t or "port" not in t:
            r.error(path, 'needs both "address" and "port"')
        address = r.take(t, "address", path, cr.ip, "127.0.0.1")
        port = r.take(t, "port", path, cr.port, 0)
        backlog = r.take(t, "backlog", path, lambda v: cr.integer(v, lo=1, hi=65535), 1024)
        tls = read_listener_tls(r, t.pop("tls"), f"{path}.tls") if "tls" in t else None
        r.unknown(t, path, ("address", "port", "backlog", "tls"))
        if (address, port) in seen:
            r.error(path, f"{address}:{port} is already listeners[{seen[(address, port)]}]")
        seen[(address, port)] = i
        out.append(Listener(address, port, backlog, tls))
    return tuple(out)


def _endpoint(r: cr.Reader, item: Any, path: str) -> Endpoint | None:
    if isinstance(item, str):
        addr, weight = item, 1
    elif isinstance(item, dict):
        t = dict(item)
        if "address" not in t:
            r.error(path, 'needs "address"')
            return None
        addr = t.pop("address")
        weight = r.take(t, "weight", path, lambda v: cr.integer(v, lo=1, hi=1000), 1)
        r.unknown(t, path, ("address", "weight"))
        if not isinstance(addr, str):
            r.error(cr.join(path, "address"), f'expected "host:port", got {addr!r}')
            return None
        path = cr.join(path, "address")
    else:
        r.error(path, f'expected "host:port" or a table with address and weight, got {item!r}')
        return None
    try:
        host, port = cr.parse_hostport(addr)
    except ValueError as e:
        r.error(path, str(e))
        return None
    return Endpoint(host, port, weight)


def _read_pool(r: cr.Reader, raw: Any, path: str) -> PoolConfig:
    t = r.table(raw, path)
    if t is None:
        return PoolConfig()
    d = PoolConfig()
    pool = PoolConfig(
        max_per_endpoint=r.take(
            t,
            "max_per_endpoint",
            path,
            lambda v: cr.integer(v, lo=1, hi=100000),
            d.max_per_endpoint,
        ),
        max_idle_per_endpoint=r.take(
            t,
            "max_idle_per_endpoint",
            path,
            lambda v: cr.integer(v, lo=0, hi=100000),
            d.max_idle_per_endpoint,
        ),
        idle_timeout=r.take(t, "idle_timeout", path, cr.duration, d.idle_timeout),
        max_requests=r.take(
            t, "max_requests", path, lambda v: cr.integer(v, lo=0, hi=1 << 40), d.max_requests
        ),
        queue_size=r.take(
            t, "queue_size", path, lambda v: cr.integer(v, lo=0, hi=1 << 20), d.queue_size
        ),
        queue_timeout=r.take(t, "queue_timeout", path, cr.duration, d.queue_timeout),
        max_streams_per_connection=r.take(
            t,
            "max_streams_per_connection",
            path,
            lambda v: cr.integer(v, lo=1, hi=1 << 31),
            d.max_streams_per_connection,
        ),
    )
    r.unknown(t, path, _POOL_KEYS)
    return pool


_DEST_KEYS = (
    "strategy",
    "endpoints",
    "host_header",
    "hash_key",
    "hash_balance_factor",
    "pool",
    "health",
    "outlier",
    "breaker",
    "tls",
    "protocol",
)

PROTOCOLS = ("http1.1", "h2", "h2c", "auto")
# What each protocol offers by ALPN when the destination has [tls].
_ALPN_OF = {"http1.1": ("http/1.1",), "h2": ("h2",), "auto": ("h2", "http/1.1")}


def _protocol(v: Any) -> str:
    s = cr.string(v)
    if s not in PROTOCOLS:
        raise cr.Bad(f"unknown protocol {s!r} (known: {', '.join(map(repr, PROTOCOLS))})")
    return s


def _hash_key(v: Any) -> str:
    s = cr.string(v)
    if s in ("client_ip", "path"):
        return s
    kind, _, name = s.partition(":")
    if kind in ("header", "cookie") and name:
        if kind == "header" and not cr.HEADER_NAME.match(name):
            raise cr.Bad(f"{name!r} is not a valid header name")
        return f"{kind}:{name.lower() if kind == 'header' else name}"
    raise cr.Bad(f'expected "client_ip", "path", "header:<name>" or "cookie:<name>", got {s!r}')


def _strategy(v: Any) -> str:
    s = cr.string(v)
    if s not in STRATEGIES:
        raise cr.Bad(f"unknown strategy {s!r} (known: {', '.join(STRATEGIES)})")
    return s


def _host_header(v: Any) -> str:
    s = cr.string(v)
    if s in ("pass", "endpoint"):
        return s
    try:
        _check_host_value(s)
    except ValueError as e:
        raise cr.Bad(f'expected "pass", "endpoint" or a host[:port] to send: {e}') from None
    return s


def _check_host_value(s: str) -> None:
    host, sep, port = s.rpartition(":") if not s.endswith("]") else (s, "", "")
    if not sep:
        host = s
    elif not port.isdigit():
        host = s
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])
    elif not cr.HOSTNAME.match(host):
        raise ValueError(f"{s!r} is not a valid host")


def _read_destinations(r: cr.Reader, raw: Any) -> dict[str, Destination]:
    t = r.table(raw, "destinations")
    if t is None:
        return {}
    out: dict[str, Destination] = {}
    for name, item in t.items():
        path = f"destinations.{name}"
        if not _NAME.match(name):
            r.error(path, "a destination name uses letters, digits, '_', '-', '.' (at most 64)")
        d = r.table(item, path)
        if d is None:
            continue
        strategy = r.take(d, "strategy", path, _strategy, "round_robin")
        host_header = r.take(d, "host_header", path, _host_header, "pass")
        has_hash_key = "hash_key" in d
        hash_key = r.take(d, "hash_key", path, _hash_key, None)
        factor = r.take(d, "hash_balance_factor", path, lambda v: cr.number(v, lo=0, hi=100), 1.25)
        if 0 < factor < 1:
            r.error(
                cr.join(path, "hash_balance_factor"),
                f"must be 0 (off) or at least 1, got {factor:g}",
            )
        pool = _read_pool(r, d.pop("pool"), f"{path}.pool") if "pool" in d else PoolConfig()
        health = read_health(r, d.pop("health"), f"{path}.health") if "health" in d else None
        outlier = read_outlier(r, d.pop("outlier"), f"{path}.outlier") if "outlier" in d else None
        breaker = read_breaker(r, d.pop("breaker"), f"{path}.breaker") if "breaker" in d else None
        protocol = r.take(d, "protocol", path, _protocol, "http1.1")
        if protocol == "h2" and "tls" not in d:
            r.error(
                cr.join(path, "protocol"),
                f'"h2" is HTTP/2 over TLS and needs [{path}.tls]; '
                'use "h2c" for cleartext HTTP/2 (prior knowledge)',
            )
        if protocol == "h2c" and "tls" in d:
            r.error(
                cr.join(path, "protocol"),
                f'"h2c" is cleartext HTTP/2; with [{path}.tls] use "h2" (or "auto")',
            )
        alpn = _ALPN_OF.get(protocol, ("http/1.1",))
        tls = read_upstream_tls(r, d.pop("tls"), f"{path}.tls", alpn) if "tls" in d else None
        eps: list[Endpoint] = []
        if "endpoints" not in d:
            r.error(path, 'needs "endpoints"')
        else:
            raw_eps = d.pop("endpoints")
            if not isinstance(raw_eps, list) or not raw_eps:
                r.error(f"{path}.endpoints", 'expected a non-empty list of "host:port"')
            else:
                seen: dict[tuple[str, int], int] = {}
                for i, item_ep in enumerate(raw_eps):
                    ep = _endpoint(r, item_ep, f"{path}.endpoints[{i}]")
                    if ep is None:
                        continue
                    if (ep.host, ep.port) in seen:
                        r.error(
                            f"{path}.endpoints[{i}]",
                            f"{ep.authority} is already endpoints[{seen[(ep.host, ep.port)]}]",
                        )
                    seen[(ep.host, ep.port)] = i
                    eps.append(ep)
        r.unknown(d, path, _DEST_KEYS)
        if strategy == "consistent_hash" and not has_hash_key:
            r.error(path, 'strategy "consistent_hash" needs "hash_key"')
        if strategy != "consistent_hash" and hash_key is not None:
            r.error(
                f"{path}.hash_key", f'only used with strategy "consistent_hash", not {strategy!r}'
            )
        out[name] = Destination(
            name,
            tuple(eps),
            strategy,
            host_header,
            hash_key,
            factor,
            pool,
            health,
            outlier,
            breaker,
            tls,
            protocol,
        )
    return out


_ROUTE_KEYS = (
    "name",
    "host",
    "path_prefix",
    "methods",
    "destination",
    "strip_prefix",
    "rewrite_prefix",
    "timeouts",
    "max_body_bytes",
    "middleware",
    "retry",
    "rate_limit",
    "authorize",
    "jwt_svid",
    "upstream_jwt_svid",
    "metrics_principal",
)


def _route_host(v: Any) -> str:
    s = (
        cr.string(v).lower().rstrip(".")
    )  # "example.com." is the same host; requests match without it
    if s.startswith("*."):
        if not cr.HOSTNAME.match(s[2:]):
            raise cr.Bad(f'{v!r} is not a host name or "*.suffix"')
        return s
    if re.search(r":\d*$", s) and not s.endswith("]"):
        raise cr.Bad(f"{v!r}: a route host has no port (routes match the host on any port)")
    try:
        _check_host_value(s)
    except ValueError:
        raise cr.Bad(f'{v!r} is not a host name or "*.suffix"') from None
    return s


def _path_prefix(v: Any) -> str:
    s = cr.string(v)
    if not s.startswith("/"):
        raise cr.Bad(f'must start with "/", got {s!r}')
    if any(c in s for c in "?#") or not s.isascii() or any(c <= " " or c == "\x7f" for c in s):
        raise cr.Bad(
            f"a path prefix has no query, fragment, space, control or non-ASCII character: {s!r}"
        )
    return s


def _methods(v: Any) -> frozenset[str]:
    if not isinstance(v, list) or not v:
        raise cr.Bad('expected a non-empty list of methods like ["GET", "POST"]')
    out = set()
    for m in v:
        if not isinstance(m, str) or not re.match(r"^[A-Z][A-Z0-9_-]*\Z", m):
            raise cr.Bad(f"{m!r} is not an HTTP method (upper case token)")
        if m == "CONNECT":
            raise cr.Bad("CONNECT is not proxied (weft answers it with 405)")
        out.add(m)
    return frozenset(out)


def _middleware(r: cr.Reader, raw: Any, path: str) -> tuple[MiddlewareSpec, ...]:
    if not isinstance(raw, list):
        r.error(path, 'expected a list of "module:factory" strings or {use = ...} tables')
        return ()
    out = []
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        if isinstance(item, str):
            use, conf = item, {}
        elif isinstance(item, dict) and isinstance(item.get("use"), str):
            conf = dict(item)
            use = conf.pop("use")
        else:
            r.error(p, 'expected "module:factory" or a table with use = "module:factory"')
            continue
        if not _IMPORT_PATH.match(use):
            r.error(p, f'expected an import path "package.module:factory", got {use!r}')
            continue
        out.append(MiddlewareSpec(use, conf))
    return tuple(out)


def _read_routes(
    r: cr.Reader, raw: Any, timeouts: Timeouts, limits: Limits
) -> list[tuple[int, Route, bool]]:
    """Each route with its index in the file and whether it was read without a mistake."""
    if not isinstance(raw, list) or not raw:
        r.error("routes", "expected at least one [[routes]] table")
        return []
    out = []
    for i, item in enumerate(raw):
        path = f"routes[{i}]"
        t = r.table(item, path)
        if t is None:
            continue
        errors_before = len(r.errors)
        name = r.take(t, "name", path, cr.string, f"route{i}")
        if not _NAME.match(name):
            r.error(f"{path}.name", "a route name uses letters, digits, '_', '-', '.' (at most 64)")
        if "destination" not in t:
            r.error(path, 'needs "destination"')
        dest = r.take(t, "destination", path, cr.string, "")
        host = r.take(t, "host", path, _route_host, None)
        prefix = r.take(t, "path_prefix", path, _path_prefix, "/")
        methods = r.take(t, "methods", path, _methods, None)
        strip = r.take(t, "strip_prefix", path, cr.boolean, False)
        rewrite = r.take(t, "rewrite_prefix", path, _path_prefix, None)
        if strip and rewrite is not None:
            r.error(path, "use either strip_prefix or rewrite_prefix, not both")
        rt = (
            _read_timeouts(r, t.pop("timeouts"), f"{path}.timeouts", timeouts, ROUTE_TIMEOUTS)
            if "timeouts" in t
            else timeouts
        )
        body = r.take(
            t, "max_body_bytes", path, lambda v: cr.size(v, lo=0, hi=1 << 50), limits.max_body_bytes
        )
        mws = _middleware(r, t.pop("middleware"), f"{path}.middleware") if "middleware" in t else ()
        retry = (
            read_retry(r, t.pop("retry"), f"{path}.retry", rt.request_total)
            if "retry" in t
            else None
        )
        limits_ = (
            read_rate_limits(r, t.pop("rate_limit"), f"{path}.rate_limit")
            if "rate_limit" in t
            else ()
        )
        authorize = (
            read_authorize(r, t.pop("authorize"), f"{path}.authorize") if "authorize" in t else ()
        )
        jwt_svid = (
            read_jwt_svid(r, t.pop("jwt_svid"), f"{path}.jwt_svid") if "jwt_svid" in t else None
        )
        upstream_jwt = (
            read_upstream_jwt_svid(r, t.pop("upstream_jwt_svid"), f"{path}.upstream_jwt_svid")
            if "upstream_jwt_svid" in t
            else None
        )
        by_principal = r.take(t, "metrics_principal", path, cr.boolean, False)
        r.unknown(t, path, _ROUTE_KEYS)
        route = Route(
            name,
            dest,
            host,
            prefix,
            methods,
            strip,
            rewrite,
            rt,
            body,
            mws,
            retry,
            limits_,
            authorize,
            jwt_svid,
            upstream_jwt,
            by_principal,
        )
        out.append((i, route, len(r.errors) == errors_before))
    return out


_TOP_KEYS = (
    "server",
    "listeners",
    "limits",
    "timeouts",
    "access_log",
    "upstream",
    "destinations",
    "routes",
    "admin",
    "metrics",
    "rate_limit_backend",
    "buffers",
    "spiffe",
)
_SERVER_KEYS = (
    "instance",
    "workers",
    "boot_timeout",
    "heartbeat_timeout",
    "via",
    "request_id_header",
    "trusted_proxies",
)


def _instance(v: Any) -> str:
    s = cr.string(v)
    if not re.match(r"^[A-Za-z0-9_-]{1,32}\Z", s):
        raise cr.Bad(f"an instance name is 1-32 of letters, digits, '_', '-', got {s!r}")
    return s


def _token(v: Any) -> str:
    s = cr.string(v)
    if not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z", s):
        raise cr.Bad(f"expected a token (no spaces or separators), got {s!r}")
    return s


# An admin token is a bearer secret: at least this long so that it cannot be guessed (128 bits
# of hex, base64 or a passphrase; `openssl rand -hex 16` makes one).
ADMIN_TOKEN_MIN = 16


def _read_admin(r: cr.Reader, raw: Any, listeners: tuple[Listener, ...]) -> Admin:
    t = r.table(raw, "admin")
    if t is None:
        return Admin()
    if "port" not in t:
        r.error("admin", 'needs "port" (the admin listener is off without an [admin] table)')
    address = r.take(t, "address", "admin", cr.ip, "127.0.0.1")
    port = r.take(t, "port", "admin", cr.port, None)
    token = r.take(t, "token", "admin", _admin_token, None)
    r.unknown(t, "admin", ("address", "port", "token"))
    if token is None and not ipaddress.ip_address(address).is_loopback:
        r.error(
            "admin.address",
            f'"{address}" is not a loopback address: the admin endpoints show the whole '
            'instance, so set admin.token (every request then needs "Authorization: Bearer '
            '<token>") or bind 127.0.0.1',
        )
    for i, lst in enumerate(listeners):
        if port is not None and lst.port == port and lst.address == address:
            r.error("admin.port", f"{address}:{port} is already listeners[{i}]")
    return Admin(address, port, token)


def _admin_token(v: Any) -> str:
    s = cr.string(v)
    if len(s) < ADMIN_TOKEN_MIN or not re.match(r"^[A-Za-z0-9._~+/=-]+\Z", s):
        raise cr.Bad(
            f"expected at least {ADMIN_TOKEN_MIN} characters of letters, digits and "
            "'._~+/=-' (e.g. the output of `openssl rand -hex 16`)"
        )
    return s


def from_dict(data: dict[str, Any], source: str, digest: str = "") -> Config:
    """Validate a parsed TOML document. Raises ConfigError listing every mistake."""
    r = cr.Reader(source)
    top = dict(data)
    server = r.table(top.pop("server", {}), "server") or {}
    instance = r.take(server, "instance", "server", _instance, "default")
    workers = r.take(server, "workers", "server", lambda v: cr.integer(v, lo=0, hi=256), 0)
    boot_timeout = r.take(server, "boot_timeout", "server", cr.duration, 30.0)
    heartbeat_timeout = r.take(server, "heartbeat_timeout", "server", cr.duration, 20.0)
    via = r.take(server, "via", "server", _token, "weft")
    rid = r.take(server, "request_id_header", "server", lambda v: _token(v).lower(), "x-request-id")
    trusted: list[Any] = []
    if "trusted_proxies" in server:
        raw = server.pop("trusted_proxies")
        if not isinstance(raw, list):
            r.error("server.trusted_proxies", "expected a list of CIDRs")
        else:
            for i, c in enumerate(raw):
                try:
                    trusted.append(cr.cidr(c))
                except cr.Bad as e:
                    r.error(f"server.trusted_proxies[{i}]", str(e))
    r.unknown(server, "server", _SERVER_KEYS)

    listeners = _read_listeners(r, top.pop("listeners", None))
    limits = _read_limits(r, top.pop("limits")) if "limits" in top else Limits()
    timeouts = (
        _read_timeouts(r, top.pop("timeouts"), "timeouts", Timeouts(), _TIMEOUT_KEYS)
        if "timeouts" in top
        else Timeouts()
    )
    # drain_idle above drain is allowed: the drain deadline bounds every connection anyway, and
    # refusing it would refuse the default drain_idle for any short drain.
    al = r.table(top.pop("access_log", {}), "access_log") or {}
    access_log = AccessLog(
        enabled=r.take(al, "enabled", "access_log", cr.boolean, True),
        path=r.take(al, "path", "access_log", cr.string, "-"),
    )
    r.unknown(al, "access_log", ("enabled", "path"))
    up = r.table(top.pop("upstream", {}), "upstream") or {}
    up_max = r.take(
        up, "max_connections", "upstream", lambda v: cr.integer(v, lo=1, hi=1 << 20), 4096
    )
    r.unknown(up, "upstream", ("max_connections",))
    admin = _read_admin(r, top.pop("admin"), listeners) if "admin" in top else Admin()
    mt = r.table(top.pop("metrics", {}), "metrics") or {}
    metrics = Metrics(enabled=r.take(mt, "enabled", "metrics", cr.boolean, True))
    r.unknown(mt, "metrics", ("enabled",))
    rl_backend = (
        read_rate_limit_backend(r, top.pop("rate_limit_backend"), "rate_limit_backend")
        if "rate_limit_backend" in top
        else None
    )
    buffers = read_buffers(r, top.pop("buffers")) if "buffers" in top else Buffers()
    spiffe = read_spiffe(r, top.pop("spiffe")) if "spiffe" in top else None
    dests = _read_destinations(r, top.pop("destinations", None)) if "destinations" in top else {}
    if not dests:
        r.error("destinations", "expected at least one [destinations.<name>] table")
    read_routes = _read_routes(r, top.pop("routes", None), timeouts, limits)
    routes = tuple(route for _, route, _ in read_routes)
    r.unknown(top, "", _TOP_KEYS)
    check_references(
        r, spiffe, listeners, dests, [(i, rt) for i, rt, _ in read_routes], boot_timeout
    )

    known = ", ".join(f'"{n}"' for n in dests)
    names: dict[str, int] = {}
    keys: dict[tuple[str | None, str, frozenset[str] | None], int] = {}
    for i, route, clean in read_routes:
        if route.destination and route.destination not in dests:
            r.error(
                f"routes[{i}].destination",
                f'unknown destination "{route.destination}" (known: {known or "none"})',
            )
        if route.name in names:
            r.error(f"routes[{i}].name", f'"{route.name}" is already routes[{names[route.name]}]')
        names[route.name] = i
        key = (route.host, route.path_prefix, route.methods)
        if not clean:
            continue  # a refused value fell back to a default: comparing it would mislead
        if key in keys:
            r.error(
                f"routes[{i}]",
                f"matches exactly what routes[{keys[key]}] matches (host, "
                "path_prefix and methods); it could never be chosen",
            )
        keys[key] = i
    if r.errors:
        raise ConfigError(r.errors)
    return Config(
        listeners=listeners,
        destinations=dests,
        routes=routes,
        instance=instance,
        workers=workers,
        boot_timeout=boot_timeout,
        heartbeat_timeout=heartbeat_timeout,
        via=via,
        request_id_header=rid,
        trusted_proxies=tuple(trusted),
        limits=limits,
        timeouts=timeouts,
        access_log=access_log,
        upstream_max_connections=up_max,
        admin=admin,
        metrics=metrics,
        rate_limit_backend=rl_backend or RateLimitBackend(),
        buffers=buffers,
        spiffe=spiffe,
        source=source,
        hash=digest,
    )


def load(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError with every mistake (an unreadable
    file is one of them)."""
    p = Path(path)
    name = str(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError([f"{name}: cannot read: {e.strerror or e}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError([f"{name}: not UTF-8 text: {e.reason} at byte {e.start}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{name}: TOML syntax: {e}"]) from None
    return from_dict(data, name, hashlib.sha256(raw).hexdigest()[:16])


def quick(
    listen: str,
    upstreams: list[str],
    *,
    access_log: bool = True,
    instance: str = "default",
    admin: str | None = None,
) -> Config:
    """Quick mode (`weft run --listen A --upstream B ...`): one route, round robin; `admin`
    is the ``--admin HOST:PORT`` of the admin listener."""
    errors = []
    try:
        lhost, lport = cr.parse_hostport(listen)
        ipaddress.ip_address(lhost)
    except ValueError as e:
        errors.append(f"--listen: {e}")
        lhost, lport = "127.0.0.1", 0
    if not upstreams:
        errors.append("--upstream: give at least one upstream host:port")
    eps = []
    for u in upstreams:
        try:
            eps.append(list(cr.parse_hostport(u)))
        except ValueError as e:
            errors.append(f"--upstream {u}: {e}")
    admin_table: dict[str, Any] | None = None
    if admin is not None:
        try:
            ahost, aport = cr.parse_hostport(admin)
            ipaddress.ip_address(ahost)
            admin_table = {"address": ahost, "port": aport}
        except ValueError as e:
            errors.append(f"--admin: {e}")
    if errors:
        raise ConfigError(errors)
    data: dict[str, Any] = {
        "listeners": [{"address": lhost, "port": lport}],
        "destinations": {"upstream": {"endpoints": [Endpoint(h, p).authority for h, p in eps]}},
        "routes": [{"name": "default", "destination": "upstream"}],
        "access_log": {"enabled": access_log},
        "server": {"instance": instance},
    }
    if admin_table is not None:
        data["admin"] = admin_table
    digest = hashlib.sha256(
        repr((listen, upstreams, access_log, instance, admin)).encode()
    ).hexdigest()[:16]
    return from_dict(data, "<quick mode>", digest)
