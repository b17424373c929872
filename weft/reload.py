"""The reload sequence: from SIGHUP to a new generation serving, or the old one still serving.

The supervisor (`weft.supervisor`) dispatches SIGHUP here; this module owns the order of the
steps and what each failure undoes. The rules:

1. **Validate first.** Load the new config (a `ConfigError` lists every error), refuse a
   changed ``server.instance`` (the shared memory and the lock are named after it), and assign
   in-flight columns for the new endpoints. A failure here changes nothing and needs no undo.
   Sizes of shared memory made at start (``limits.rate_table.capacity``, ``buffers.memory``)
   cannot change under running workers: a changed one is not refused (that would block every
   other change until it is reverted) but applies at the next restart, which the log and the
   reload's outcome message say.
2. **Announce.** systemd hears ``RELOADING=1``; every later failure says ``READY=1`` again.
3. **Bind what is new.** Sockets for listeners or slots the new config adds; on failure they
   are closed and the column map restored.
4. **Start the new generation beside the old.** One worker per slot, on the slot's existing
   socket (the sockets never change hands, so no connection is refused or reset), and wait
   until each is READY within the new ``boot_timeout``. If one is not, the new workers are
   SIGKILLed, the new sockets closed and columns restored: the old generation keeps serving.
5. **Switch.** The new generation becomes current, the admin process takes the new [admin]
   settings, the old workers are told to drain, and success is reported only once they no
   longer accept (until a worker has processed its SIGTERM, a new connection can still land
   on it and meet the old config). Sockets of removed slots and listeners are closed.
6. **Report.** ``READY=1``, the outcome in the state file (what `weft reload` waits for, with a
   sequence number), a log line and the reload metric.

Signals that arrive while the sequence waits are dispatched (a CHLD must be reaped, a TERM
stops the wait), except another SIGHUP, which waits its turn.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from weft import spiffe
from weft.schema import Config, ConfigError
from weft.shm.worktable import DRAINING
from weft.sock import ensure_fd_limit
from weft.workload_api import EndpointError

if TYPE_CHECKING:
    from weft.respawn import Child
    from weft.supervisor import Supervisor

__all__ = ["DRAIN_ACK_TIMEOUT", "Outcome", "reload"]

log = logging.getLogger("weft.supervisor")

DRAIN_ACK_TIMEOUT = 5.0  # a reload waits this long for old workers to stop accepting


@dataclass(frozen=True)
class Outcome:
    """The last reload's result, as the state file publishes it (``seq`` 0: none yet)."""

    seq: int = 0
    ok: bool = True
    message: str = ""
    generation: int = 0


class _Failed(Exception):
    """A step failed; what it set up is undone already. The message is the user's."""


def reload(sup: Supervisor) -> Outcome:
    """Run one reload of `sup` (see the module docstring) and record its outcome."""
    seq = sup.reload_state.seq + 1
    log.info("reload %d: reading the config", seq)
    try:
        message = _run(sup)
    except _Failed as e:
        outcome = Outcome(seq, False, str(e), sup.generation)
        log.error("reload %d failed: %s", seq, outcome.message)
    else:
        outcome = Outcome(seq, True, message, sup.generation)
        log.info("reload %d: %s", seq, message)
    sup.reload_state = outcome
    if sup.supervisor_metrics is not None:
        sup.supervisor_metrics.reload_done(outcome.ok, sup.generation)
    sup.write_state()
    return outcome


def _run(sup: Supervisor) -> str:
    new, columns, saved = _validate(sup)
    notes = _restart_only(sup, new)
    assert sup.colmap is not None
    try:
        identity = _identity(sup, new)
    except _Failed:
        sup.colmap.columns, sup.colmap.retired = saved
        raise
    nworkers = sup.nworkers if sup.workers_flag else sup.worker_count(new)
    ensure_fd_limit(new.limits.max_connections)  # the new workers inherit what it sets
    sup.notifier.reloading()
    try:
        new_socks = _bind(sup, new, nworkers, saved)
    except _Failed:
        if identity is not None:
            identity()
        raise
    old = [c for c in sup.children.values() if not c.retiring]
    generation = sup.generation + 1
    prev_columns, sup.columns = sup.columns, columns
    pids = [sup.spawn(slot, generation, new) for slot in range(nworkers)]
    ok, reason = sup.wait_ready(pids, new.boot_timeout)
    if not ok:
        if identity is not None:
            identity()
        for pid in pids:
            child = sup.children.get(pid)
            if child is not None:
                child.retiring = True
                sup.kill(pid, signal.SIGKILL)
        sup.columns = prev_columns
        sup.colmap.columns, sup.colmap.retired = saved
        for sock in new_socks:
            sup.sockets.close(sock)
        sup.notifier.ready(f"reload failed; generation {sup.generation} serving")
        raise _Failed(f"new workers failed: {reason}; generation {sup.generation} keeps serving")
    _switch(sup, new, generation, nworkers, old)
    sup.notifier.ready(f"{sup.nworkers} workers, generation {sup.generation}")
    return "; ".join([f"generation {generation} active", *notes])


