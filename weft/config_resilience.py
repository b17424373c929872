"""The config sections of health, outlier detection, the circuit breaker and retries.

`weft.config` reads the file's tree and hands each of these tables here; this module owns their
keys, ranges, defaults (`weft.schema`) and the *contradictions* between keys that `weft check`
must report: a value each key accepts on its own but that makes no sense beside another one
(``backoff_base`` above ``backoff_max``, a probe ``timeout`` no shorter than its ``interval``,
``attempts = 0``). Kept apart from `weft.config` because that module is already the size of one
concern, and because these four sections change together with the modules they configure.
"""

from __future__ import annotations

import re
from typing import Any

from weft import confread as cr
from weft.adaptive import BUCKETS
from weft.retry import RetryOn
from weft.schema import BreakerConfig, HealthCheck, OutlierConfig, RetryPolicy

__all__ = ["read_breaker", "read_health", "read_outlier", "read_retry"]

# The health word saturates its runs at 255 (`weft.health`); a threshold above it never fires.
_THRESHOLD_MAX = 255
_STATUS_RANGE = re.compile(r"^\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?$")


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(cls.__dataclass_fields__)  # type: ignore[attr-defined]


def _percent(v: Any) -> float:
    return cr.number(v, lo=0, hi=100)


def _probe_path(v: Any) -> str:
    s = cr.string(v)
    if not s.startswith("/") or any(c in s for c in " \t\r\n#"):
        raise cr.Bad(f'expected a path starting with "/" (with an optional query), got {s!r}')
    return s


def _header_name(v: Any) -> str:
    s = cr.string(v)
    if not cr.HEADER_NAME.match(s):
        raise cr.Bad(f"{s!r} is not a valid header name")
    return s.lower()


