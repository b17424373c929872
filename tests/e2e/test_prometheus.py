"""The exposition as Prometheus itself judges it: promtool's linter, and a real Prometheus
server (Debian's binary, on loopback, with a temporary config and storage) scraping the admin
listener with a bearer token."""

from __future__ import annotations

import pytest
from support.config import base_config, destination, route, table
from support.procs import wait_for
from support.prometheus import PrometheusServer, admin_get, promtool_check, send, wait_total
from support.supervised import start_supervised

pytestmark = pytest.mark.e2e

TOKEN = "e2e-token-0123456789abcdef"


def start(weft, tmp_path, upstream, free_port, *, token: str | None = None):
    a = upstream("A")
    port, admin_port = free_port(), free_port()
    admin = {"port": admin_port, **({"token": token} if token else {})}
    text = (
        base_config(port, server={"workers": 2})
        + table("[admin]", admin)
        + destination("app", [a.address])
        + route("app", name="api", path_prefix="/api/", strip_prefix=True)
        + route("app", name="web", path_prefix="/")
    )
    start_supervised(weft, tmp_path, text, workers=2)
    return port, admin_port


def test_promtool_accepts_the_aggregate_and_a_worker_view(upstream, weft, free_port, tmp_path):
    port, admin_port = start(weft, tmp_path, upstream, free_port)
    for _ in range(20):  # every family gets samples: 200s, 404s, errors, bodies, upstream times
        assert send(port, "POST", "/api/echo", b"body") == 200
        assert send(port, "GET", "/status?code=404") == 404
    assert send(port, "GET", "/api/close-before") == 502
    wait_total(admin_port, 41)
    for path in ("/metrics", "/metrics/workers/0", "/metrics/workers/1"):
        resp = admin_get(admin_port, path)
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        checked = promtool_check(resp.text)
        assert checked.returncode == 0 and not checked.stdout.strip(), (
            f"promtool check metrics on {path}:\n{checked.stdout}{checked.stderr}")


def test_promtool_accepts_the_health_breaker_and_retry_families(upstream, weft, free_port,
                                                                 tmp_path):
    live = upstream("A").address
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    port, admin_port = free_port(), free_port()
    breaker = {"minimum_calls": 2, "open_for": "30s"}
    text = (
        base_config(port, server={"workers": 2})
        + table("[admin]", {"port": admin_port})
        + destination("app", [live, dead], outlier={}, breaker=breaker,
                      health={"path": "/echo", "interval": "200ms", "timeout": "100ms"})
        + destination("fragile", [dead], breaker=breaker)
        + route("fragile", name="fragile", path_prefix="/fragile/", strip_prefix=True)
        + route("app", name="api", retry={"on": ["connect_error", "503"]})
    )
    start_supervised(weft, tmp_path, text, workers=2)
    # every new family gets samples: health states, ejection, breaker states, a transition
    # (counted before the answer that opened the breaker), and the retry counters at zero
    assert [send(port, "GET", "/fragile/echo") for _ in range(3)][-1] == 503
    wait_for(lambda: 'weft_endpoint_health{destination="app",endpoint="' + dead
             + '",state="unhealthy"} 1.0' in admin_get(admin_port, "/metrics").text,
             10.0, "the closed port to be unhealthy")
    text = admin_get(admin_port, "/metrics").text
    assert 'weft_breaker_transitions_total{destination="fragile",endpoint="' + dead + \
        '",state="open"} 1.0' in text
    for family in ("weft_endpoint_health", "weft_endpoint_ejected", "weft_breaker_state",
                   "weft_outlier_ejections_total", "weft_retries_total",
                   "weft_retry_budget_exhausted_total"):
        assert f"\n{family}{{" in text, family
    checked = promtool_check(text)
    assert checked.returncode == 0 and not checked.stdout.strip(), (
        f"promtool check metrics:\n{checked.stdout}{checked.stderr}")


def test_a_prometheus_server_scrapes_the_admin_listener(upstream, weft, free_port, tmp_path):
    port, admin_port = start(weft, tmp_path, upstream, free_port, token=TOKEN)
    for _ in range(25):
        assert send(port, "GET", "/api/echo") == 200
    wait_for(lambda: admin_get(admin_port, "/metrics", token=TOKEN).text.count(
        'weft_requests_total{code="200",method="GET",route="api"}') >= 1, 5.0, "the counts")

    with PrometheusServer(tmp_path, admin_port, token=TOKEN) as prom:
        # 1. the target is up (scraped with the bearer token)
        def up() -> dict | None:
            targets = prom.targets()
            return next((t for t in targets if t.get("health") == "up"), None)

        try:
            target = wait_for(up, 20.0, "the weft target to be up")
        except AssertionError:
            raise AssertionError(f"targets: {prom.targets()}\n{prom.log()}") from None
        assert target["labels"]["job"] == "weft"

        # 2. PromQL over the HTTP API sees exactly the requests sent
        def counted() -> float | None:
            result = prom.query('sum(weft_requests_total{route="api",code="200"})')
            return float(result[0]["value"][1]) if result else None

        wait_for(lambda: counted() == 25, 20.0, "Prometheus to have scraped 25 requests")
        generation = prom.query("weft_config_generation")
        assert [float(r["value"][1]) for r in generation] == [1.0]
        ready = prom.query('weft_workers{state="ready"}')
        assert [float(r["value"][1]) for r in ready] == [2.0]
