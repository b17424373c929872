"""Unit tests for weft.metrics and weft.admin: label values, what a worker records, the
admin's readiness rule and its HTTP layer, and the [admin]/[metrics] config.

Recording tests write real prometheus_client multiprocess files in a temporary directory (the
``metrics_dir`` fixture of conftest.py) and read them back with the same merge the admin
listener uses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from support.config import MINIMAL_CONFIG
from support.prometheus import admin_get, by_label, parse, promtool_check, total

from weft import config, metrics, metrics_read
from weft.admin import AdminServer, readiness, worker_of_slot
from weft.connection import UpstreamPools
from weft.shm.worktable import BOOTING, DRAINING, READY
from weft.spiffe_id import SpiffeId

BASE = MINIMAL_CONFIG


def load(tmp_path: Path, extra: str = "") -> config.Config:
    path = tmp_path / "weft.toml"
    path.write_text(BASE + extra)
    return config.load(path)


def errors(tmp_path: Path, extra: str) -> list[str]:
    with pytest.raises(config.ConfigError) as e:
        load(tmp_path, extra)
    return e.value.errors


# -- label values --------------------------------------------------------------------------------


def test_label_values_come_from_fixed_sets():
    assert metrics.method_label("GET") == "GET"
    assert metrics.method_label("PATCH") == "PATCH"
    assert metrics.method_label("BREW") == "OTHER"
    assert metrics.method_label("get") == "OTHER"  # methods are case-sensitive (RFC 9110 §9.1)
    assert metrics.reason_label("pool_full") == "pool_full"
    assert metrics.reason_label("upstream_header_timeout") == "upstream_header_timeout"
    assert metrics.reason_label("made-up by a middleware") == "other"


# -- config --------------------------------------------------------------------------------------


def test_admin_is_off_unless_configured_and_loopback_by_default(tmp_path):
    cfg = load(tmp_path)
    assert not cfg.admin.enabled and cfg.metrics.enabled
    cfg = load(tmp_path, "[admin]\nport = 9901\n[metrics]\nenabled = false\n")
    assert cfg.admin == config.Admin("127.0.0.1", 9901, None) and cfg.admin.enabled
    assert not cfg.metrics.enabled


def test_a_public_admin_address_needs_a_token(tmp_path):
    errs = errors(tmp_path, '[admin]\naddress = "0.0.0.0"\nport = 9901\n')
    assert len(errs) == 1
    assert errs[0].startswith(f'{tmp_path / "weft.toml"}: admin.address: "0.0.0.0" is not a '
                              "loopback address")
    assert "admin.token" in errs[0]
    ok = load(tmp_path, '[admin]\naddress = "::"\nport = 9901\ntoken = "0123456789abcdef"\n')
    assert ok.admin.token == "0123456789abcdef"
    assert load(tmp_path, '[admin]\naddress = "::1"\nport = 9901\n').admin.address == "::1"


def test_admin_mistakes_are_reported_with_their_key(tmp_path):
    errs = errors(tmp_path, '[admin]\naddress = "127.0.0.1"\ntoken = "short"\nprto = 1\n')
    text = "\n".join(errs)
    assert 'admin: needs "port"' in text
    assert "admin.token: expected at least 16 characters" in text
    assert 'admin.prto: unknown key (did you mean "port"?)' in text
    clash = errors(tmp_path, "[admin]\nport = 8080\n")
    assert clash == [f"{tmp_path / 'weft.toml'}: admin.port: 127.0.0.1:8080 is already "
                     "listeners[0]"]
    assert errors(tmp_path, "[metrics]\nenabled = 1\n") == [
        f"{tmp_path / 'weft.toml'}: metrics.enabled: expected true or false, got 1"]


def test_quick_mode_admin_flag():
    cfg = config.quick("127.0.0.1:8080", ["127.0.0.1:9000"], admin="127.0.0.1:9901")
    assert cfg.admin == config.Admin("127.0.0.1", 9901, None)
    with pytest.raises(config.ConfigError) as e:
        config.quick("127.0.0.1:8080", ["127.0.0.1:9000"], admin="0.0.0.0:9901")
    assert "admin.address" in e.value.errors[0]
    assert config.quick("127.0.0.1:8080", ["127.0.0.1:9000"]).admin.enabled is False


# -- what a worker records -----------------------------------------------------------------------


def request(cfg: config.Config, method: str = "GET", *, routed: bool = True,
            received: int = 0, **ctx: object) -> SimpleNamespace:
    return SimpleNamespace(method=method, route=cfg.routes[0] if routed else None,
                           ctx=dict(ctx), body=SimpleNamespace(received=received), start=0.0)


def samples(directory: Path, pid: int | None = None) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value)
            for m in metrics_read.collect(directory, pid) for s in m.samples]


async def test_a_worker_records_exchanges_in_its_own_files(tmp_path, metrics_dir):
    cfg = load(tmp_path)
    pools = UpstreamPools(cfg.destinations.values(), 10, 1.0)
    wm = metrics.for_worker(cfg, pools)
    assert wm is not None
    ok = request(cfg, "POST", received=10, endpoint="127.0.0.1:9001", upstream_time=0.002)
    wm.route_started(ok)
    assert wm.inflight["web"] == 1
    wm.exchange(ok, SimpleNamespace(status=200, bytes_out=50), None, ("127.0.0.1", 1), 0.004)
    wm.exchange(request(cfg, "BREW", routed=False), SimpleNamespace(status=404, bytes_out=0),
                "no_route", ("127.0.0.1", 1), 0.001)
    wm.exchange(None, SimpleNamespace(status=400), "bad_request_line", ("127.0.0.1", 1), 0.0)
    gone = request(cfg)
    wm.route_started(gone)
    wm.abandoned(gone)
    assert wm.inflight["web"] == 0
    wm.sample()

    got = samples(metrics_dir)
    assert total(got, "weft_requests_total") == 4
    assert total(got, "weft_requests_total", route="web", method="POST", code="200") == 1
    assert total(got, "weft_requests_total", route="", method="OTHER", code="404") == 1
    assert total(got, "weft_requests_total", route="", method="OTHER", code="400") == 1
    assert total(got, "weft_requests_total", route="web", method="GET", code="499") == 1
    assert total(got, "weft_proxy_errors_total", route="", reason="no_route") == 1
    assert total(got, "weft_proxy_errors_total", route="", reason="bad_request_line") == 1
    assert total(got, "weft_request_bytes_total", route="web") == 10
    assert total(got, "weft_response_bytes_total", route="web") == 50
    assert total(got, "weft_upstream_response_seconds_count", destination="web",
                 endpoint="127.0.0.1:9001") == 1
    assert total(got, "weft_upstream_response_seconds_bucket", le="0.0025") == 1
    assert total(got, "weft_request_duration_seconds_count", route="web") == 2
    assert total(got, "weft_requests_in_flight") == 0
    assert total(got, "weft_pool_connections", state="open") == 0
    # everything is in this process's files, and the pool figures read back per endpoint
    assert total(samples(metrics_dir, os.getpid()), "weft_requests_total") == 4
    assert metrics_read.pool_figures(metrics_dir) == {
        "web": {"127.0.0.1:9001": {"open": 0, "idle": 0, "waiting": 0}}}


def test_accept_errors_are_published_by_errno_at_each_sample(tmp_path, metrics_dir):
    cfg = load(tmp_path)
    accept_errors: Counter[str] = Counter()
    wm = metrics.for_worker(cfg, UpstreamPools(cfg.destinations.values(), 10, 1.0),
                            accept_errors)
    assert wm is not None
    # 1. every errno label is there from the start, at zero
    got = samples(metrics_dir)
    assert {labels["errno"] for name, labels, _ in got
            if name == "weft_accept_errors_total"} == set(metrics.ACCEPT_ERRNOS)
    assert total(got, "weft_accept_errors_total") == 0
    # 2. what the accept loop counted reaches the files at the next sample, not before
    accept_errors["EMFILE"] += 3
    accept_errors["ECONNABORTED"] += 1
    assert total(samples(metrics_dir), "weft_accept_errors_total") == 0
    wm.sample()
    # 3. and only what is new since the last sample is added
    accept_errors["EMFILE"] += 2
    wm.sample()
    wm.sample()
    got = samples(metrics_dir)
    assert total(got, "weft_accept_errors_total", errno="EMFILE") == 5
    assert total(got, "weft_accept_errors_total", errno="ECONNABORTED") == 1
    assert total(got, "weft_accept_errors_total") == 6


def test_counters_outlive_their_process_but_live_gauges_do_not(tmp_path, metrics_dir):
    cfg_path = tmp_path / "weft.toml"
    cfg_path.write_text(BASE)
    # A worker in another process counts one request and sets its in-flight gauge, then dies.
    script = (
        "from types import SimpleNamespace as N\n"
        "from weft import config, metrics\n"
        "from weft.connection import UpstreamPools\n"
        f"cfg = config.load({str(cfg_path)!r})\n"
        "wm = metrics.WorkerMetrics(cfg, UpstreamPools(cfg.destinations.values(), 1, 1.0))\n"
        "r = N(method='GET', route=cfg.routes[0], ctx={}, body=None, start=0.0)\n"
        "wm.route_started(r); wm.route_started(r)\n"
        "wm.exchange(r, N(status=200, bytes_out=0), None, ('h', 1), 0.1)\n"
        "wm.sample()\n"
        "import os; print(os.getpid())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, env={**os.environ, metrics.ENV: str(metrics_dir)},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)
    assert total(samples(metrics_dir), "weft_requests_in_flight", route="web") == 1
    sup = metrics.SupervisorMetrics(metrics_dir, 1)
    sup.process_dead(pid)
    after = samples(metrics_dir)
    assert total(after, "weft_requests_total", route="web") == 1  # kept
    assert total(after, "weft_requests_in_flight") == 0  # gone with the process
    assert total(after, "weft_config_generation") == 1
    sup.reload_done(True, 2)
    sup.worker_restarted()
    after = samples(metrics_dir)
    assert total(after, "weft_config_generation") == 2
    assert total(after, "weft_reloads_total", result="ok") == 1
    assert total(after, "weft_worker_restarts_total") == 1


# Route "web" opts in to the principal label; route "plain" does not. [spiffe] gives requests
# their principals (the config refuses metrics_principal without it).
BY_PRINCIPAL = """metrics_principal = true

