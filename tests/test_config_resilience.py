"""The health, outlier, breaker and retry sections (`weft.config_resilience`): the issue's
defaults, one precise message per mistake, and the contradictions `weft check` refuses."""

from __future__ import annotations

import pytest
from support.config import MINIMAL_CONFIG
from support.config import config_errors as errors_of
from support.config import load_text as load

from weft.schema import BreakerConfig, HealthCheck, OutlierConfig, RetryPolicy

SECTIONS = """
[destinations.web.health]
[destinations.web.outlier]
[destinations.web.breaker]
[routes.retry]
"""




def test_empty_sections_get_the_issue_s_defaults(tmp_path):
    cfg = load(tmp_path, MINIMAL_CONFIG + SECTIONS)
    web = cfg.destinations["web"]
    assert web.health == HealthCheck(
        path="/healthz",
        interval=5.0,
        timeout=1.0,
        healthy_threshold=2,
        unhealthy_threshold=3,
        expected_statuses=((200, 399),),
        degraded_latency=0.0,
        degraded_header="x-weft-degraded",
    )
    assert web.outlier == OutlierConfig(
        consecutive_5xx=5,
        consecutive_gateway_errors=3,
        base_ejection=30.0,
        max_ejection=300.0,
        max_ejection_percent=50,
        panic_threshold=50,
        slow_start=0.0,
    )
    assert web.breaker == BreakerConfig(
        failure_rate=50, minimum_calls=20, window=10.0, open_for=5.0, max_open_for=60.0
    )
    assert cfg.routes[0].retry == RetryPolicy(
        attempts=3,
        on=("connect_error", "reset", "timeout", "503"),
        backoff_base=0.025,
        backoff_max=0.25,
        per_try_timeout=0.0,
        budget_percent=20,
        budget_min_per_second=3,
        buffer_body=64 * 1024,
    )


def test_absent_sections_turn_the_features_off(tmp_path):
    cfg = load(tmp_path, MINIMAL_CONFIG)
    web = cfg.destinations["web"]
    assert (web.health, web.outlier, web.breaker, cfg.routes[0].retry) == (None,) * 4
    assert not web.observed


def test_values_are_read_with_their_units(tmp_path):
    cfg = load(
        tmp_path,
        MINIMAL_CONFIG
        + """
[destinations.web.health]
interval = "2s"
timeout = "250ms"
expected_statuses = [200, "204", "300-302"]
degraded_header = "X-Slow"
[routes.retry]
on = ["5xx", "gateway_error", 429]
buffer_body = "1MiB"
per_try_timeout = "2s"
""",
    )
    h = cfg.destinations["web"].health
    assert h is not None
    assert (h.interval, h.timeout, h.degraded_header) == (2.0, 0.25, "x-slow")
    assert h.expected_statuses == ((200, 200), (204, 204), (300, 302))
    r = cfg.routes[0].retry
    assert r is not None and r.on == ("5xx", "gateway_error", "429")
    assert (r.buffer_body, r.per_try_timeout) == (1 << 20, 2.0)


# (TOML appended to the minimal config, the key path, words of the reason)
MISTAKES = [
    (
        "[destinations.web.health]\nhealthy_threshold = 0",
        "destinations.web.health.healthy_threshold",
        "between 1 and 255",
    ),
    (
        "[destinations.web.health]\nunhealthy_threshold = 300",
        "destinations.web.health.unhealthy_threshold",
        "between 1 and 255",
    ),
    (
        '[destinations.web.health]\ninterval = "1s"\ntimeout = "1s"',
        "destinations.web.health.timeout",
        "shorter than interval",
    ),
    (
        '[destinations.web.health]\ndegraded_latency = "2s"',
        "destinations.web.health.degraded_latency",
        "not below timeout",
    ),
    (
        '[destinations.web.health]\nexpected_statuses = ["2xx"]',
        "destinations.web.health.expected_statuses",
        "a range like",
    ),
    (
        '[destinations.web.health]\nexpected_statuses = ["399-200"]',
        "destinations.web.health.expected_statuses",
        "within 100-599",
    ),
    (
        '[destinations.web.health]\npath = "healthz"',
        "destinations.web.health.path",
        'starting with "/"',
    ),
    (
        '[destinations.web.health]\ndegraded_header = "x bad"',
        "destinations.web.health.degraded_header",
        "not a valid header name",
    ),
    (
        "[destinations.web.health]\nintervall = 5",
        "destinations.web.health.intervall",
        'did you mean "interval"',
    ),
    (
        '[destinations.web.outlier]\nbase_ejection = "10m"',
        "destinations.web.outlier.base_ejection",
        "longer than max_ejection",
    ),
    (
        "[destinations.web.outlier]\nmax_ejection_percent = 150",
        "destinations.web.outlier.max_ejection_percent",
        "between 0 and 100",
    ),
    (
        "[destinations.web.breaker]\nfailure_rate = 0",
        "destinations.web.breaker.failure_rate",
        "between 1 and 100",
    ),
    (
        '[destinations.web.breaker]\nopen_for = "2m"',
        "destinations.web.breaker.open_for",
        "longer than max_open_for",
    ),
    (
        '[destinations.web.breaker]\nwindow = "5ms"',
        "destinations.web.breaker.window",
        "at least 10ms",
    ),
    ("[routes.retry]\nattempts = 0", "routes[0].retry.attempts", "between 1 and 16"),
    ('[routes.retry]\non = ["teapot"]', "routes[0].retry.on", "unknown retry condition 'teapot'"),
    ("[routes.retry]\non = []", "routes[0].retry.on", "non-empty list"),
    (
        '[routes.retry]\nbackoff_base = "1s"',
        "routes[0].retry.backoff_base",
        "longer than backoff_max",
    ),
    (
        '[routes.timeouts]\nrequest_total = "2s"\n[routes.retry]\nper_try_timeout = "2s"',
        "routes[0].retry.per_try_timeout",
        "not below the route's request_total",
    ),
    (
        "[routes.retry]\nbudget_percent = 0\nbudget_min_per_second = 0",
        "routes[0].retry",
        "no retry could ever be sent",
    ),
    ("[routes.retry]\nattempt = 2", "routes[0].retry.attempt", 'did you mean "attempts"'),
]


@pytest.mark.parametrize(
    ("extra", "key_path", "words"), MISTAKES, ids=[m[1] + ":" + m[2][:20] for m in MISTAKES]
)
def test_each_mistake_is_refused_with_its_key_path_and_reason(tmp_path, extra, key_path, words):
    errors = errors_of(tmp_path, MINIMAL_CONFIG + "\n" + extra + "\n")
    assert len(errors) == 1, errors
    assert f": {key_path}: " in errors[0], errors
    assert words in errors[0], errors


def test_an_outlier_section_may_turn_both_runs_off_to_carry_panic_and_slow_start(tmp_path):
    cfg = load(
        tmp_path,
        MINIMAL_CONFIG
        + """
[destinations.web.outlier]
consecutive_5xx = 0
consecutive_gateway_errors = 0
slow_start = "30s"
""",
    )
    o = cfg.destinations["web"].outlier
    assert o is not None and o.slow_start == 30.0
