"""The per-endpoint shared records (`weft.shm.endpoints`): layout, reset, reclaim, and the
lease and trial CAS between real processes (forked children on one anonymous MAP_SHARED
mapping, as workers share the state segment)."""

from __future__ import annotations

import mmap
import os
import time
import tomllib
from collections.abc import Iterator

import pytest

from weft import config, health
from weft.shm import atomics as atomics_mod
from weft.shm.atomics import Atomics
from weft.shm.endpoints import BREAKER, HEALTH, LEASE, TRIAL, WINDOW, WORDS, EndpointTable
from weft.workers.shared import ColumnMap

SIZE = 1 << 16
DATA = 4096
SCRATCH = 0  # words below DATA for the tests' own counters


@pytest.fixture(params=atomics_mod.BACKENDS)
def atomics(request: pytest.FixtureRequest) -> Iterator[Atomics]:
    m = mmap.mmap(-1, SIZE)
    a = Atomics(m, backend=request.param)
    yield a
    a.release()
    m.close()


def spin_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")


def test_records_are_whole_cache_lines_and_independent(atomics):
    t = EndpointTable(atomics, DATA, 4)
    assert EndpointTable.RECORD % 64 == 0
    assert t.cas(1, BREAKER, 0, 7)
    assert t.load(1, BREAKER) == 7
    assert t.load(0, BREAKER) == 0 and t.load(2, BREAKER) == 0
    with pytest.raises(IndexError):
        t.address(4, HEALTH)
    with pytest.raises(ValueError):
        EndpointTable(atomics, DATA + 8, 4)  # not cache-line aligned


def test_reset_zeroes_one_record(atomics):
    t = EndpointTable(atomics, DATA, 2)
    for column in (0, 1):
        for word in range(WORDS):
            atomics.store(t.address(column, word), 99)
    t.reset(1)
    assert all(t.load(1, w) == 0 for w in range(WORDS))
    assert all(t.load(0, w) == 99 for w in range(WORDS))
    assert t.window(1) == [0] * (len(t.window(1)))
    assert t.address(0, WINDOW) == DATA + WINDOW * 8


def test_reclaim_frees_only_the_dead_pid_s_leases_and_trials(atomics):
    t = EndpointTable(atomics, DATA, 3)
    now = 1_000
    assert t.cas(0, LEASE, 0, health.lease(0, 4242, now, 10_000))
    assert t.cas(1, LEASE, 0, health.lease(0, 5151, now, 10_000))
    assert t.claim_trial(1, 4242) and t.claim_trial(2, 5151)
    assert t.reclaim(4242) == 2
    assert t.load(0, LEASE) == 0 and t.load(1, TRIAL) == 0
    assert health.lease_owner(t.load(1, LEASE)) == 5151 and t.load(2, TRIAL) == 5151
    assert t.reclaim(4242) == 0
    assert not t.release_trial(2, 4242)  # only the holder releases


def test_two_processes_never_hold_one_trial_at_once(atomics, children):
    """Both children claim, hold and release the trial 2000 times; no claim may find another
    holder inside."""
    t = EndpointTable(atomics, DATA, 1)
    holders, overlaps, go = SCRATCH, SCRATCH + 8, SCRATCH + 16

    def claimer() -> None:
        spin_until(lambda: atomics.load(go) == 1)
        me, got = os.getpid(), 0
        while got < 2000:
            if t.claim_trial(0, me):
                if atomics.fetch_add(holders, 1) != 0:
                    atomics.fetch_add(overlaps, 1)  # someone else held it too
                atomics.fetch_add(holders, -1)
                assert t.release_trial(0, me)
                got += 1

    pids = [children.fork(claimer) for _ in range(2)]
    atomics.store(go, 1)
    assert [children.wait(p) for p in pids] == [0, 0]
    assert atomics.load(overlaps) == 0
    assert t.load(0, TRIAL) == 0


def test_of_two_processes_racing_for_a_free_lease_one_wins_and_the_other_waits(
    atomics, children
):
    t = EndpointTable(atomics, DATA, 1)
    wins, go = SCRATCH, SCRATCH + 16
    ttl = 60_000

    def prober() -> None:
        spin_until(lambda: atomics.load(go) == 1)
        now = int(time.monotonic() * 1000)
        word = t.load(0, LEASE)
        new = health.lease(word, os.getpid(), now, ttl)
        if new is not None and t.cas(0, LEASE, word, new):
            atomics.fetch_add(wins, 1)
        # whoever lost sees a live holder that is not itself
        word = t.load(0, LEASE)
        mine = health.lease_owner(word) == os.getpid()
        assert mine or health.lease(word, os.getpid(), now, ttl) is None

    pids = [children.fork(prober) for _ in range(2)]
    atomics.store(go, 1)
    assert [children.wait(p) for p in pids] == [0, 0]
    assert atomics.load(wins) == 1
    holder = health.lease_owner(t.load(0, LEASE))
    assert holder in pids
    # the holder is dead now: reclaim frees its lease for the next prober at once
    assert t.reclaim(holder) == 1
    assert health.lease(t.load(0, LEASE), os.getpid(), 0, ttl) is not None


def _config(*endpoints: str) -> config.Config:
    listed = ", ".join(f'"{e}"' for e in endpoints)
    text = (
        '[[listeners]]\naddress = "127.0.0.1"\nport = 8080\n'
        f"[destinations.web]\nendpoints = [{listed}]\n"
        '[[routes]]\ndestination = "web"\n'
    )
    return config.from_dict(tomllib.loads(text), "t.toml")


def test_a_column_given_to_a_new_endpoint_is_listed_as_fresh_and_kept_ones_are_not():
    cm = ColumnMap(8)
    first = cm.assign(_config("127.0.0.1:1", "127.0.0.1:2"))
    assert sorted(cm.fresh) == sorted(first.values())
    second = cm.assign(_config("127.0.0.1:2", "127.0.0.1:3"))
    assert second["web/127.0.0.1:2"] == first["web/127.0.0.1:2"]  # survives the reload
    assert cm.fresh == [second["web/127.0.0.1:3"]]  # only the new one is zeroed
    assert second["web/127.0.0.1:3"] != first["web/127.0.0.1:1"]  # retired, not reused yet
    cm.release_retired()
    cm.assign(_config("127.0.0.1:4"))
    assert first["web/127.0.0.1:1"] in cm.fresh  # reused once the old generation left
