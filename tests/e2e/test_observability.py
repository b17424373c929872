"""Health and breakers as an operator sees them: the admin listener's /metrics and /status,
and `weft status`, while weft probes a real upstream and a port where nothing listens.

The story: destination "app" has a live endpoint and a closed port, with active health checks
every 200 ms and a breaker; destination "fragile" is only a closed port behind a breaker that
opens after two failed calls. Judges: the exposition parsed by prometheus_client's parser, the
status document, and the worker table's pids (the prober must be one of the workers).
"""

from __future__ import annotations

import json

import pytest
from support.config import base_config, destination, route, table
from support.procs import wait_for
from support.prometheus import admin_get, scrape, send, total
from support.supervised import start_supervised

pytestmark = pytest.mark.e2e

HEALTH = {"path": "/echo", "interval": "200ms", "timeout": "100ms"}
BREAKER = {
    "failure_rate": 50,
    "minimum_calls": 2,
    "window": "10s",
    "open_for": "30s",
    "max_open_for": "60s",
}
# Three failed probes 200 ms apart (the default unhealthy_threshold), after a first probe at
# a random point of the first half interval, with 100 ms timeouts: about a second. Ten is the
# point where something is wrong.
TURN_UNHEALTHY = 10.0


def observed_config(port: int, admin_port: int, live: str, dead: str, dead2: str) -> str:
    return (
        base_config(port, server={"workers": 2})
        + table("[admin]", {"port": admin_port})
        + destination("app", [live, dead], health=HEALTH, breaker=BREAKER)
        + destination("fragile", [dead2], breaker=BREAKER)
        + route("fragile", name="fragile", path_prefix="/fragile/", strip_prefix=True)
        + route("app", name="app")
    )


def test_a_closed_port_turns_unhealthy_and_a_failing_endpoint_opens_its_breaker(
    upstream, weft, free_port, tmp_path
):
    live = upstream("A").address
    dead, dead2 = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"  # nothing listens
    port, admin_port = free_port(), free_port()
    sup = start_supervised(
        weft, tmp_path, observed_config(port, admin_port, live, dead, dead2), workers=2
    )
    worker_pids = {w["pid"] for w in sup.workers()}

    # 1. the probes find the closed port: /metrics says unhealthy, the live endpoint healthy
    def unhealthy() -> list | None:
        got = scrape(admin_port)
        now = total(
            got, "weft_endpoint_health", destination="app", endpoint=dead, state="unhealthy"
        )
        return got if now == 1 else None

    got = wait_for(unhealthy, TURN_UNHEALTHY, f"{dead} to be unhealthy in /metrics")
    assert total(got, "weft_endpoint_health", destination="app", endpoint=dead) == 1
    assert (
        total(got, "weft_endpoint_health", destination="app", endpoint=live, state="healthy") == 1
    )
    assert total(got, "weft_breaker_state", destination="app", endpoint=dead, state="closed") == 1
    assert total(got, "weft_endpoint_ejected") == 0  # no outlier section: no such series
    # instance-wide facts come from the admin alone, not once per worker
    for slot in (0, 1):
        assert total(scrape(admin_port, f"/metrics/workers/{slot}"), "weft_endpoint_health") == 0

    # 2. /status: unhealthy, probed by one of the workers; no section, no value
    info = admin_get(admin_port, "/status").json()
    app = {e["endpoint"]: e for e in info["destinations"]["app"]}
    assert app[dead]["health"] == "unhealthy"
    assert app[dead]["prober_pid"] in worker_pids, (app[dead], worker_pids)
    assert app[live]["health"] == "healthy" and app[live]["prober_pid"] in worker_pids
    assert app[dead]["breaker"] == "closed" and app[dead]["trial_pid"] == 0
    assert app[dead]["ejected"] is None

    # 3. traffic avoids the unhealthy endpoint; "fragile" fails twice and its breaker opens
    for _ in range(4):
        assert send(port, "GET", "/echo") == 200
    statuses = [send(port, "GET", "/fragile/echo") for _ in range(3)]
    assert statuses[:2] == [502, 502] and statuses[2] == 503, statuses

    # the worker counted the transition before it answered the call that made it
    got = scrape(admin_port)
    assert total(got, "weft_breaker_transitions_total", destination="fragile", state="open") == 1
    assert (
        total(got, "weft_breaker_state", destination="fragile", endpoint=dead2, state="open") == 1
    )
    assert total(got, "weft_breaker_transitions_total") == 1  # one transition, one worker
    fragile = admin_get(admin_port, "/status").json()["destinations"]["fragile"][0]
    assert fragile["breaker"] == "open" and fragile["breaker_trips"] == 1
    assert fragile["health"] == "healthy" and fragile["prober_pid"] is None  # no probes

    # 4. `weft status`: one line per endpoint with its state
    shown = sup.cli("status")
    assert shown.returncode == 0, shown.stderr
    rows = {
        line.split()[1]: line.split()
        for line in shown.stdout.splitlines()
        if line.startswith(("app ", "fragile "))
    }
    assert rows[dead][5] == "unhealthy" and int(rows[dead][-1]) in worker_pids
    assert rows[dead2][8:10] == ["open", "1"]
    as_json = json.loads(sup.cli("status", "--json").stdout)
    assert {e["endpoint"]: e["health"] for e in as_json["destinations"]["app"]}[dead] == (
        "unhealthy"
    )
