"""`weft status`: what a running instance is doing, from its state file and shared memory.

The state file (`weft.control`) says which config and generation serve; the worker table in
shared memory says, live, which processes serve it, in which state, with how many requests in
flight and how fresh their heartbeat is; the instance's metrics files (`weft.metrics`) give the
upstream pool figures each worker samples every second; and the endpoint records in shared
memory (`weft.shm.endpoints`, found through the state file's ``observed`` columns) give, for
destinations with a ``health``, ``outlier`` or ``breaker`` section, each endpoint's health,
ejection, breaker, and which workers hold its half-open trial and its prober lease; the
buffer pool's segment (`weft.bufpool`) says how many buffers of each size class are in use.
Reading them needs no cooperation from the supervisor, so status works even while it is busy
with a reload. The admin listener's ``/status`` serves the same document.

An endpoint's entry in ``destinations`` (JSON):

=================  =========================================================================
``open`` ...       pool figures: ``open``, ``idle``, ``waiting`` (null until a worker sampled)
``health``         ``healthy``, ``degraded`` or ``unhealthy`` (observed destinations only)
``ejected``        whether it is ejected now; ``ejected_for_s`` how much longer; ``ejections``
                   how many times so far (null without an ``outlier`` section)
``breaker``        ``closed``, ``open`` or ``half_open``; ``breaker_trips`` the times it opened
                   (null without a ``breaker`` section); ``trial_pid``: the worker holding the
                   half-open trial, 0 for none
``prober_pid``     the worker whose lease runs its probes now, 0 for none (null without a
                   ``health`` section)
=================  =========================================================================

``buffers`` (JSON): ``memory``, the pool's bytes of buffers (``[buffers] memory``), and
``classes``, per size class by its label (``"64KiB"``, as the ``class`` label of the
``weft_buffers_*`` gauges): ``size`` in bytes, ``in_use`` and ``total`` buffers. When the
pool's segment cannot be read (the instance is stopping, or was started by a weft without a
pool), ``{"available": false, "error": why}`` instead, and the rest of the status is shown.

``identity`` (JSON, with ``[spiffe]``; null without): what the identity process published last
(`weft.identity`): ``spiffe_id`` and ``not_after`` of weft's X.509-SVID (null while it has
none), ``trust_domains`` whose bundles it holds, ``generation``, ``problem`` (why there is no
SVID, null when all is well), and the state of its two Workload API watches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from weft import control, metrics, metrics_read
from weft.bufpool import BufferPool
from weft.identity import MANIFEST
from weft.identity_process import directory_for
from weft.observer import monotonic_ms, observed_states
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
        observed = observed_states(shared.endpoints, state.get("observed") or {}, monotonic_ms())
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
        "destinations": destinations(state["instance"], observed),
        "buffers": buffers(state["instance"]),
        "identity": identity(state["instance"]),
    }


def identity(instance: str) -> dict[str, Any] | None:
    """The ``identity`` section: what the identity process published last (`weft.identity`),
    None for an instance without ``[spiffe]`` (nothing published)."""
    try:
        manifest = json.loads((directory_for(instance) / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"available": False, "error": str(e)}
    svid = manifest.get("svid") or {}
    return {
        "endpoint": manifest.get("endpoint"),
        "generation": manifest.get("generation"),
        "spiffe_id": svid.get("spiffe_id"),
        "not_after": svid.get("not_after"),
        "trust_domains": sorted(manifest.get("bundles") or {}),
        "problem": manifest.get("problem"),
        "x509_watch": manifest.get("x509_watch"),
        "jwt_watch": manifest.get("jwt_watch"),
    }


def buffers(instance: str) -> dict[str, Any]:
    """The ``buffers`` section (see the module docstring), read from the pool's segment, which
    is mapped for this call and closed before it returns. A segment that cannot be attached
    (SegmentError, or an OSError mapping it) makes the section say so; it never raises."""
    try:
        pool = BufferPool.attach(instance)
    except (SegmentError, OSError) as e:
        return {"available": False, "error": str(e)}
    try:
        stats, memory = pool.stats(), pool.memory
    finally:
        pool.close()
    return buffer_figures(stats, memory)


def buffer_figures(stats: Mapping[int, tuple[int, int]], memory: int) -> dict[str, Any]:
    """The ``buffers`` section from `BufferPool.stats` (``{class size: (in use, total)}``)
    and the pool's `memory`."""
    return {
        "available": True,
        "memory": memory,
        "classes": {
            metrics.buffer_class_label(size): {"size": size, "in_use": used, "total": total}
            for size, (used, total) in sorted(stats.items())
        },
    }


