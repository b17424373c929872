"""The building blocks of the config reader: value parsers and the error-collecting reader.

`weft.config` reads weft's sections with these; the later sections (health, breaker, retries,
rate limits, TLS, SPIFFE) use the same ones, so that every duration, size and address in the
file is written and refused the same way. A parser returns the value or raises `Bad` with the
reason a user reads; `Reader.take` turns that into ``<file>: <key path>: <reason>`` and goes on,
so one run reports every mistake of a file.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable
from typing import Any

# ---------------------------------------------------------------------------------------------
# Value parsers: each returns the value or raises Bad with the reason.


class Bad(Exception):
    pass


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "k": 1024,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}
# RFC 9110 section 5.1: a field name is a token.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
HOSTNAME = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?\Z"
)


def duration(v: Any, *, allow_zero: bool = False, max_s: float = 86400.0) -> float:
    if isinstance(v, bool):
        raise Bad(f'expected a duration like "10s" or "250ms", got {v!r}')
    if isinstance(v, (int, float)):
        secs = float(v)
    elif isinstance(v, str):
        m = _DURATION.match(v)
        if not m:
            raise Bad(f'expected a duration like "10s" or "250ms", got {v!r}')
        secs = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise Bad(f'expected a duration like "10s" or "250ms", got {type(v).__name__}')
    if secs < 0 or (secs == 0 and not allow_zero):
        raise Bad(f"must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    if secs > max_s:
        raise Bad(f"must be at most {max_s:g}s, got {v!r}")
    return secs


def size(v: Any, *, lo: int = 1, hi: int = 1 << 40) -> int:
    if isinstance(v, bool):
        raise Bad(f'expected a size like 8192 or "8KiB", got {v!r}')
    if isinstance(v, int):
        n = v
    elif isinstance(v, str):
        m = _SIZE.match(v)
        if not m:
            raise Bad(f'expected a size like 8192 or "8KiB", got {v!r}')
        n = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise Bad(f'expected a size like 8192 or "8KiB", got {type(v).__name__}')
    if not lo <= n <= hi:
        raise Bad(f"must be between {lo} and {hi} bytes, got {v!r}")
    return n


def integer(v: Any, *, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise Bad(f"expected an integer, got {v!r}")
    if not lo <= v <= hi:
        raise Bad(f"must be between {lo} and {hi}, got {v}")
    return v


def number(v: Any, *, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Bad(f"expected a number, got {v!r}")
    if not lo <= v <= hi:
        raise Bad(f"must be between {lo:g} and {hi:g}, got {v}")
    return float(v)


def one_of(v: Any, choices: tuple[str, ...]) -> str:
    """A string that must be one of `choices` (quoted in the reason when it is not)."""
    s = string(v)
    if s not in choices:
        known = " or ".join(f'"{c}"' for c in choices)
        raise Bad(f"expected {known}, got {s!r}")
    return s


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Bad(f"expected true or false, got {v!r}")
    return v


def string(v: Any) -> str:
    if not isinstance(v, str):
        raise Bad(f"expected a string, got {type(v).__name__}")
    return v


def ip(v: Any) -> str:
    s = string(v)
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise Bad(f"expected an IPv4 or IPv6 address, got {s!r}") from None


def port(v: Any) -> int:
    return integer(v, lo=1, hi=65535)


def parse_hostport(s: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raises ValueError with a reason."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)\Z", s) or re.match(r"^([^:\[\]]+):(\d+)\Z", s)
    if not m:
        raise ValueError(f'expected "host:port" (IPv6 as "[::1]:port"), got {s!r}')
    host, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not HOSTNAME.match(host):
            raise ValueError(f"not a valid host name or address: {host!r}") from None
    return host, port


# ---------------------------------------------------------------------------------------------
# The tree walk.


class Reader:
    """Collects errors while reading tables; `take` pops a key and converts it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []

    def error(self, path: str, reason: str) -> None:
        self.errors.append(
            f"{self.source}: {path}: {reason}" if path else f"{self.source}: {reason}"
        )

    def table(self, v: Any, path: str) -> dict[str, Any] | None:
        if not isinstance(v, dict):
            self.error(path, f"expected a table, got {type(v).__name__}")
            return None
        return dict(v)

    def take(
        self, t: dict[str, Any], key: str, path: str, conv: Callable[[Any], Any], default: Any
    ) -> Any:
        if key not in t:
            return default
        raw = t.pop(key)
        try:
            return conv(raw)
        except Bad as e:
            self.error(join(path, key), str(e))
            return default

    def unknown(self, t: dict[str, Any], path: str, known: tuple[str, ...]) -> None:
        for key in t:
            hint = _close_match(key, known)
            self.error(
                join(path, key), "unknown key" + (f' (did you mean "{hint}"?)' if hint else "")
            )


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _close_match(key: str, known: tuple[str, ...]) -> str | None:
    m = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return m[0] if m else None


def cidr(v: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    s = string(v)
    try:
        return ipaddress.ip_network(s, strict=False)
    except ValueError:
        raise Bad(f'expected a CIDR like "10.0.0.0/8", got {s!r}') from None
