"""Reading weft's metrics: the merged families of the metrics directory, the pool figures
`weft status` shows, and the instance-wide gauges of endpoint health, ejection and breakers
and of the shared buffer pool.

`weft.metrics` owns the families and the writing side (the workers' and the supervisor's
files); this module is what the admin process and `weft status` run to read them, kept apart
so that neither side's code is in the other's way. Nothing here writes.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weft.metrics import BREAKER_STATES, HEALTH_STATES, POOL_STATES, buffer_class_label

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "FilesCollector",
    "buffer_families",
    "collect",
    "endpoint_families",
    "files_of",
    "pool_figures",
]


# -- the admin process: instance-wide gauges from shared memory -------------------------------


def endpoint_families(states: Mapping[str, Mapping[str, Any]]) -> list[Metric]:
    """The health, ejection and breaker gauges of every observed endpoint, from `states` as
    `weft.observer.observed_states` reads them from the shared records (the admin process
    calls this at scrape time: these are instance-wide facts, not counted by any worker).

    ``weft_endpoint_health`` for every observed destination, ``weft_endpoint_ejected`` for
    those with an ``outlier`` section, ``weft_breaker_state`` for those with a ``breaker``. A
    state gauge is 1 for the endpoint's current state and 0 for the others, so that
    ``weft_endpoint_health{state="unhealthy"} == 1`` selects the unhealthy endpoints and a
    series never vanishes when the state changes. Families without a sample are left out.
    """
    from prometheus_client.core import GaugeMetricFamily

    health = GaugeMetricFamily(
        "weft_endpoint_health",
        "Health of an observed endpoint: 1 for its current state, 0 for the others.",
        labels=["destination", "endpoint", "state"],
    )
    ejected = GaugeMetricFamily(
        "weft_endpoint_ejected",
        "Whether passive outlier detection has the endpoint ejected now (1) or not (0).",
        labels=["destination", "endpoint"],
    )
    breaker = GaugeMetricFamily(
        "weft_breaker_state",
        "Circuit breaker of an endpoint: 1 for its current state, 0 for the others.",
        labels=["destination", "endpoint", "state"],
    )
    for dest, info in sorted(states.items()):
        for ep, snap in info["endpoints"].items():
            for state in HEALTH_STATES:
                health.add_metric([dest, ep, state], 1.0 if snap["health"] == state else 0.0)
            if info.get("outlier"):
                ejected.add_metric([dest, ep], 1.0 if snap["ejected"] else 0.0)
            if info.get("breaker"):
                for state in BREAKER_STATES:
                    breaker.add_metric([dest, ep, state], 1.0 if snap["breaker"] == state else 0.0)
    return [f for f in (health, ejected, breaker) if f.samples]


def buffer_families(stats: Mapping[int, tuple[int, int]], memory: int) -> list[Metric]:
    """The shared buffer pool's gauges, from `stats` as `weft.bufpool.BufferPool.stats` reads
    them (``{class size: (in use, total)}``) and the pool's `memory` (``[buffers] memory``).

    ``weft_buffers_in_use{class}`` and ``weft_buffers{class}`` (the class's buffers, in use or
    free), one sample per class in size order, labelled by `weft.metrics.buffer_class_label`
    (``64KiB``), and ``weft_buffers_memory_bytes``. Like the endpoint gauges these are one
    instance-wide fact the admin process reads at scrape time, not something any worker counts.

    Not ``weft_buffers_total``: the ``_total`` suffix is the counters' (promtool's lint refuses
    it on a gauge), so the pair is named as ``weft_shm_slots_in_use`` / ``weft_shm_slots`` is.
    """
    from prometheus_client.core import GaugeMetricFamily

    in_use = GaugeMetricFamily(
        "weft_buffers_in_use",
        "Buffers of the shared pool in use now, per size class.",
        labels=["class"],
    )
    buffers = GaugeMetricFamily(
        "weft_buffers",
        "Buffers of the shared pool, in use or free, per size class.",
        labels=["class"],
    )
    for size, (used, count) in sorted(stats.items()):
        label = buffer_class_label(size)
        in_use.add_metric([label], used)
        buffers.add_metric([label], count)
    mem = GaugeMetricFamily(
        "weft_buffers_memory_bytes",
        "Bytes of buffers in the shared pool ([buffers] memory), all classes together.",
        value=memory,
    )
    return [in_use, buffers, mem]


# -- reading ----------------------------------------------------------------------------------


def files_of(directory: Path, pid: int | None = None) -> list[str]:
    """The value files of every process, or of `pid` alone.

    A file a process is creating right now is empty until prometheus_client has sized it
    (open, then truncate to 64 KiB): it holds no value yet, and reading it would fail.
    """
    pattern = "*.db" if pid is None else f"*_{pid}.db"
    out = []
    for path in glob.glob(os.path.join(glob.escape(str(directory)), pattern)):
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(path) >= 8:  # the used-bytes word and its padding
                out.append(path)
    return out


def collect(directory: Path, pid: int | None = None) -> Iterable[Metric]:
    """The families merged over every process's files (or `pid`'s): counters and histograms
    summed, gauges by their multiprocess mode."""
    from prometheus_client.multiprocess import MultiProcessCollector

    # A live gauge file that mark_process_dead removes between the glob and the read is
    # skipped by merge itself; counter and histogram files are never removed while the
    # instance lives.
    return MultiProcessCollector.merge(files_of(directory, pid), accumulate=True)


class FilesCollector:
    """A prometheus_client collector over the metrics directory (all of it, or one pid)."""

    def __init__(self, directory: Path, pid: int | None = None) -> None:
        self.directory = directory
        self.pid = pid

    def collect(self) -> Iterator[Metric]:
        yield from collect(self.directory, self.pid)


def pool_figures(directory: Path, pid: int | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """``{destination: {endpoint: {"open": n, "idle": n, "waiting": n}}}`` summed over the live
    workers (or of `pid`), as last sampled by them."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    with contextlib.suppress(FileNotFoundError):
        for metric in collect(directory, pid):
            if metric.name != "weft_pool_connections":
                continue
            for s in metric.samples:
                dest, ep, state = s.labels["destination"], s.labels["endpoint"], s.labels["state"]
                figures = out.setdefault(dest, {}).setdefault(ep, dict.fromkeys(POOL_STATES, 0))
                figures[state] = figures.get(state, 0) + int(s.value)
    return out