def _statuses(v: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(v, list) or not v:
        raise cr.Bad('expected a non-empty list of statuses or ranges, like ["200-399"]')
    out = []
    for item in v:
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        m = _STATUS_RANGE.match(text) if isinstance(text, str) else None
        if m is None:
            raise cr.Bad(f'expected a status like 200 or a range like "200-399", got {item!r}')
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
        if not 100 <= lo <= hi <= 599:
            raise cr.Bad(f"{item!r} is not a range of statuses within 100-599")
        out.append((lo, hi))
    return tuple(out)


def read_health(r: cr.Reader, raw: Any, path: str) -> HealthCheck | None:
    t = r.table(raw, path)
    if t is None:
        return None
    d = HealthCheck()
    threshold = lambda v: cr.integer(v, lo=1, hi=_THRESHOLD_MAX)  # noqa: E731
    h = HealthCheck(
        path=r.take(t, "path", path, _probe_path, d.path),
        interval=r.take(t, "interval", path, cr.duration, d.interval),
        timeout=r.take(t, "timeout", path, cr.duration, d.timeout),
        healthy_threshold=r.take(t, "healthy_threshold", path, threshold, d.healthy_threshold),
        unhealthy_threshold=r.take(
            t, "unhealthy_threshold", path, threshold, d.unhealthy_threshold
        ),
        expected_statuses=r.take(t, "expected_statuses", path, _statuses, d.expected_statuses),
        degraded_latency=r.take(
            t, "degraded_latency", path, lambda v: cr.duration(v, allow_zero=True), 0.0
        ),
        degraded_header=r.take(t, "degraded_header", path, _header_name, d.degraded_header),
    )
    r.unknown(t, path, _keys(HealthCheck))
    if h.timeout >= h.interval:
        # Probes would overlap: the next one starts before the last one may have ended.
        r.error(
            cr.join(path, "timeout"),
            f"{h.timeout:g}s must be shorter than interval ({h.interval:g}s)",
        )
    if h.degraded_latency and h.degraded_latency >= h.timeout:
        r.error(
            cr.join(path, "degraded_latency"),
            f"{h.degraded_latency:g}s is not below timeout ({h.timeout:g}s): a probe that slow "
            "fails, it is never degraded",
        )
    return h


def read_outlier(r: cr.Reader, raw: Any, path: str) -> OutlierConfig | None:
    t = r.table(raw, path)
    if t is None:
        return None
    d = OutlierConfig()
    run = lambda v: cr.integer(v, lo=0, hi=_THRESHOLD_MAX)  # noqa: E731
    o = OutlierConfig(
        consecutive_5xx=r.take(t, "consecutive_5xx", path, run, d.consecutive_5xx),
        consecutive_gateway_errors=r.take(
            t, "consecutive_gateway_errors", path, run, d.consecutive_gateway_errors
        ),
        base_ejection=r.take(t, "base_ejection", path, cr.duration, d.base_ejection),
        max_ejection=r.take(t, "max_ejection", path, cr.duration, d.max_ejection),
        max_ejection_percent=r.take(
            t, "max_ejection_percent", path, _percent, d.max_ejection_percent
        ),
        panic_threshold=r.take(t, "panic_threshold", path, _percent, d.panic_threshold),
        slow_start=r.take(
            t, "slow_start", path, lambda v: cr.duration(v, allow_zero=True), d.slow_start
        ),
    )
    r.unknown(t, path, _keys(OutlierConfig))
    if o.base_ejection > o.max_ejection:
        r.error(
            cr.join(path, "base_ejection"),
            f"{o.base_ejection:g}s is longer than max_ejection ({o.max_ejection:g}s)",
        )
    # Both runs at 0 is allowed: the section then carries only panic_threshold and slow_start
    # for a destination whose endpoints only active probes take out.
    return o


def read_breaker(r: cr.Reader, raw: Any, path: str) -> BreakerConfig | None:
    t = r.table(raw, path)
    if t is None:
        return None
    d = BreakerConfig()
    b = BreakerConfig(
        failure_rate=r.take(t, "failure_rate", path, lambda v: cr.number(v, lo=1, hi=100), 50.0),
        minimum_calls=r.take(
            t, "minimum_calls", path, lambda v: cr.integer(v, lo=1, hi=1 << 20), d.minimum_calls
        ),
        window=r.take(t, "window", path, cr.duration, d.window),
        open_for=r.take(t, "open_for", path, cr.duration, d.open_for),
        max_open_for=r.take(t, "max_open_for", path, cr.duration, d.max_open_for),
    )
    r.unknown(t, path, _keys(BreakerConfig))
    if b.window * 1000 < BUCKETS:
        r.error(cr.join(path, "window"), f"must be at least {BUCKETS}ms ({BUCKETS} buckets)")
    if b.open_for > b.max_open_for:
        r.error(
            cr.join(path, "open_for"),
            f"{b.open_for:g}s is longer than max_open_for ({b.max_open_for:g}s)",
        )
    return b


def _retry_on(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise cr.Bad('expected a non-empty list, like ["connect_error", "reset", "503"]')
    try:
        RetryOn.parse(v)
    except ValueError as e:
        raise cr.Bad(str(e)) from None
    return tuple(str(i).strip().lower() for i in v)


def read_retry(r: cr.Reader, raw: Any, path: str, request_total: float) -> RetryPolicy | None:
    """`request_total` is the route's own: a per-try timeout must fit in it."""
    t = r.table(raw, path)
    if t is None:
        return None
    d = RetryPolicy()
    p = RetryPolicy(
        attempts=r.take(t, "attempts", path, lambda v: cr.integer(v, lo=1, hi=16), d.attempts),
        on=r.take(t, "on", path, _retry_on, d.on),
        backoff_base=r.take(
            t, "backoff_base", path, lambda v: cr.duration(v, allow_zero=True), d.backoff_base
        ),
        backoff_max=r.take(
            t, "backoff_max", path, lambda v: cr.duration(v, allow_zero=True), d.backoff_max
        ),
        per_try_timeout=r.take(
            t, "per_try_timeout", path, lambda v: cr.duration(v, allow_zero=True), 0.0
        ),
        budget_percent=r.take(t, "budget_percent", path, _percent, d.budget_percent),
        budget_min_per_second=r.take(
            t,
            "budget_min_per_second",
            path,
            lambda v: cr.number(v, lo=0, hi=1e6),
            d.budget_min_per_second,
        ),
        buffer_body=r.take(
            t, "buffer_body", path, lambda v: cr.size(v, lo=0, hi=64 << 20), d.buffer_body
        ),
    )
    r.unknown(t, path, _keys(RetryPolicy))
    if p.backoff_base > p.backoff_max:
        r.error(
            cr.join(path, "backoff_base"),
            f"{p.backoff_base:g}s is longer than backoff_max ({p.backoff_max:g}s)",
        )
    if p.per_try_timeout and request_total and p.per_try_timeout >= request_total:
        r.error(
            cr.join(path, "per_try_timeout"),
            f"{p.per_try_timeout:g}s is not below the route's request_total "
            f"({request_total:g}s): it would never end a try",
        )
    if p.budget_percent == 0 and p.budget_min_per_second == 0:
        r.error(
            path,
            "budget_percent and budget_min_per_second are both 0: no retry could ever be "
            "sent (set attempts = 1 to turn retries off)",
        )
    return p