[[routes]]
name = "plain"
destination = "web"
path_prefix = "/plain/"

[spiffe]
"""
FRONTEND = SpiffeId("example.org", "/frontend")
BATCH = SpiffeId("example.org", "/batch")


def routed(cfg: config.Config, name: str, principal: SpiffeId | None) -> SimpleNamespace:
    route = next(r for r in cfg.routes if r.name == name)
    ctx = {} if principal is None else {"principal": principal}
    return SimpleNamespace(method="GET", route=route, ctx=ctx, body=None, start=0.0)


def answered(status: int) -> SimpleNamespace:
    return SimpleNamespace(status=status, bytes_out=0)


async def test_an_opted_in_route_counts_requests_by_principal_and_code_class(
    tmp_path, metrics_dir
):
    cfg = load(tmp_path, BY_PRINCIPAL)
    assert [r.metrics_principal for r in cfg.routes] == [True, False]
    wm = metrics.WorkerMetrics(cfg, UpstreamPools(cfg.destinations.values(), 1, 1.0))
    for principal, status in ((FRONTEND, 200), (FRONTEND, 201), (BATCH, 503), (None, 200)):
        wm.exchange(routed(cfg, "web", principal), answered(status), None, ("h", 1), 0.01)
    wm.abandoned(routed(cfg, "web", BATCH))  # a 499: counted as 4xx
    wm.exchange(routed(cfg, "plain", FRONTEND), answered(200), None, ("h", 1), 0.01)

    got = samples(metrics_dir)
    family = "weft_principal_requests_total"
    assert by_label(got, family, "principal", route="web") == {
        "spiffe://example.org/frontend": 2, "spiffe://example.org/batch": 2, "": 1}
    assert total(got, family, principal="spiffe://example.org/frontend", code_class="2xx") == 2
    assert total(got, family, principal="spiffe://example.org/batch", code_class="5xx") == 1
    assert total(got, family, principal="spiffe://example.org/batch", code_class="4xx") == 1
    # a route without the key has no series at all; its requests are in weft_requests_total
    assert not [labels for name, labels, _ in got if name == family and labels["route"] == "plain"]
    assert total(got, "weft_requests_total", route="plain") == 1


async def test_the_principal_label_is_bounded_per_route_and_worker(
    tmp_path, metrics_dir, monkeypatch
):
    monkeypatch.setattr(metrics, "MAX_PRINCIPALS", 3)
    cfg = load(tmp_path, BY_PRINCIPAL)
    wm = metrics.WorkerMetrics(cfg, UpstreamPools(cfg.destinations.values(), 1, 1.0))
    ids = [SpiffeId("example.org", f"/w{i}") for i in range(6)]
    # 1. the first three principals get their own label; the next three are "other"
    for sid in ids:
        wm.exchange(routed(cfg, "web", sid), answered(200), None, ("h", 1), 0.01)
    # 2. a principal that has a label keeps it after the bound is reached; none stays ""
    wm.exchange(routed(cfg, "web", ids[0]), answered(200), None, ("h", 1), 0.01)
    wm.exchange(routed(cfg, "web", None), answered(200), None, ("h", 1), 0.01)
    wm.exchange(routed(cfg, "web", ids[5]), answered(200), None, ("h", 1), 0.01)
    got = samples(metrics_dir)
    assert by_label(got, "weft_principal_requests_total", "principal", route="web") == {
        "spiffe://example.org/w0": 2,
        "spiffe://example.org/w1": 1,
        "spiffe://example.org/w2": 1,
        "other": 4,
        "": 1,
    }


def test_the_principal_family_adds_up_across_processes_and_passes_promtool(
    tmp_path, metrics_dir
):
    (tmp_path / "weft.toml").write_text(BASE + BY_PRINCIPAL)
    # 1. another worker process counts the frontend twice, and exits
    script = (
        "from types import SimpleNamespace as N\n"
        "from weft import config, metrics\n"
        "from weft.connection import UpstreamPools\n"
        "from weft.spiffe_id import SpiffeId\n"
        f"cfg = config.load({str(tmp_path / 'weft.toml')!r})\n"
        "wm = metrics.WorkerMetrics(cfg, UpstreamPools(cfg.destinations.values(), 1, 1.0))\n"
        "ctx = {'principal': SpiffeId('example.org', '/frontend')}\n"
        "for _ in range(2):\n"
        "    r = N(method='GET', route=cfg.routes[0], ctx=dict(ctx), body=None, start=0.0)\n"
        "    wm.exchange(r, N(status=200, bytes_out=0), None, ('h', 1), 0.1)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, env={**os.environ, metrics.ENV: str(metrics_dir)},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    # 2. this one counts it once more
    cfg = load(tmp_path, BY_PRINCIPAL)
    wm = metrics.WorkerMetrics(cfg, UpstreamPools(cfg.destinations.values(), 1, 1.0))
    wm.exchange(routed(cfg, "web", FRONTEND), answered(200), None, ("h", 1), 0.01)
    # 3. the aggregate sums both; this worker's own view has its one
    labels = {"route": "web", "principal": "spiffe://example.org/frontend", "code_class": "2xx"}
    assert total(samples(metrics_dir), "weft_principal_requests_total", **labels) == 3
    assert total(samples(metrics_dir, os.getpid()), "weft_principal_requests_total", **labels) == 1
    # 4. the exposition the admin listener would serve is one promtool accepts
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(metrics_read.FilesCollector(metrics_dir))
    text = generate_latest(registry).decode()
    assert 'principal="spiffe://example.org/frontend"' in text
    checked = promtool_check(text)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr


def test_metrics_are_off_without_a_directory_or_when_disabled(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.ENV, raising=False)
    cfg = load(tmp_path)
    pools = UpstreamPools(cfg.destinations.values(), 10, 1.0)
    assert metrics.for_worker(cfg, pools) is None
    monkeypatch.setenv(metrics.ENV, str(tmp_path))
    off = load(tmp_path, "[metrics]\nenabled = false\n")
    assert metrics.for_worker(off, pools) is None


def test_a_stale_directory_is_emptied(tmp_path, monkeypatch):
    stale = metrics.directory_for("unit", tmp_path)
    assert stale == tmp_path / "weft.unit.metrics"
    assert metrics.directory_for("x") == Path("/dev/shm/weft.x.metrics")
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"\0" * 64)
    monkeypatch.setenv(metrics.ENV, "")
    assert metrics.prepare_directory("unit", tmp_path) == stale
    assert list(stale.iterdir()) == []
    metrics.remove_directory(stale)
    assert not stale.exists()


# -- readiness and the worker views (pure) -------------------------------------------------------


def row(pid: int, slot: int, generation: int, state: int, index: int = 0) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, slot=slot, generation=generation, state=state, row=index)


def test_ready_needs_a_ready_worker_of_the_current_generation_and_no_stop():
    assert readiness(None, []) == (False, "starting")
    state = {"generation": 2, "stopping": None}
    assert readiness(state, [row(1, 0, 2, BOOTING)])[0] is False
    assert readiness(state, [row(1, 0, 1, READY)])[0] is False  # the old generation only
    assert readiness(state, [row(1, 0, 1, READY), row(2, 0, 2, READY)])[0] is True
    assert readiness({**state, "stopping": "graceful"}, [row(2, 0, 2, READY)]) == (
        False, "stopping")


def test_the_worker_view_of_a_slot_is_its_current_generation():
    rows = [row(10, 0, 1, DRAINING, 0), row(11, 0, 2, READY, 1), row(12, 1, 2, BOOTING, 2)]
    assert worker_of_slot(rows, 0, 2) == 11
    assert worker_of_slot(rows, 0, 1) == 10
    assert worker_of_slot(rows, 1, 2) == 12
    assert worker_of_slot(rows, 0, 3) == 11  # none of that generation: the newest
    assert worker_of_slot(rows, 5, 2) is None


# -- the HTTP layer ------------------------------------------------------------------------------


@pytest.fixture
def admin_server(tmp_path: Path, metrics_dir: Path) -> Iterator[tuple[int, Path]]:
    """An AdminServer on 127.0.0.1 (token "t0ken-0123456789ab") over a fake worker table and
    buffer pool, served by a thread until the test ends."""
    pidfile = tmp_path / "w.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    (tmp_path / "w.pid.state.json").write_text(json.dumps({"generation": 1}))
    buffers = SimpleNamespace(memory=1 << 20, stats=lambda: {
        256: (0, 235), 1024: (0, 59), 4096: (0, 30), 16384: (0, 15), 65536: (2, 8)})
    shared = SimpleNamespace(rows=8, buffers=buffers, table=SimpleNamespace(
        snapshot=lambda: [row(os.getpid(), 0, 1, READY)]))
    sock = socket.create_server(("127.0.0.1", 0))
    server = AdminServer(sock, token="t0ken-0123456789ab", pidfile=pidfile,
                         metrics_dir=metrics_dir, shared=shared,  # type: ignore[arg-type]
                         supervisor=os.getppid())
    server.timeout = 0.05
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.handle_request()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield sock.getsockname()[1], pidfile
    finally:
        stop.set()
        thread.join(timeout=5.0)
        sock.close()


async def test_admin_http_layer(tmp_path, admin_server):
    port, _ = admin_server
    token = "t0ken-0123456789ab"
    cfg = load(tmp_path)
    wm = metrics.WorkerMetrics(cfg, UpstreamPools(cfg.destinations.values(), 1, 1.0))
    wm.exchange(None, SimpleNamespace(status=400), "bad_request", ("h", 1), 0.0)

    def get(path: str, tok: str | None = token):  # blocking client: run it in a thread
        return trio.to_thread.run_sync(lambda: admin_get(port, path, token=tok))

    assert (await get("/healthz", None)).status == 401
    assert (await get("/healthz", "Bearer-less")).status == 401
    assert (await get("/healthz")).status == 200
    assert (await get("/readyz")).text == "1 worker(s) of generation 1 ready\n"
    agg = await get("/metrics")
    assert agg.status == 200 and agg.headers["content-type"].startswith("text/plain")
    got = parse(agg.text)
    assert total(got, "weft_requests_total", code="400") == 1
    assert total(got, "weft_shm_slots_in_use", segment="worker_table") == 1
    assert total(got, "weft_shm_slots", segment="worker_table") == 8
    assert total(got, "weft_workers", state="ready") == 1
    assert total(got, "weft_buffers_in_use", **{"class": "64KiB"}) == 2
    assert total(got, "weft_buffers", **{"class": "256B"}) == 235
    assert total(got, "weft_buffers_memory_bytes") == 1 << 20
    mine = await get("/metrics/workers/0")
    assert mine.status == 200 and total(parse(mine.text), "weft_requests_total") == 1
    assert total(parse(mine.text), "weft_buffers") == 0  # instance-wide: aggregate only
    assert (await get("/metrics/workers/1")).status == 404
    assert (await get("/nothing")).status == 404
