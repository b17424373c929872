"""`weft status`: what a running instance is doing, from its state file and shared memory.

The state file (`weft.control`) says which config and generation serve; the worker table in
shared memory says, live, which processes serve it, in which state, with how many requests in
flight and how fresh their heartbeat is; the instance's metrics files (`weft.metrics`) give the
upstream pool figures each worker samples every second. Reading them needs no cooperation from
the supervisor, so status works even while it is busy with a reload. The admin listener's
``/status`` serves the same document.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from weft import control, metrics
from weft.shm.segment import SegmentError
from weft.shm.worktable import STATE_NAMES
from weft.workers.shared import SharedState


def collect(pidfile: Path) -> dict[str, Any]:
    """The status as a dict (the `--json` output). Raises ControlError when nothing runs."""
    pid = control.read_pid(pidfile)
    state = control.read_state(pidfile)
    now_ns = time.monotonic_ns()
    workers = []
    try:
        shared = SharedState.attach(state["instance"])
    except (SegmentError, OSError) as e:
        raise control.ControlError(f"cannot read the shared state of pid {pid}: {e}") from None
    try:
        for info in shared.table.snapshot():
            workers.append(
                {
                    "pid": info.pid,
                    "slot": info.slot,
                    "generation": info.generation,
                    "state": STATE_NAMES.get(info.state, str(info.state)),
                    "heartbeat_age_s": round((now_ns - info.heartbeat_ns) / 1e9, 3),
                    "in_flight": info.inflight,
                    "requests": info.requests,
                }
            )
    finally:
        shared.close()
    workers.sort(key=lambda w: (w["slot"], w["generation"]))
    return {
        "pid": pid,
        "instance": state.get("instance"),
        "config": state.get("config"),
        "config_hash": state.get("config_hash"),
        "generation": state.get("generation"),
        "workers": workers,
        "last_reload": state.get("reload"),
        "stopping": state.get("stopping"),
        "admin": state.get("admin"),
        "destinations": destinations(state["instance"]),
    }


def destinations(instance: str) -> dict[str, list[dict[str, Any]]]:
    """Pool figures per destination and endpoint, summed over the live workers, as they last
    sampled them into the instance's metrics files (at most a second old)."""
    figures = metrics.pool_figures(metrics.directory_for(instance))
    return {
        dest: [{"endpoint": ep, **values} for ep, values in sorted(eps.items())]
        for dest, eps in sorted(figures.items())
    }


def render(info: dict[str, Any]) -> str:
    lines = [
        f"instance {info['instance']}  pid {info['pid']}  generation {info['generation']}",
        f"config   {info['config']} ({info['config_hash']})",
    ]
    reload = info.get("last_reload") or {}
    if reload.get("seq"):
        outcome = "ok" if reload.get("ok") else "FAILED"
        lines.append(f"reload   #{reload['seq']} {outcome}: {reload.get('message', '')}")
    lines.append("")
    lines.append(
        f"{'slot':>4} {'pid':>8} {'gen':>4} {'state':<9} {'heartbeat':>10} "
        f"{'in-flight':>9} {'requests':>9}"
    )
    for w in info["workers"]:
        lines.append(
            f"{w['slot']:>4} {w['pid']:>8} {w['generation']:>4} {w['state']:<9} "
            f"{w['heartbeat_age_s']:>9.1f}s {w['in_flight']:>9} {w['requests']:>9}"
        )
    if not info["workers"]:
        lines.append("(no workers)")
    dests = info.get("destinations") or {}
    if dests:
        width = max(len(e["endpoint"]) for eps in dests.values() for e in eps)
        dwidth = max(len("destination"), *(len(d) for d in dests))
        lines.append("")
        lines.append(
            f"{'destination':<{dwidth}} {'endpoint':<{width}} {'open':>6} {'idle':>6} "
            f"{'waiting':>8}"
        )
        for dest, eps in dests.items():
            for e in eps:
                lines.append(
                    f"{dest:<{dwidth}} {e['endpoint']:<{width}} {e['open']:>6} {e['idle']:>6} "
                    f"{e['waiting']:>8}"
                )
    if info.get("admin"):
        lines.append("")
        lines.append(f"admin    http://{info['admin']}/ (/metrics, /healthz, /readyz, /status)")
    if info.get("stopping"):
        lines.insert(1, f"STOPPING ({info['stopping']})")
    return "\n".join(lines)
