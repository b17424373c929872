"""What the admin listener says about the shared buffer pool: the gauges the admin process
reads from the pool at scrape time (`weft.metrics_read.buffer_families`).

Judges: the families as prometheus_client builds them. The pools are real ``buffers`` segments
of a fresh instance name (the ``instance`` fixture removes them).
"""

from __future__ import annotations

from support.prometheus import total

from weft import metrics, metrics_read
from weft.bufpool import CLASS_SIZES, BufferPool, split_memory

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
