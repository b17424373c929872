"""What the admin listener, `weft status` and the worker metrics say about health, ejection,
breakers and retries, driven through a real `DestinationObserver` over endpoint records in an
anonymous mapping (`weft.observer.LocalRecords`) with a fake clock.

The story of one destination with three endpoints (health, outlier and breaker configured):
endpoint 0 trips its breaker, endpoint 1 is ejected for 5xx answers, endpoint 2 fails its
probes. Judges: the gauges the admin process computes from the records
(`weft.metrics_read.endpoint_families`), the counters a worker writes (prometheus_client's
multiprocess files, read back with the admin's merge), and the status document and text.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.config import MINIMAL_CONFIG
from support.prometheus import total

from weft import config, health, metrics, metrics_read, status
from weft.connection import UpstreamPools
from weft.observer import DestinationObserver, LocalRecords, observed_states
from weft.workers.shared import ColumnMap, observed_columns
from weft.workers.worker import Worker

A, B, C = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"

OBSERVED = f"""
[[listeners]]
address = "127.0.0.1"
port = 8080

[destinations.web]
endpoints = ["{A}", "{B}", "{C}"]

[destinations.web.health]
path = "/echo"
interval = "200ms"
timeout = "100ms"
unhealthy_threshold = 2

[destinations.web.outlier]
consecutive_5xx = 2

[destinations.web.breaker]
failure_rate = 100
minimum_calls = 3
open_for = "1s"

[destinations.probed]
endpoints = ["127.0.0.1:9004"]

[destinations.probed.health]

[destinations.plain]
endpoints = ["127.0.0.1:9005"]

[[routes]]
name = "web"
destination = "web"

[routes.retry]
on = ["connect_error", "reset", "503"]