def _identity(sup: Supervisor, new: Config) -> Callable[[], None] | None:
    """Give the identity process ``new``'s ``[spiffe]`` before the new workers wait for an
    SVID: started if it was not running, restarted if its settings changed (the published SVID
    stays meanwhile, so new workers are ready with it). A new config without ``[spiffe]``
    stops it only once the switch is done (`_switch`). Returns the undo for a failed reload."""
    try:
        settings = spiffe.settings_for(new)
    except EndpointError as e:
        raise _Failed(f"{new.source}: spiffe.endpoint: {e}") from None
    if settings is None:
        return None
    before = sup.identity.settings if sup.identity is not None else None
    try:
        sup.set_identity(settings)
    except OSError as e:
        raise _Failed(f"{new.source}: spiffe: {e}") from None
    return lambda: sup.set_identity(before)


def _validate(
    sup: Supervisor,
) -> tuple[Config, dict[str, int], tuple[dict[str, int], dict[str, int]]]:
    """The new config, its columns and the column map as it was (for an undo)."""
    try:
        new = sup.loader()
    except ConfigError as e:
        raise _Failed("\n".join(e.errors)) from None
    if new.instance != sup.instance:
        raise _Failed(
            f"{new.source}: server.instance: cannot change from "
            f'"{sup.instance}" to "{new.instance}" on reload (restart)'
        )
    assert sup.colmap is not None
    saved = (dict(sup.colmap.columns), dict(sup.colmap.retired))
    try:
        columns = sup.colmap.assign(new)
    except ValueError as e:
        raise _Failed(str(e)) from None
    if sup.shared is not None:
        for column in sup.colmap.fresh:  # free until now: no worker reads its record
            sup.shared.endpoints.reset(column)
    return new, columns, saved


def _restart_only(sup: Supervisor, new: Config) -> list[str]:
    """Notes on the changed settings that apply at the next restart only (logged here)."""
    notes = []
    shared = sup.shared
    if shared is not None and new.limits.rate_table.capacity != shared.rate_keys:
        # The table is laid out in the segment at start and keeps the buckets of every key
        # across reloads; resizing it would drop them all.
        notes.append(
            f"limits.rate_table.capacity {new.limits.rate_table.capacity} applies at the next "
            f"restart; the shared table keeps {shared.rate_keys} keys until then"
        )
    pool = shared.buffers if shared is not None else None
    if pool is not None and new.buffers.memory != pool.memory:
        # Workers of both generations hold buffers of the one pool during the switch, and the
        # data path's views point into its mapping: a live pool cannot be resized.
        notes.append(
            f"buffers.memory {new.buffers.memory} applies at the next restart; the buffer pool "
            f"keeps {pool.memory} bytes until then"
        )
    for note in notes:
        log.warning("%s: %s", new.source, note)
    return notes


def _bind(
    sup: Supervisor,
    new: Config,
    nworkers: int,
    saved: tuple[dict[str, int], dict[str, int]],
) -> list[socket.socket]:
    """Sockets for what the new config adds; on failure none stays and READY=1 is sent."""
    assert sup.colmap is not None
    new_socks: list[socket.socket] = []
    try:
        for slot in range(nworkers):
            new_socks += sup.sockets.bind_slot(slot, new.listeners)
    except OSError as e:
        for sock in new_socks:
            sup.sockets.close(sock)
        sup.colmap.columns, sup.colmap.retired = saved
        sup.notifier.ready()
        raise _Failed(f"cannot listen: {e.strerror}") from None
    return new_socks


def _switch(sup: Supervisor, new: Config, generation: int, nworkers: int, old: list[Child]) -> None:
    """Make `generation` current and drain the old workers (step 5)."""
    sup.generation = generation
    sup.config = new
    if new.spiffe is None:
        sup.set_identity(None)
    if sup.admin is not None:
        sup.admin.reconfigure(new.admin)
    old_slots = sup.nworkers
    sup.nworkers = nworkers
    for child in old:
        sup.retire(child)
    sup.wait_state([c.pid for c in old], DRAINING, DRAIN_ACK_TIMEOUT)
    for slot in range(nworkers, old_slots):
        sup.close_removed_slot(slot)
    # Sockets of listeners the new config dropped: the old workers still hold their own
    # copies until they have drained; the supervisor's copies go now.
    sup.sockets.keep_only(new.listeners)
