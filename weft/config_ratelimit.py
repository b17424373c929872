"""The config of rate limits: ``[[routes.rate_limit]]`` entries and ``[limits.rate_table]``.

`weft.config` hands the tables here; this module owns their keys, ranges and the reasons a
user reads when one is wrong (`weft.backpressure` decides what the values mean). A route may
have several entries, and all of them must admit a request.

``key = "principal"`` keys on the request's SPIFFE ID (``request.ctx["principal"]``), which
only a config with ``[spiffe]`` establishes: `weft.config_spiffe.check_references` refuses it
without one, at the key's path.

Refused with a reason rather than accepted and ignored:

* Keys of the other algorithm (``burst`` on a leaky bucket, ``queue``/``nodelay`` on a token
  bucket): they would do nothing.
"""

from __future__ import annotations

import re
from typing import Any

from weft import confread as cr
from weft.schema import RateLimit, RateLimitBackend, RateTable

__all__ = ["read_rate_limit_backend", "read_rate_limits", "read_rate_table"]

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h)\s*$")
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
ALGORITHMS = ("token_bucket", "leaky_bucket")
_KEYS = ("key", "algorithm", "rate", "burst", "queue", "nodelay", "status", "backend")


def parse_rate(v: Any) -> tuple[int, float]:
    """``"100/s"`` -> (100, 1.0); also ``/m`` and ``/h``."""
    m = _RATE.match(v) if isinstance(v, str) else None
    if m is None:
        raise cr.Bad(f'expected a rate like "100/s", "20/m" or "500/h", got {v!r}')
    count = int(m.group(1))
    if not 1 <= count <= 10_000_000:
        raise cr.Bad(f"the count must be between 1 and 10000000, got {count}")
    return count, _PER[m.group(2)]


def _key(v: Any) -> str:
    s = cr.string(v)
    if s in ("client_ip", "route", "principal"):
        return s
    kind, _, name = s.partition(":")
    if kind == "header" and name and cr.HEADER_NAME.match(name):
        return f"header:{name.lower()}"
    raise cr.Bad(f'expected "client_ip", "route", "principal" or "header:<name>", got {s!r}')


def _algorithm(v: Any) -> str:
    s = cr.string(v)
    if s not in ALGORITHMS:
        raise cr.Bad(f"unknown algorithm {s!r} (known: {', '.join(ALGORITHMS)})")
    return s


def _status(v: Any) -> int:
    n = cr.integer(v, lo=100, hi=599)
    if n not in (429, 503):
        raise cr.Bad(f"expected 429 or 503, got {n}")
    return n


def _backend(v: Any) -> str:
    return cr.one_of(v, ("local", "redis"))


def read_rate_limits(r: cr.Reader, raw: Any, path: str) -> tuple[RateLimit, ...]:
    if isinstance(raw, dict):
        raw = [raw]  # [routes.rate_limit] written as one table
    if not isinstance(raw, list):
        r.error(path, "expected [[routes.rate_limit]] tables")
        return ()
    out = []
    d = RateLimit()
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        t = r.table(item, p)
        if t is None:
            continue
        if "rate" not in t:
            r.error(p, 'needs "rate", like "100/s"')
        algorithm = r.take(t, "algorithm", p, _algorithm, d.algorithm)
        leaky = algorithm == "leaky_bucket"
        for key in ("queue", "nodelay") if not leaky else ("burst",):
            if key in t:
                t.pop(key)
                r.error(
                    cr.join(p, key),
                    "only used with algorithm = "
                    + ('"token_bucket"' if leaky else '"leaky_bucket"'),
                )
        count, per = r.take(t, "rate", p, parse_rate, (d.count, d.per))
        limit = RateLimit(
            key=r.take(t, "key", p, _key, d.key),
            algorithm=algorithm,
            count=count,
            per=per,
            burst=r.take(t, "burst", p, lambda v: cr.integer(v, lo=0, hi=1 << 24), d.burst)
            if not leaky
            else 0,
            queue=r.take(t, "queue", p, lambda v: cr.integer(v, lo=0, hi=1 << 20), 0),
            nodelay=r.take(t, "nodelay", p, cr.boolean, False),
            status=r.take(t, "status", p, _status, d.status),
            backend=r.take(t, "backend", p, _backend, d.backend),
        )
        r.unknown(t, p, _KEYS)
        out.append(limit)
    return tuple(out)


def read_rate_table(r: cr.Reader, raw: Any, path: str) -> RateTable:
    t = r.table(raw, path)
    if t is None:
        return RateTable()
    d = RateTable()

    table = RateTable(
        capacity=r.take(
            t, "capacity", path, lambda v: cr.integer(v, lo=16, hi=1 << 24), d.capacity
        ),
        on_full=r.take(t, "on_full", path, lambda v: cr.one_of(v, ("allow", "deny")), d.on_full),
    )
    r.unknown(t, path, ("capacity", "on_full"))
    return table


def read_rate_limit_backend(r: cr.Reader, raw: Any, path: str) -> RateLimitBackend:
    t = r.table(raw, path)
    if t is None:
        return RateLimitBackend()
    d = RateLimitBackend()

    def url(v: Any) -> str:
        from weft.redis_limiter import parse_url

        s = cr.string(v)
        try:
            parse_url(s)
        except ValueError as e:
            raise cr.Bad(str(e)) from None
        return s

    backend = RateLimitBackend(
        url=r.take(t, "url", path, url, d.url),
        timeout=r.take(t, "timeout", path, cr.duration, d.timeout),
        on_error=r.take(t, "on_error", path, lambda v: cr.one_of(v, ("allow", "deny")), d.on_error),
    )
    r.unknown(t, path, ("url", "timeout", "on_error"))
    return backend
