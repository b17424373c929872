"""The shared buffer pool as an operator sees it: the admin listener's /metrics and /status,
and `weft status`, for a `weft run` with a 1 MiB pool.

The story: weft starts with ``[buffers] memory = "1MiB"``; the gauges give every class's count
as `weft.bufpool.split_memory` splits 1 MiB; the test then holds three 64 KiB buffers of the
pool itself (attached as `weft status` does, claimed under the test's pid: no request has to
take them), and the in-use gauge, /status and ``weft status --json`` show them until they are
released. Judges: the exposition parsed by prometheus_client's parser and the status document
(the admin's /status, and `weft status` in both forms).
"""

from __future__ import annotations

import json

import pytest
from support.config import simple_config, table
from support.procs import wait_for
from support.prometheus import admin_answers, admin_get, scrape, total
from support.supervised import start_supervised

from weft.bufpool import CLASS_SIZES, BufferPool, split_memory

pytestmark = pytest.mark.e2e

MiB = 1 << 20
LABELS = ("256B", "1KiB", "4KiB", "16KiB", "64KiB")
R64 = {"class": "64KiB"}


def test_the_pool_gauges_and_status_show_each_class_and_what_is_held(
    upstream, weft, free_port, tmp_path
):
    up = upstream("A")
    admin_port = free_port()
    config = (
        simple_config(free_port(), [up.address], server={"workers": 2})
        + table("[admin]", {"port": admin_port})
        + table("[buffers]", {"memory": "1MiB"})
    )
    sup = start_supervised(weft, tmp_path, config, workers=2)
    wait_for(lambda: admin_answers(admin_port), 10.0, "the admin listener to answer")
    counts = dict(zip(LABELS, split_memory(MiB), strict=True))

    # 1. the gauges: every class's count for 1 MiB, and the pool's memory
    got = scrape(admin_port)
    for label, n in counts.items():
        assert total(got, "weft_buffers", **{"class": label}) == n, label
    assert total(got, "weft_buffers_memory_bytes") == MiB
    before = total(got, "weft_buffers_in_use", **R64)
    # instance-wide: in the aggregate only, not in a worker's own view
    mine = scrape(admin_port, "/metrics/workers/0")
    assert total(mine, "weft_buffers") == 0
    # what a worker counts of its waits is there from its start, at zero
    for name in ("weft_buffer_waits_total", "weft_buffer_exhausted_total"):
        assert [v for n, _, v in mine if n == name] == [0.0], name

    # 2. three 64 KiB buffers held (by this process) are in use in the gauge and in /status
    pool = BufferPool.attach(sup.instance)
    held = [pool.claim(CLASS_SIZES[-1]) for _ in range(3)]
    try:
        assert None not in held
        assert total(scrape(admin_port), "weft_buffers_in_use", **R64) >= 3
        section = admin_get(admin_port, "/status").json()["buffers"]
        assert section["available"] is True and section["memory"] == MiB
        assert section["classes"]["64KiB"]["in_use"] >= 3
        assert {label: c["total"] for label, c in section["classes"].items()} == counts

        # 3. `weft status --json` has the same section, and the text a line per class
        shown = sup.cli("status", "--json")
        assert shown.returncode == 0, shown.stderr
        big = json.loads(shown.stdout)["buffers"]["classes"]["64KiB"]
        assert (big["size"], big["total"]) == (CLASS_SIZES[-1], counts["64KiB"])
        assert big["in_use"] >= 3
        text = sup.cli("status")
        assert text.returncode == 0, text.stderr
        rows = {
            line.split()[0]: line.split()[1:]
            for line in text.stdout.splitlines()
            if line.split() and line.split()[0] in LABELS
        }
        assert int(rows["64KiB"][0]) >= 3 and int(rows["64KiB"][1]) == counts["64KiB"]
    finally:
        for buf in held:
            if buf is not None:
                buf.release()
        pool.close()

    # 4. released, the gauge is back where it was (no request ran meanwhile)
    assert total(scrape(admin_port), "weft_buffers_in_use", **R64) == before
