"""What the admin listener, a worker's metrics and `weft status` say about the shared buffer
pool: the gauges the admin process reads from the pool at scrape time
(`weft.metrics_read.buffer_families`), the counters a worker writes from ``request.ctx``
(``buffer_waits``, ``buffer_exhausted``), and the status section read from the segment.

Judges: the families as prometheus_client builds them, the multiprocess files read back with
the admin's merge (``metrics_dir``), and the status document and text. The pools are real
``buffers`` segments of a fresh instance name (the ``instance`` fixture removes them).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from support.config import MINIMAL_CONFIG
from support.prometheus import total

from weft import config, metrics, metrics_read, status
from weft.bufpool import CLASS_SIZES, BufferPool, split_memory
from weft.connection import UpstreamPools

MiB = 1 << 20
LABELS = ["256B", "1KiB", "4KiB", "16KiB", "64KiB"]


def gauges(stats: dict[int, tuple[int, int]], memory: int) -> list[tuple[str, dict, float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for family in metrics_read.buffer_families(stats, memory)
        for s in family.samples
    ]


# -- the admin's gauges --------------------------------------------------------------------------


def test_class_labels_are_the_sizes_in_binary_units():
    assert [metrics.buffer_class_label(size) for size in CLASS_SIZES] == LABELS
    assert metrics.buffer_class_label(1536) == "1536B"  # not a whole KiB: bytes


def test_gauges_give_in_use_and_total_per_class_in_size_order_and_the_memory():
    # a fake stats dict, out of order, as BufferPool.stats returns it
    stats = {65536: (3, 8), 256: (0, 235), 16384: (1, 15), 1024: (59, 59), 4096: (0, 30)}
    got = gauges(stats, MiB)
    in_use = [(labels["class"], v) for name, labels, v in got if name == "weft_buffers_in_use"]
    assert in_use == [("256B", 0), ("1KiB", 59), ("4KiB", 0), ("16KiB", 1), ("64KiB", 3)]
    totals = {labels["class"]: v for name, labels, v in got if name == "weft_buffers"}
    assert totals == {"256B": 235, "1KiB": 59, "4KiB": 30, "16KiB": 15, "64KiB": 8}
    assert total(got, "weft_buffers_memory_bytes") == MiB
    # every family is a gauge: instance-wide facts, never summed over workers
    assert {f.type for f in metrics_read.buffer_families(stats, MiB)} == {"gauge"}


def test_gauges_follow_claims_on_a_real_pool(instance):
    pool = BufferPool.create(instance, MiB)
    try:
        assert total(gauges(pool.stats(), pool.memory), "weft_buffers_in_use") == 0
        held = [pool.claim(64 << 10) for _ in range(3)] + [pool.claim(100)]
        got = gauges(pool.stats(), pool.memory)
        assert total(got, "weft_buffers_in_use", **{"class": "64KiB"}) == 3
        assert total(got, "weft_buffers_in_use", **{"class": "256B"}) == 1
        assert total(got, "weft_buffers", **{"class": "64KiB"}) == split_memory(MiB)[4]
        for buf in held:
            assert buf is not None and buf.release()
        assert total(gauges(pool.stats(), pool.memory), "weft_buffers_in_use") == 0
    finally:
        pool.close()


# -- the worker's counters -----------------------------------------------------------------------


def samples(directory: Path) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value)
        for m in metrics_read.collect(directory)
        for s in m.samples
    ]


def request(cfg: config.Config, **ctx: object) -> SimpleNamespace:
    return SimpleNamespace(
        method="GET",
        route=cfg.routes[0],
        ctx=dict(ctx),
        body=SimpleNamespace(received=0),
        start=0.0,
    )


async def test_a_worker_counts_buffer_waits_and_exhaustion_from_the_request_context(
    tmp_path, metrics_dir
):
    path = tmp_path / "weft.toml"
    path.write_text(MINIMAL_CONFIG)
    cfg = config.load(path)
    wm = metrics.WorkerMetrics(cfg, UpstreamPools(cfg.destinations.values(), 1, 1.0))
    ok = SimpleNamespace(status=200, bytes_out=0)
    unavailable = SimpleNamespace(status=503, bytes_out=0)
    # 1. both counters are there from the start, at zero, without labels
    got = samples(metrics_dir)
    assert [x for x in got if x[0] == "weft_buffer_waits_total"] == [
        ("weft_buffer_waits_total", {}, 0.0)
    ]
    assert [x for x in got if x[0] == "weft_buffer_exhausted_total"] == [
        ("weft_buffer_exhausted_total", {}, 0.0)
    ]
    # 2. waits add up by the number the request waited; a request that gave up counts once
    wm.exchange(request(cfg, buffer_waits=2), ok, None, ("h", 1), 0.1)
    wm.exchange(
        request(cfg, buffer_waits=5, buffer_exhausted=True), unavailable, None, ("h", 1), 0.1
    )
    wm.exchange(request(cfg, buffer_waits=0), ok, None, ("h", 1), 0.1)
    wm.exchange(request(cfg), ok, None, ("h", 1), 0.1)  # neither key: nothing counted
    # 3. a client that left while its request waited: counted all the same
    gone = request(cfg, buffer_waits=1, buffer_exhausted=True)
    wm.route_started(gone)
    wm.abandoned(gone)
    got = samples(metrics_dir)
    assert total(got, "weft_buffer_waits_total") == 8
    assert total(got, "weft_buffer_exhausted_total") == 2


# -- /status and `weft status` -------------------------------------------------------------------


def status_info(buffers: dict) -> dict:
    return {
        "instance": "unit",
        "pid": 1,
        "generation": 1,
        "config": "weft.toml",
        "config_hash": "h",
        "workers": [],
        "destinations": {},
        "buffers": buffers,
    }


def test_the_status_section_reads_the_pool_segment_and_closes_it(instance):
    pool = BufferPool.create(instance, MiB)
    try:
        held = [pool.claim(64 << 10) for _ in range(3)]
        section = status.buffers(instance)
        counts = dict(zip(LABELS, split_memory(MiB), strict=True))
        assert section["available"] is True and section["memory"] == MiB
        assert list(section["classes"]) == LABELS
        assert section["classes"]["64KiB"] == {"size": 65536, "in_use": 3, "total": counts["64KiB"]}
        assert section["classes"]["256B"] == {"size": 256, "in_use": 0, "total": counts["256B"]}
        for buf in held:
            assert buf is not None and buf.release()
    finally:
        pool.close()

    lines = status.render(status_info(section)).splitlines()
    start = lines.index(next(line for line in lines if line.startswith("buffers")))
    assert lines[start] == "buffers  1MiB: 3 of 347 in use (192KiB)"
    assert lines[start + 1].split() == ["class", "in", "use", "total"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 2 : start + 7]}
    assert rows == {
        label: [str(3 if label == "64KiB" else 0), str(n)] for label, n in counts.items()
    }


def test_a_pool_that_cannot_be_read_is_reported_not_fatal(instance):
    # no segment at all: the section says why, and the rest of the status still renders
    section = status.buffers(instance)
    assert section["available"] is False
    assert f"weft-{instance}-buffers" in section["error"]
    lines = status.render(status_info(section)).splitlines()
    assert any(line.startswith("buffers  unavailable: no shared-memory segment") for line in lines)