def destinations(
    instance: str, observed: dict[str, dict[str, Any]] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Pool figures per destination and endpoint, summed over the live workers, as they last
    sampled them into the instance's metrics files (at most a second old), with the shared
    state of observed endpoints (`observed`: `weft.observer.observed_states`) added."""
    figures = metrics_read.pool_figures(metrics.directory_for(instance))
    out = {
        dest: {ep: {"endpoint": ep, **values} for ep, values in eps.items()}
        for dest, eps in figures.items()
    }
    for dest, info in (observed or {}).items():
        eps = out.setdefault(dest, {})
        for ep, snap in info["endpoints"].items():
            entry = eps.setdefault(ep, {"endpoint": ep, **dict.fromkeys(metrics.POOL_STATES)})
            entry.update(endpoint_state(info, snap))
    return {dest: [eps[ep] for ep in sorted(eps)] for dest, eps in sorted(out.items())}


def endpoint_state(info: dict[str, Any], snap: dict[str, Any]) -> dict[str, Any]:
    """An observed endpoint's part of its entry (see the module docstring): the `snapshot`,
    with null for what a section the destination lacks would say."""
    outlier, breaker, probed = info.get("outlier"), info.get("breaker"), info.get("health")
    return {
        "health": snap["health"],
        "ejected": snap["ejected"] if outlier else None,
        "ejected_for_s": round(snap["ejected_for_s"], 1) if outlier else None,
        "ejections": snap["ejections"] if outlier else None,
        "breaker": snap["breaker"] if breaker else None,
        "breaker_trips": snap["breaker_trips"] if breaker else None,
        "trial_pid": snap["trial_pid"] if breaker else None,
        "prober_pid": snap["prober_pid"] if probed else None,
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
        width = max(len("endpoint"), *(len(e["endpoint"]) for eps in dests.values() for e in eps))
        dwidth = max(len("destination"), *(len(d) for d in dests))
        observed = any("health" in e for eps in dests.values() for e in eps)
        lines.append("")
        header = (
            f"{'destination':<{dwidth}} {'endpoint':<{width}} {'open':>6} {'idle':>6} "
            f"{'waiting':>8}"
        )
        lines.append(header + (_OBSERVED_HEADER if observed else ""))
        for dest, eps in dests.items():
            for e in eps:
                line = (
                    f"{dest:<{dwidth}} {e['endpoint']:<{width}} {_cell(e['open']):>6} "
                    f"{_cell(e['idle']):>6} {_cell(e['waiting']):>8}"
                )
                lines.append(line + (_observed_cells(e) if observed else ""))
    if info.get("buffers"):
        lines.append("")
        lines.extend(_buffer_lines(info["buffers"]))
    ident = info.get("identity")
    if ident:
        lines.append("")
        lines.append(_identity_line(ident))
    if info.get("admin"):
        lines.append("")
        lines.append(f"admin    http://{info['admin']}/ (/metrics, /healthz, /readyz, /status)")
    if info.get("stopping"):
        lines.insert(1, f"STOPPING ({info['stopping']})")
    return "\n".join(lines)


# The columns of an observed endpoint, after the pool figures: health; time left of an ejection
# ("no" when not ejected) and ejections so far; breaker state and trips; the pids holding the
# half-open trial and the prober lease. "-": the destination has no such section, or nobody.
_OBSERVED_HEADER = (
    f" {'health':<9} {'ejected':>7} {'ejections':>9} {'breaker':<9} {'trips':>5} "
    f"{'trial':>8} {'prober':>8}"
)


def _identity_line(ident: dict[str, Any]) -> str:
    if ident.get("available") is False:
        return f"identity unreadable: {ident.get('error')}"
    if ident.get("spiffe_id"):
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ident["not_after"]))
        text = f"identity {ident['spiffe_id']} until {until} (generation {ident['generation']})"
    else:
        text = "identity NONE"
    if ident.get("problem"):
        text += f": {ident['problem']}"
    return text


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _observed_cells(e: dict[str, Any]) -> str:
    if "health" not in e:
        return f" {'-':<9} {'-':>7} {'-':>9} {'-':<9} {'-':>5} {'-':>8} {'-':>8}"
    if e["ejected"] is None:
        ejected = "-"
    else:
        ejected = f"{e['ejected_for_s']:.1f}s" if e["ejected"] else "no"
    return (
        f" {e['health']:<9} {ejected:>7} {_cell(e['ejections']):>9} "
        f"{_cell(e['breaker']):<9} {_cell(e['breaker_trips']):>5} "
        f"{_cell(e['trial_pid'] or None):>8} {_cell(e['prober_pid'] or None):>8}"
    )


def _buffer_lines(section: dict[str, Any]) -> list[str]:
    """The buffer pool: its memory and what is in use, then in use / total per size class."""
    if not section.get("available"):
        return [f"buffers  unavailable: {section.get('error', 'unknown')}"]
    classes = section["classes"]
    used = sum(c["in_use"] for c in classes.values())
    count = sum(c["total"] for c in classes.values())
    used_bytes = sum(c["in_use"] * c["size"] for c in classes.values())
    lines = [
        f"buffers  {_bytes(section['memory'])}: {used} of {count} in use ({_bytes(used_bytes)})",
        f"{'class':>6} {'in use':>8} {'total':>8}",
    ]
    for label, c in classes.items():
        lines.append(f"{label:>6} {c['in_use']:>8} {c['total']:>8}")
    return lines


def _bytes(n: int) -> str:
    """`n` bytes in the largest binary unit that divides it (as [buffers] memory is written)."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"
