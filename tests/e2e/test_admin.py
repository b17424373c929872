"""The admin listener and `weft status`, driven as an operator and a probe would.

Judges: an HTTP client on the admin port, the supervisor's process tree, and `weft status`
run as a command. Workers are made slow to boot by a middleware factory that sleeps in a
forked worker, so that "before the workers are ready" is a window a test can look into.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from support.config import base_config, destination, route, simple_config, table
from support.procs import pid_alive, run_weft_cli, wait_for
from support.prometheus import admin_answers, admin_get, send
from support.supervised import run_weft_to_exit, start_supervised

pytestmark = pytest.mark.e2e

TOKEN = "admin-token-0123456789"

SLOW_BOOT = '''
import os
import time


def factory(config):
    """Sleeps in a forked worker only (its parent is `weft run`), not when the supervisor
    loads the config."""
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        parent = f.read().split(b"\\0")
    if b"weft" in parent and b"run" in parent:
        time.sleep(config["delay"])

    async def middleware(request, next):
        return await next(request)

    return middleware
'''


def admin_config(port: int, admin_port: int, endpoint: str, instance: str | None = None,
                 **admin: object) -> str:
    return (simple_config(port, [endpoint], instance=instance)
            + table("[admin]", {"port": admin_port, **admin}))


def test_readyz_is_503_until_a_worker_is_ready_and_again_while_stopping(
        upstream, weft, free_port, tmp_path):
    a = upstream("A")
    port, admin_port = free_port(), free_port()
    (tmp_path / "slowboot.py").write_text(SLOW_BOOT)
    text = (
        base_config(port, timeouts={"drain": "10s"})
        + table("[admin]", {"port": admin_port})
        + destination("app", [a.address])
        + route("app", middleware=[{"use": "slowboot:factory", "delay": 4}])
    )
    sup = start_supervised(weft, tmp_path, text, pythonpath=[tmp_path])

    # 1. the admin answers before the worker is ready: alive, not ready
    assert wait_for(lambda: admin_answers(admin_port), 10.0, "the admin listener").status == 200
    early = admin_get(admin_port, "/readyz")
    assert early.status == 503, early.text
    assert "no worker of generation 1 is ready" in early.text

    # 2. ready once the worker is
    wait_for(lambda: admin_get(admin_port, "/readyz").status == 200, 15.0, "/readyz 200")
    assert admin_get(admin_port, "/healthz").status == 200

    # 3. a slow request in flight, then SIGTERM: draining means not ready, still alive
    statuses: list[int] = []
    slow = threading.Thread(target=lambda: statuses.append(send(port, "GET", "/slow?delay=3")))
    slow.start()
    wait_for(lambda: any(w["in_flight"] for w in sup.workers()), 5.0, "the request in flight")
    sup.weft.signal(signal.SIGTERM)
    stopping = wait_for(lambda: (r := admin_get(admin_port, "/readyz")).status == 503 and r,
                        5.0, "/readyz 503 during the stop")
    assert "stopping" in stopping.text
    assert admin_get(admin_port, "/healthz").status == 200
    slow.join(timeout=10.0)
    assert statuses == [200]  # the drain let it finish

    # 4. after the stop, nothing is left: no admin process, no listener
    assert sup.weft.proc.wait(timeout=15.0) == 0
    assert admin_answers(admin_port) is None


def test_a_token_guards_every_endpoint(upstream, weft, free_port, tmp_path):
    a = upstream("A")
    port, admin_port = free_port(), free_port()
    start_supervised(weft, tmp_path, admin_config(port, admin_port, a.address, token=TOKEN),
                     workers=1)
    for path in ("/metrics", "/metrics/workers/0", "/healthz", "/readyz", "/status"):
        refused = admin_get(admin_port, path)
        assert refused.status == 401, (path, refused.status)
        assert refused.headers["www-authenticate"] == "Bearer"
        assert admin_get(admin_port, path, token="wrong-token-0123456789").status == 401
        assert admin_get(admin_port, path, token=TOKEN).status == 200, path


def test_a_public_admin_address_without_a_token_is_refused(free_port, tmp_path):
    config = tmp_path / "public.toml"
    config.write_text(simple_config(free_port(), ["127.0.0.1:9"])
                      + table("[admin]", {"address": "0.0.0.0", "port": free_port()}))
    checked = run_weft_cli(["check", "-c", str(config)])
    assert checked.returncode == 1
    assert f'{config}: admin.address: "0.0.0.0" is not a loopback address' in checked.stderr
    assert "admin.token" in checked.stderr
    code, stderr = run_weft_to_exit(["run", "-c", str(config)], cwd=tmp_path)
    assert code == 1 and "admin.address" in stderr
    # quick mode: the same rule
    code, stderr = run_weft_to_exit(
        ["run", "--listen", f"127.0.0.1:{free_port()}", "--upstream", "127.0.0.1:9",
         "--admin", f"0.0.0.0:{free_port()}"], cwd=tmp_path)
    assert code == 1 and "is not a loopback address" in stderr
    # with a token it is accepted
    config.write_text(simple_config(free_port(), ["127.0.0.1:9"])
                      + table("[admin]", {"address": "0.0.0.0", "port": free_port(),
                                          "token": TOKEN}))
    assert run_weft_cli(["check", "-c", str(config)]).returncode == 0


def test_status_over_http_and_the_command(upstream, weft, free_port, tmp_path):
    a, b = upstream("A"), upstream("B")
    port, admin_port = free_port(), free_port()
    sup = start_supervised(weft, tmp_path, simple_config(port, [a.address, b.address],
                                                         server={"workers": 2})
                           + table("[admin]", {"port": admin_port}), workers=2)
    for _ in range(10):
        assert send(port, "GET", "/echo") == 200

    # 1. /status: the instance, its config, workers and endpoints with pool figures
    def pooled() -> dict | None:
        info = admin_get(admin_port, "/status").json()
        opened = sum(e["open"] for e in info["destinations"].get("app", []))
        return info if opened else None

    info = wait_for(pooled, 5.0, "pool figures in /status")
    assert info["instance"] == sup.instance and info["generation"] == 1
    assert info["config"].endswith(".toml") and info["config_hash"]
    assert info["stopping"] is None
    assert info["admin"]["pid"] not in {w["pid"] for w in info["workers"]}
    assert sorted(w["slot"] for w in info["workers"]) == [0, 1]
    for w in info["workers"]:
        assert w["state"].upper() == "READY" and w["in_flight"] == 0
        assert 0 <= w["heartbeat_age_s"] < 5
    endpoints = {e["endpoint"]: e for e in info["destinations"]["app"]}
    assert set(endpoints) == {a.address, b.address}
    assert all(set(e) == {"endpoint", "open", "idle", "waiting"} for e in endpoints.values())

    # 2. `weft status`: the same, as a table and as JSON
    shown = sup.cli("status")
    assert shown.returncode == 0, shown.stderr
    assert "READY" in shown.stdout and f"http://127.0.0.1:{admin_port}/" in shown.stdout
    header = next(line for line in shown.stdout.splitlines() if line.startswith("destination"))
    assert header.split() == ["destination", "endpoint", "open", "idle", "waiting"]
    assert any(line.split()[:2] == ["app", a.address] for line in shown.stdout.splitlines())
    as_json = json.loads(sup.cli("status", "--json").stdout)
    assert set(as_json["destinations"]["app"][0]) == {"endpoint", "open", "idle", "waiting"}

    # 3. no instance: a clear message
    nothing = run_weft_cli(["status", "--pidfile", str(tmp_path / "none.pid")])
    assert nothing.returncode == 1 and "no weft running" in nothing.stderr


def test_the_admin_process_is_respawned_and_answers_through_a_reload(
        upstream, weft, free_port, tmp_path):
    a = upstream("A")
    port, admin_port = free_port(), free_port()
    sup = start_supervised(weft, tmp_path, admin_config(port, admin_port, a.address), workers=1)
    first = admin_get(admin_port, "/status").json()["admin"]["pid"]

    # 1. SIGKILL the admin process: the supervisor starts another on the same socket
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not pid_alive(first), 5.0, "the admin process to die")
    second = wait_for(lambda: (r := admin_answers(admin_port, "/status")) and r.status == 200
                      and r.json()["admin"]["pid"], 10.0, "a new admin process")
    assert second != first and sup.weft.alive()

    # 2. during a reload every probe is answered
    answers: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            answers.append(admin_get(admin_port, "/healthz").status)
            answers.append(admin_get(admin_port, "/metrics").status)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        assert sup.reload().returncode == 0
        sup.wait_workers(1, generation=2)
    finally:
        stop.set()
        prober.join(timeout=15.0)
    assert answers and set(answers) == {200}
    assert admin_get(admin_port, "/readyz").status == 200


def test_quick_mode_serves_the_admin_listener(upstream, weft, free_port, tmp_path):
    a = upstream("A")
    port, admin_port = free_port(), free_port()
    weft(args=["--listen", f"127.0.0.1:{port}", "--upstream", a.address,
               "--admin", f"127.0.0.1:{admin_port}", "--workers", "1"])
    assert send(port, "GET", "/echo") == 200
    wait_for(lambda: "weft_requests_total" in admin_get(admin_port, "/metrics").text, 5.0,
             "metrics in quick mode")
    assert admin_get(admin_port, "/readyz").status == 200


def test_a_reload_applies_new_admin_settings(upstream, weft, free_port, tmp_path):
    a = upstream("A")
    port, admin_port, moved = free_port(), free_port(), free_port()
    sup = start_supervised(weft, tmp_path, admin_config(port, admin_port, a.address), workers=1)
    assert sup.weft.config_path is not None
    assert admin_get(admin_port, "/healthz").status == 200

    # 1. a token appears: the admin process is restarted with it, on the same socket
    sup.weft.config_path.write_text(admin_config(port, admin_port, a.address, sup.instance,
                                                 token=TOKEN))
    assert sup.reload().returncode == 0
    wait_for(lambda: (r := admin_answers(admin_port)) is not None and r.status == 401, 10.0,
             "the token to be required")
    assert admin_get(admin_port, "/healthz", token=TOKEN).status == 200

    # 2. the port moves: the new one answers, the old one is closed
    sup.weft.config_path.write_text(admin_config(port, moved, a.address, sup.instance,
                                                 token=TOKEN))
    assert sup.reload().returncode == 0
    wait_for(lambda: admin_answers(moved, token=TOKEN) is not None, 10.0, "the new port")
    assert admin_get(moved, "/readyz", token=TOKEN).status == 200
    assert admin_answers(admin_port) is None


def _cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (fields 14 and 15 of /proc/<pid>/stat), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_admin_process_sleeps_and_still_follows_its_supervisor(
        upstream, weft, free_port, tmp_path):
    a = upstream("A")
    port, admin_port = free_port(), free_port()
    sup = start_supervised(weft, tmp_path, admin_config(port, admin_port, a.address), workers=1)
    admin_pid = admin_get(admin_port, "/status").json()["admin"]["pid"]

    # 1. five seconds without a request: the admin process uses next to no CPU (it used a
    #    whole core, polling its socket with a zero timeout)
    before = _cpu_seconds(admin_pid)
    time.sleep(5.0)
    used = _cpu_seconds(admin_pid) - before
    assert used < 0.25, f"the idle admin process used {used:.2f}s of CPU in 5s"

    # 2. it still answers at once
    assert admin_get(admin_port, "/healthz").status == 200

    # 3. and goes when its supervisor is killed
    tree = sup.weft.pids()
    sup.mark_stopped_by_test()
    sup.weft.signal(signal.SIGKILL)
    sup.weft.returncode = sup.weft.proc.wait(timeout=5.0)
    wait_for(lambda: not pid_alive(admin_pid), 3.0, "the admin process to exit")
    # what a SIGKILLed supervisor leaves (the next start would remove it)
    from weft.metrics import directory_for, remove_directory
    from weft.shm.segment import remove_instance

    wait_for(lambda: not any(pid_alive(p) for p in tree), 3.0, "the workers to exit")
    remove_instance(sup.instance)
    remove_directory(directory_for(sup.instance))
