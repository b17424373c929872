"""The shared buffer pool as `weft run` makes it: its segment exists from start to stop, a
killed worker's buffers go back to the pool, and a reload keeps the pool's size.

The judges are /dev/shm itself and the pool attached from the test, as `weft status` would.
The test tags buffers with a worker's pid itself, as that worker's claims would, so that what
it holds is known exactly (tests/e2e/test_relay_buffers.py kills a worker whose relay holds
its buffer).
"""

from __future__ import annotations

import os
import signal

import pytest
from support.config import simple_config, table
from support.procs import pid_alive, wait_for
from support.supervised import shm_segments, start_supervised

from weft.bufpool import BufferPool, split_memory

pytestmark = pytest.mark.e2e


def test_the_pool_segment_lives_from_start_to_stop_and_survives_a_reload(
    upstream, weft, free_port, tmp_path
):
    up = upstream("A")
    config = simple_config(free_port(), [up.address], server={"workers": 2})
    sup = start_supervised(
        weft, tmp_path, config + table("[buffers]", {"memory": "1MiB"}), workers=2
    )
    # The supervisor has finished starting (a worker killed before that fails the start
    # instead of being replaced).
    wait_for(lambda: "workers listening on" in sup.weft.stderr_text(), 10,
             "the supervisor to finish starting")
    # 1. the segment is there, sized for 1 MiB of buffers, every buffer free
    path = f"/dev/shm/weft-{sup.instance}-buffers"
    assert os.path.exists(path), shm_segments(sup.instance)
    inode = os.stat(path).st_ino
    pool = BufferPool.attach(sup.instance)
    try:
        assert (pool.memory, pool.counts) == (1 << 20, split_memory(1 << 20))
        assert all(n == 0 for n, _ in pool.stats().values())

        # 2. a worker holding buffers is SIGKILLed: the supervisor frees them (before reaping
        #    it), and a replacement takes its slot
        victim = sup.workers()[0]["pid"]
        pool._start_hints(os.getpid())
        held = [pool._claim_in(c, victim) for c in (0, 0, 4)]
        assert None not in held and pool.stats()[256][0] == 2
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not pid_alive(victim), 5.0, "the killed worker to die")
        # Dead (a zombie) comes before the supervisor's reap, which reclaims first.
        wait_for(lambda: pool.owned_by(victim) == {}, 5.0, "the supervisor's reclaim")
        assert all(n == 0 for n, _ in pool.stats().values())
        sup.wait_workers(2, exclude=[victim])

        # 3. a reload asking for 2 MiB succeeds, says the size waits for a restart, and
        #    leaves the pool as it is
        assert sup.weft.config_path is not None
        sup.weft.config_path.write_text(config + table("[buffers]", {"memory": "2MiB"}))
        result = sup.reload()
        assert result.returncode == 0, result.stdout + result.stderr
        assert "buffers.memory 2097152 applies at the next restart" in result.stdout
        sup.wait_workers(2, generation=2)
        assert os.stat(path).st_ino == inode
        again = BufferPool.attach(sup.instance)
        assert again.counts == split_memory(1 << 20)
        again.close()
    finally:
        pool.close()

    # 4. stopped, the segment is gone with the others
    assert sup.stop_cli().returncode == 0
    assert sup.weft.proc.wait(timeout=10.0) == 0
    assert not os.path.exists(path)
    assert shm_segments(sup.instance) == []
