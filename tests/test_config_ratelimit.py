"""The rate-limit config (`weft.config_ratelimit`): values, defaults, and one precise message
per mistake, including principal keys, refused without a [spiffe] table that gives requests
one (the accepted case is in test_config_spiffe.py)."""

from __future__ import annotations

import pytest
from support.config import MINIMAL_CONFIG
from support.config import load_text as load

from weft.schema import ConfigError, RateLimit, RateTable


def test_entries_are_read_in_order_with_their_units(tmp_path):
    cfg = load(tmp_path, MINIMAL_CONFIG + """
[[routes.rate_limit]]
rate = "50/s"
burst = 10
[[routes.rate_limit]]
key = "header:X-User"
algorithm = "leaky_bucket"
rate = "30/m"
queue = 5
nodelay = true
status = 503
[limits.rate_table]
capacity = 1024
on_full = "deny"
""")
    a, b = cfg.routes[0].rate_limits
    assert a == RateLimit(key="client_ip", count=50, per=1.0, burst=10)
    assert a.interval_ns == 20_000_000
    assert b == RateLimit(key="header:x-user", algorithm="leaky_bucket", count=30, per=60.0,
                          burst=0, queue=5, nodelay=True, status=503)
    assert cfg.limits.rate_table == RateTable(capacity=1024, on_full="deny")


def test_no_entry_means_no_limit_and_the_table_has_its_defaults(tmp_path):
    cfg = load(tmp_path, MINIMAL_CONFIG)
    assert cfg.routes[0].rate_limits == ()
    assert cfg.limits.rate_table == RateTable(capacity=65536, on_full="allow")


MISTAKES = [
    ('rate = "5/x"', "rate", "a rate like"),
    ("burst = 3", "rate", 'needs "rate"'),
    ('rate = "1/s"\nkey = "principal"', "key", "needs a [spiffe] table"),
    ('rate = "1/s"\nkey = "cookie:x"', "key", 'expected "client_ip"'),
    ('rate = "1/s"\nbackend = "memcached"', "backend", 'expected "local" or "redis"'),
    ('rate = "1/s"\nstatus = 500', "status", "429 or 503"),
    ('rate = "1/s"\nalgorithm = "sliding"', "algorithm", "unknown algorithm"),
    ('rate = "1/s"\nqueue = 3', "queue", 'only used with algorithm = "leaky_bucket"'),
    ('rate = "1/s"\nalgorithm = "leaky_bucket"\nburst = 3', "burst",
     'only used with algorithm = "token_bucket"'),
    ('rate = "1/s"\nbrust = 3', "brust", 'did you mean "burst"'),
]


@pytest.mark.parametrize(("extra", "key", "words"), MISTAKES, ids=[m[2] for m in MISTAKES])
def test_each_mistake_names_its_key_path(tmp_path, extra, key, words):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, MINIMAL_CONFIG + "\n[[routes.rate_limit]]\n" + extra + "\n")
    errors = info.value.errors
    path = "routes[0].rate_limit[0]" + ("" if key == "rate" and "needs" in words else f".{key}")
    assert any(f": {path}: " in e and words in e for e in errors), errors


def test_a_table_mistake_names_its_key_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, MINIMAL_CONFIG + '\n[limits.rate_table]\non_full = "maybe"\n')
    assert info.value.errors == [
        f"{tmp_path / 'weft.toml'}: limits.rate_table.on_full: expected \"allow\" or \"deny\", "
        "got 'maybe'"
    ]


def test_the_redis_backend_section(tmp_path):
    cfg = load(tmp_path, MINIMAL_CONFIG + """
[[routes.rate_limit]]
rate = "1/s"
backend = "redis"
[rate_limit_backend]
url = "redis://127.0.0.1:6390/2"
timeout = "20ms"
on_error = "deny"
""")
    b = cfg.rate_limit_backend
    assert (b.url, b.timeout, b.on_error) == ("redis://127.0.0.1:6390/2", 0.02, "deny")
    with pytest.raises(ConfigError) as info:
        load(tmp_path, MINIMAL_CONFIG + '[rate_limit_backend]\nurl = "http://x"\n')
    assert "rate_limit_backend.url: expected a URL like" in info.value.errors[0]