[[routes]]
name = "plain"
destination = "plain"
path_prefix = "/plain/"
"""


def load(tmp_path: Path, text: str = OBSERVED) -> config.Config:
    path = tmp_path / "weft.toml"
    path.write_text(text)
    return config.load(path)


class Clock:
    """CLOCK_MONOTONIC in milliseconds, moved by the test."""

    def __init__(self) -> None:
        self.ms = 1_000_000_000

    def __call__(self) -> int:
        return self.ms


class Setup(SimpleNamespace):
    cfg: config.Config
    records: LocalRecords
    observed: dict
    web: DestinationObserver
    clock: Clock
    events: list


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    """The config's observers over one set of records, placed as the supervisor would place
    them (`ColumnMap`), and the ``observed`` document its state file would publish."""
    cfg = load(tmp_path)
    columns = ColumnMap(16).assign(cfg)
    records = LocalRecords(16)
    clock = Clock()
    events: list = []
    web = DestinationObserver(
        cfg.destinations["web"],
        records.table,
        [columns[f"web/{ep}"] for ep in (A, B, C)],
        pid=os.getpid(),
        clock_ms=clock,
        on_event=lambda *e: events.append(e),
    )
    return Setup(
        cfg=cfg,
        records=records,
        observed=observed_columns(cfg, columns),
        web=web,
        clock=clock,
        events=events,
    )


def act(s: Setup) -> None:
    """1. endpoint 1: two 503s eject it (two calls: below the breaker's minimum); 2. endpoint
    0: three connect errors trip its breaker (and are no ejection: one endpoint of three is
    the most the default max_ejection_percent allows out); 3. endpoint 2 fails two probes."""
    for _ in range(2):
        s.web.report(1, "status", 503, 0.001)
    for _ in range(3):
        s.web.report(0, "connect_error", 0, 0.001)
    for _ in range(2):
        s.web.apply_probe(2, health.FAIL)


def states(s: Setup) -> dict:
    return observed_states(s.records.table, s.observed, s.clock.ms)


def gauges(s: Setup) -> list[tuple[str, dict[str, str], float]]:
    return [
        (x.name, dict(x.labels), x.value)
        for family in metrics_read.endpoint_families(states(s))
        for x in family.samples
    ]


# -- what the supervisor publishes ---------------------------------------------------------------


def test_the_state_file_names_the_columns_of_observed_destinations_only(setup):
    obs = setup.observed
    assert set(obs) == {"web", "probed"}  # "plain" has no health, outlier or breaker section
    assert obs["web"]["health"] and obs["web"]["outlier"] and obs["web"]["breaker"]
    assert obs["probed"] == {
        "health": True,
        "outlier": False,
        "breaker": False,
        "endpoints": {"127.0.0.1:9004": 3},
    }
    assert list(obs["web"]["endpoints"]) == [A, B, C]
    assert obs["web"]["endpoints"][A] == setup.web.columns[0]


def test_a_column_the_table_does_not_have_is_not_read(setup):
    bogus = {"web": {**setup.observed["web"], "endpoints": {A: 0, B: 10_000, C: "x"}}}
    got = observed_states(setup.records.table, bogus, setup.clock.ms)
    assert list(got["web"]["endpoints"]) == [A]


def test_a_config_without_observed_destinations_publishes_nothing(tmp_path):
    cfg = load(tmp_path, MINIMAL_CONFIG)
    assert observed_columns(cfg, ColumnMap(4).assign(cfg)) == {}


# -- the admin's gauges --------------------------------------------------------------------------


def test_gauges_show_each_endpoints_current_state_from_the_shared_records(setup):
    # 1. fresh records: every endpoint healthy, none ejected, every breaker closed
    got = gauges(setup)
    assert total(got, "weft_endpoint_health", destination="web", state="healthy") == 3
    assert (
        total(
            got,
            "weft_endpoint_health",
            destination="probed",
            endpoint="127.0.0.1:9004",
            state="healthy",
        )
        == 1
    )
    assert total(got, "weft_endpoint_health", state="unhealthy") == 0
    assert total(got, "weft_breaker_state", state="closed") == 3
    # 2. one series per state and endpoint, set or not; "probed" has no outlier or breaker
    assert len([x for x in got if x[0] == "weft_endpoint_health"]) == 3 * 4
    assert {x[1]["destination"] for x in got if x[0] != "weft_endpoint_health"} == {"web"}
    assert not any(x[1]["destination"] == "plain" for x in got)

    # 3. the story
    act(setup)
    got = gauges(setup)
    assert total(got, "weft_breaker_state", endpoint=A, state="open") == 1
    assert total(got, "weft_breaker_state", endpoint=A, state="closed") == 0
    assert total(got, "weft_endpoint_ejected", endpoint=B) == 1
    assert total(got, "weft_endpoint_ejected") == 1
    assert total(got, "weft_endpoint_health", endpoint=C, state="unhealthy") == 1
    assert total(got, "weft_endpoint_health", endpoint=C, state="healthy") == 0
    assert total(got, "weft_breaker_state", state="open") == 1

    # 4. open_for passes: the next call is the half-open trial, then its success closes
    setup.clock.ms += 1_500
    assert setup.web.admit(0) == -1
    assert total(gauges(setup), "weft_breaker_state", endpoint=A, state="half_open") == 1
    setup.web.report(0, "ok", 200, 0.001, trial=True)
    assert total(gauges(setup), "weft_breaker_state", endpoint=A, state="closed") == 1


def test_no_observed_destination_means_no_endpoint_families():
    assert metrics_read.endpoint_families({}) == []


# -- the worker's counters -----------------------------------------------------------------------


def samples(directory: Path) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for m in metrics_read.collect(directory)
        for s in m.samples
    ]


def test_a_worker_counts_breaker_transitions_and_ejections_it_makes(setup, metrics_dir):
    wm = metrics.WorkerMetrics(setup.cfg, UpstreamPools(setup.cfg.destinations.values(), 1, 1.0))
    setup.web.on_event = wm.endpoint_event
    # 1. at zero from the start, for every endpoint of a destination with that section
    got = samples(metrics_dir)
    assert total(got, "weft_breaker_transitions_total") == 0
    assert len([x for x in got if x[0] == "weft_breaker_transitions_total"]) == 3 * 3
    assert len([x for x in got if x[0] == "weft_outlier_ejections_total"]) == 3

    # 2. the story, then the trial and its success
    act(setup)
    setup.clock.ms += 1_500
    assert setup.web.admit(0) == -1
    setup.web.report(0, "ok", 200, 0.001, trial=True)
    got = samples(metrics_dir)
    for state in ("open", "half_open", "closed"):
        assert (
            total(got, "weft_breaker_transitions_total", destination="web", endpoint=A, state=state)
            == 1
        ), state
    assert total(got, "weft_breaker_transitions_total") == 3
    assert total(got, "weft_outlier_ejections_total", destination="web", endpoint=B) == 1
    assert total(got, "weft_outlier_ejections_total") == 1


def request(cfg: config.Config, route: int = 0, **ctx: object) -> SimpleNamespace:
    return SimpleNamespace(
        method="GET",
        route=cfg.routes[route],
        ctx=dict(ctx),
        body=SimpleNamespace(received=0),
        start=0.0,
    )


def test_retries_are_counted_by_route_and_reason_from_the_request_context(setup, metrics_dir):
    cfg = setup.cfg
    wm = metrics.WorkerMetrics(cfg, UpstreamPools(cfg.destinations.values(), 1, 1.0))
    ok = SimpleNamespace(status=200, bytes_out=0)
    # 1. at zero from the start: the route's `on` conditions, and its budget
    got = samples(metrics_dir)
    assert {x[1]["reason"] for x in got if x[0] == "weft_retries_total"} == {
        "connect_error",
        "reset",
        "503",
    }
    assert {x[1]["route"] for x in got if x[0] == "weft_retry_budget_exhausted_total"} == {"web"}
    # 2. a reason per retry sent; a word outside the list is "other", never a new label
    wm.exchange(request(cfg, retries=["connect_error", "503", "503"]), ok, None, ("h", 1), 0.1)
    wm.exchange(
        request(cfg, retries=["made-up"], retry_budget_exhausted=True), ok, None, ("h", 1), 0.1
    )
    wm.exchange(
        request(cfg, 1, retries=["timeout"], retry_budget_exhausted=True), ok, None, ("h", 1), 0.1
    )
    wm.exchange(request(cfg), ok, None, ("h", 1), 0.1)  # neither key: nothing counted
    got = samples(metrics_dir)
    assert total(got, "weft_retries_total", route="web", reason="connect_error") == 1
    assert total(got, "weft_retries_total", route="web", reason="503") == 2
    assert total(got, "weft_retries_total", route="web", reason="other") == 1
    assert total(got, "weft_retries_total", route="plain", reason="timeout") == 1
    assert total(got, "weft_retries_total") == 5
    assert total(got, "weft_retry_budget_exhausted_total", route="web") == 1
    assert total(got, "weft_retry_budget_exhausted_total", route="plain") == 1


def test_retry_reason_labels_are_words_or_status_codes():
    for reason in ("connect_error", "reset", "timeout", "protocol_error", "503", "429"):
        assert metrics.retry_reason_label(reason) == reason
    assert metrics.retry_reason_label(503) == "503"
    for reason in ("5xx", "999", "50", "0503", "\u0665\u0660\u0663", "/path?x", ""):
        assert metrics.retry_reason_label(reason) == "other", reason


def test_the_worker_hooks_its_metrics_into_the_observers(tmp_path, metrics_dir):
    worker = Worker(load(tmp_path), {})
    assert worker.metrics is not None
    observers = {name: fw.observer for name, fw in worker.app.forwarders.items()}
    assert observers["web"].on_event == worker.metrics.endpoint_event
    assert observers["plain"] is None
    # without metrics, no hook
    off = Worker(load(tmp_path, OBSERVED + "\n[metrics]\nenabled = false\n"), {})
    assert off.app.forwarders["web"].observer.on_event is None


# -- /status and `weft status` -------------------------------------------------------------------


def test_the_status_document_and_text_show_each_observed_endpoint(setup, tmp_path):
    act(setup)
    setup.web.take_lease(2, 60_000)
    setup.clock.ms += 1_500
    assert setup.web.admit(0) == -1  # endpoint 0's trial, held by this process
    pid = os.getpid()
    # pool figures from a metrics directory that has none: observed endpoints still appear
    dests = status.destinations("unit-none", states(setup))
    assert set(dests) == {"web", "probed"}
    web = {e["endpoint"]: e for e in dests["web"]}
    assert web[A] == {
        "endpoint": A,
        "open": None,
        "idle": None,
        "waiting": None,
        "health": "healthy",
        "ejected": False,
        "ejected_for_s": 0.0,
        "ejections": 0,
        "breaker": "half_open",
        "breaker_trips": 1,
        "trial_pid": pid,
        "prober_pid": 0,
    }
    assert web[B]["ejected"] is True and web[B]["ejections"] == 1
    assert 28 < web[B]["ejected_for_s"] <= 30  # Envoy's base_ejection, 1.5 s ago
    assert web[C]["health"] == "unhealthy" and web[C]["prober_pid"] == pid
    probed = dests["probed"][0]  # no outlier or breaker section: null, not "no"
    assert probed["ejected"] is None and probed["breaker"] is None
    assert probed["trial_pid"] is None and probed["prober_pid"] == 0

    info = {
        "instance": "unit",
        "pid": 1,
        "generation": 1,
        "config": "weft.toml",
        "config_hash": "h",
        "workers": [],
        "destinations": dests,
    }
    lines = status.render(info).splitlines()
    header = next(line for line in lines if line.startswith("destination"))
    assert header.split() == [
        "destination",
        "endpoint",
        "open",
        "idle",
        "waiting",
        "health",
        "ejected",
        "ejections",
        "breaker",
        "trips",
        "trial",
        "prober",
    ]
    rows = {line.split()[1]: line.split() for line in lines if line.startswith(("web", "prob"))}
    assert rows[A][2:] == ["-", "-", "-", "healthy", "no", "0", "half_open", "1", str(pid), "-"]
    assert rows[B][5:8] == ["healthy", "28.5s", "1"]
    assert rows[C][5] == "unhealthy" and rows[C][-1] == str(pid)
    assert rows["127.0.0.1:9004"][5:] == ["healthy", "-", "-", "-", "-", "-", "-"]


def test_status_without_observed_destinations_keeps_its_pool_table():
    info = {
        "instance": "unit",
        "pid": 1,
        "generation": 1,
        "config": "weft.toml",
        "config_hash": "h",
        "workers": [],
        "destinations": {"app": [{"endpoint": A, "open": 1, "idle": 1, "waiting": 0}]},
    }
    lines = status.render(info).splitlines()
    header = next(line for line in lines if line.startswith("destination"))
    assert header.split() == ["destination", "endpoint", "open", "idle", "waiting"]
    assert next(line for line in lines if line.startswith("app")).split() == [
        "app",
        A,
        "1",
        "1",
        "0",
    ]
