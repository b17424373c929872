"""The supervisor: a synchronous parent that owns the listening sockets and forks trio workers.

It never runs trio (trio cannot fork from inside `trio.run`). Its rules, in the order they
matter to an operator:

* **Sockets stay here.** One SO_REUSEPORT socket per worker slot and listener is bound at start
  and kept open for the supervisor's life; a slot's worker, and every replacement of it, serves
  that same socket. Closing a reuseport socket would reset the connections queued on it, so a
  worker's death or a reload never closes one (only removing a listener or a slot does).
* **Signals only enqueue** (`weft.signals`). Handlers append the signal to a queue (and
  `set_wakeup_fd` wakes the loop); `loop` dispatches each to a ``handle_<name>`` method.
  TERM: graceful stop (`weft.shutdown`: workers drain, SIGKILL at the drain deadline).
  INT/QUIT: fast stop. HUP: reload. CHLD: reap. TTIN / TTOU: one worker more / less. The
  queue is also the test seam.
* **Reaping reclaims first.** A dead child is found with ``waitid(WNOWAIT)`` (it stays a zombie,
  so its pid cannot be reused), everything it owned in shared memory is released, and only
  then is it reaped. An unexpected death is respawned on the same slot, at once when the
  worker had been up a while, with a doubling backoff when it keeps dying young
  (`weft.respawn`). A worker that fails at boot during the first start stops the supervisor
  with its reason.
* **Reload is all or nothing** (`weft.reload`): a new generation starts beside the old one
  on the same sockets, and the old one drains only once every new worker is READY.
* **Watchdog.** Each worker stamps a heartbeat in its worker-table row every second; one silent
  for ``heartbeat_timeout`` gets SIGABRT (a traceback if it can), then SIGKILL, then a
  replacement.

systemd hears READY=1 when every worker is ready, RELOADING=1/READY=1 around reloads,
STOPPING=1, STATUS= lines, and WATCHDOG=1 from the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

from weft import control, metrics, shutdown, spiffe
from weft import reload as reload_mod
from weft import sock as sock_mod
from weft.admin import AdminProcess
from weft.bufpool import BufferPool
from weft.identity import IdentitySettings
from weft.identity_process import IdentityProcess
from weft.respawn import Child, SlotState
from weft.schema import Config
from weft.shm.segment import InstanceLock, InstanceRunning, SegmentError, remove_instance
from weft.shm.worktable import NOT_READY, READY
from weft.shutdown import DRAIN_MARGIN, KILL_GRACE
from weft.signals import SignalQueue
from weft.sock import SlotSockets
from weft.systemd import Notifier
from weft.workers import child as child_mod
from weft.workers.postfork import Preamble
from weft.workers.shared import ColumnMap, SharedState, observed_columns
from weft.workload_api import EndpointError

log = logging.getLogger("weft.supervisor")

TICK = 0.5  # loop wake-up when nothing happens (watchdog, respawns, systemd pings)
WAIT_TICK = 0.02  # polling the worker table while workers boot
# The signals the supervisor handles (each has a handle_<name>); a forked child resets exactly
# these (weft.workers.postfork).
SUPERVISOR_SIGNALS = (
    signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
    signal.SIGCHLD, signal.SIGTTIN, signal.SIGTTOU,
)  # fmt: skip


class StartupError(Exception):
    """The supervisor cannot start (instance running, bind failure, workers never ready)."""


class Supervisor:
    """Runs an instance until stopped. `run` returns the process exit code."""

    SIGNALS = SUPERVISOR_SIGNALS

    def __init__(
        self,
        config: Config,
        loader: Callable[[], Config],
        *,
        workers: int | None,
        pidfile: Path | None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.loader = loader
        self.workers_flag = workers
        self.nworkers = self.worker_count(config)
        self.instance = config.instance
        self.pidfile = pidfile or control.default_pidfile(self.instance)
        self.notifier = notifier or Notifier.from_env()
        self.generation = 1
        self.children: dict[int, Child] = {}
        self.slots: dict[int, SlotState] = {}
        self.sockets = SlotSockets()
        self.signals = SignalQueue()
        self.stopping: str | None = None
        self.reload_state = reload_mod.Outcome()
        self.lock: InstanceLock | None = None
        self.shared: SharedState | None = None
        self.colmap: ColumnMap | None = None
        self.columns: dict[str, int] = {}
        self._parent_pipe: tuple[int, int] | None = None
        self._next_watchdog = 0.0
        self._first_start = True
        self._tcp_migrate_noted = False  # see handle_ttou
        self.metrics_dir: Path | None = None  # see _start_observability
        self.supervisor_metrics: metrics.SupervisorMetrics | None = None
        self.admin: AdminProcess | None = None
        self.identity: IdentityProcess | None = None  # with [spiffe] (weft.identity_process)

    def worker_count(self, config: Config) -> int:
        if self.workers_flag:
            return self.workers_flag
        return config.workers or os.cpu_count() or 1

    # -- start and stop ---------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.start()
        except StartupError as e:
            log.error("%s", e)
            if self.children:
                self.stopping = "fast"
                shutdown.stop(self)
            self.cleanup()
            return 1
        try:
            self.loop()
        finally:
            self.cleanup()
        return 0

    def start(self) -> None:
        self.signals.install(self.SIGNALS)
        try:
            self.lock = InstanceLock.acquire(self.instance)
        except InstanceRunning as e:
            raise StartupError(str(e)) from None
        # Columns: one per endpoint and one per route with retries (its budget's record).
        endpoints = sum(len(d.endpoints) for d in self.config.destinations.values())
        endpoints += len(self.config.routes)
        rows = 4 * max(self.nworkers, 4) + 8  # old + new generation per slot, room for TTIN
        self.colmap = ColumnMap(max(256, 4 * endpoints))
        self.columns = self.colmap.assign(self.config)
        self.shared = SharedState.create(
            self.instance,
            rows,
            self.colmap.capacity,
            1,
            rate_keys=self.config.limits.rate_table.capacity,
        )
        memory = self.config.buffers.memory
        try:
            # Reserved in full now (posix_fallocate): a pool /dev/shm cannot hold fails here,
            # not with a SIGBUS in a worker later.
            self.shared.add_buffers(BufferPool.create(self.instance, memory, 1))
        except SegmentError as e:
            raise StartupError(f"weft: buffers.memory = {memory} bytes: {e}") from None
        self._parent_pipe = os.pipe()
        os.set_inheritable(self._parent_pipe[0], True)
        sock_mod.ensure_fd_limit(self.config.limits.max_connections)
        try:
            for slot in range(self.nworkers):
                self.sockets.bind_slot(slot, self.config.listeners)
        except OSError as e:
            raise StartupError(f"weft: {e.strerror}") from None
        control.write_pidfile(self.pidfile)
        self.write_state()
        self._start_observability()
        try:
            self.set_identity(spiffe.settings_for(self.config))
        except (EndpointError, OSError) as e:
            raise StartupError(f"weft: {self.config.source}: spiffe: {e}") from None
        self.notifier.status(f"starting {self.nworkers} workers")
        pids = [self.spawn(slot, self.generation, self.config) for slot in range(self.nworkers)]
        ok, reason = self.wait_ready(pids, self.config.boot_timeout)
        self._first_start = False
        if not ok and self.stopping:
            return  # a stop signal during start-up: the loop stops the workers cleanly
        if not ok:
            raise StartupError(f"workers did not start: {reason}")
        names = ", ".join(f"{lst.address}:{lst.port}" for lst in self.config.listeners)
        log.info(
            "instance %s: %d workers listening on %s (config %s, generation %d)",
            self.instance,
            self.nworkers,
            names,
            self.config.source,
            self.generation,
        )
        self.notifier.ready(f"{self.nworkers} workers, generation {self.generation}")

    def cleanup(self) -> None:
        self._stop_observability()
        self.sockets.close_all()
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        if self.lock is not None:
            remove_instance(self.instance)
            self.lock.release()
            self.lock = None
            control.remove_files(self.pidfile)
        if self._parent_pipe is not None:
            for fd in self._parent_pipe:
                os.close(fd)
            self._parent_pipe = None
        self.signals.close()
        self.notifier.close()

    # -- children ---------------------------------------------------------------------------

    def spawn(self, slot: int, generation: int, config: Config) -> int:
        mine = self.sockets.of_slot(slot, config.listeners)
        assert self._parent_pipe is not None and self.shared is not None
        admin = self.admin.fileno() if self.admin is not None else None
        preamble = self._preamble(mine, [] if admin is None else [admin])
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's life is in weft.workers.child
            child_mod.run(
                slot=slot,
                generation=generation,
                sockets=mine,
                config=config,
                state=self.shared,
                columns=dict(self.columns),
                parent_fd=self._parent_pipe[0],
                preamble=preamble,
            )
        self.children[pid] = Child(pid, slot, generation, time.monotonic())
        log.info("worker %d (slot %d, generation %d) started", pid, slot, generation)
        return pid

    def wait_ready(self, pids: list[int], timeout: float) -> tuple[bool, str]:
        """Wait until every pid's row is READY. Dispatches signals meanwhile (but a reload
        asked for now waits its turn). Returns (ok, reason)."""
        assert self.shared is not None
        deadline = time.monotonic() + timeout
        pending = set(pids)
        while pending:
            for info in self.shared.table.snapshot():
                if info.pid in pending and info.state == READY:
                    pending.discard(info.pid)
            if not pending:
                return True, ""
            dead = [pid for pid in pending if pid not in self.children]
            if dead:
                return False, f"worker {dead[0]} exited before it was ready"
            if self.stopping:
                return False, "stopping"
            if time.monotonic() >= deadline:
                return False, f"not ready within boot_timeout ({timeout:g}s)"
            self.signals.wait(WAIT_TICK)
            self._dispatch(defer_reload=True)
        return True, ""

    def wait_state(self, pids: list[int], state: int, timeout: float) -> bool:
        """Wait until each pid has left or shows `state` in its row (dispatching signals, a
        reload deferred). Returns whether that happened within `timeout`."""
        assert self.shared is not None
        deadline = time.monotonic() + timeout
        while True:
            rows = {i.pid: i.state for i in self.shared.table.snapshot()}
            if all(pid not in self.children or rows.get(pid) == state for pid in pids):
                return True
            if time.monotonic() >= deadline:
                return False
            self.signals.wait(WAIT_TICK)
            self._dispatch(defer_reload=True)

    def reap(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            pid = info.si_pid
            self._reclaim(pid)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            child = self.children.pop(pid, None)
            if child is not None:
                self._child_exited(child, info.si_code, info.si_status)
            else:
                how = _how(info.si_code, info.si_status)
                if not (self.admin is not None and self.admin.reaped(pid, how)):
                    if self.identity is not None:
                        self.identity.reaped(pid, how)

    def _reclaim(self, pid: int) -> None:
        """Release what a dead worker held in shared memory (it is still a zombie here)."""
        if self.shared is None:
            return
        # Every owner-tagged structure is registered there (weft.shm.owners).
        self.shared.owners.reclaim(pid)
        if self.supervisor_metrics is not None:
            self.supervisor_metrics.process_dead(pid)  # its live gauges leave the sums

    def _child_exited(self, child: Child, code: int, status: int) -> None:
        how = _how(code, status)
        if child.retiring or self.stopping:
            log.info("worker %d (slot %d) exited (%s)", child.pid, child.slot, how)
            self.close_removed_slot(child.slot)
            self._maybe_release_columns()
            return
        if child.generation != self.generation:
            log.warning("worker %d of a discarded generation exited (%s)", child.pid, how)
            return
        log.warning("worker %d (slot %d) died unexpectedly (%s)", child.pid, child.slot, how)
        if self._first_start and code == os.CLD_EXITED and status == child_mod.WORKER_BOOT_ERROR:
            return  # start() reports it and stops
        state = self.slots.setdefault(child.slot, SlotState())
        state.respawn_at = time.monotonic() + state.backoff.delay(time.monotonic() - child.started)

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for slot, state in self.slots.items():
            if state.respawn_at is not None and now >= state.respawn_at and slot < self.nworkers:
                state.respawn_at = None
                if any(
                    c.slot == slot and c.generation == self.generation and not c.retiring
                    for c in self.children.values()
                ):
                    continue
                if self.supervisor_metrics is not None:
                    self.supervisor_metrics.worker_restarted()
                self.spawn(slot, self.generation, self.config)

    def _watchdog(self) -> None:
        assert self.shared is not None
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        limit = int(self.config.heartbeat_timeout * 1e9)
        for info in self.shared.table.snapshot():
            child = self.children.get(info.pid)
            if child is None or info.state not in (READY, NOT_READY):
                continue
            if not child.aborted and now_ns - info.heartbeat_ns > limit:
                log.error(
                    "worker %d (slot %d) silent for %.1fs: SIGABRT",
                    child.pid,
                    child.slot,
                    (now_ns - info.heartbeat_ns) / 1e9,
                )
                child.aborted = True
                child.kill_at = now + KILL_GRACE
                self.kill(child.pid, signal.SIGABRT)
        self.kill_overdue("did not exit in time")

    def kill_overdue(self, why: str) -> None:
        """SIGKILL every child past its `kill_at` (drain deadline, watchdog grace)."""
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.kill_at is not None and now >= child.kill_at:
                log.error("worker %d %s: SIGKILL", child.pid, why)
                child.kill_at = None
                self.kill(child.pid, signal.SIGKILL)

    def kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def retire(self, child: Child) -> None:
        child.retiring = True
        child.kill_at = time.monotonic() + self.config.timeouts.drain + DRAIN_MARGIN
        self.kill(child.pid, signal.SIGTERM)

    # -- the loop ---------------------------------------------------------------------------

    def loop(self) -> None:
        while True:
            due = [s.respawn_at for s in self.slots.values() if s.respawn_at is not None]
            self.signals.wait(max(0.0, min([TICK, *(t - time.monotonic() for t in due)])))
            self._dispatch()
            if self.stopping:
                shutdown.stop(self)
                return
            self._respawn_due()
            self._watchdog()
            self._ping_systemd()
            if self.admin is not None:
                self.admin.tick(self._admin_preamble)
            if self.identity is not None:
                self.identity.tick(self._identity_preamble)

    def _dispatch(self, *, defer_reload: bool = False) -> None:
        deferred = []
        while self.signals.pending:
            signum = self.signals.pending.pop(0)
            if defer_reload and signum == signal.SIGHUP:
                deferred.append(signum)
                continue
            name = signal.Signals(signum).name[3:].lower()
            getattr(self, f"handle_{name}")()
        self.signals.pending[:0] = deferred

    def _ping_systemd(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        now = time.monotonic()
        if now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + interval

    # -- signal handlers --------------------------------------------------------------------

    def handle_chld(self) -> None:
        self.reap()

    def handle_term(self) -> None:
        if self.stopping is None:
            log.info("SIGTERM: graceful stop (drain deadline %gs)", self.config.timeouts.drain)
            self.stopping = "graceful"

    def handle_int(self) -> None:
        log.info("fast stop")
        self.stopping = "fast"

    handle_quit = handle_int

    def handle_hup(self) -> None:
        reload_mod.reload(self)

    def handle_ttin(self) -> None:
        assert self.shared is not None
        if 2 * (self.nworkers + 1) > self.shared.rows:
            log.warning("TTIN: the worker table has room for no more workers")
            return
        slot = self.nworkers
        try:
            self.sockets.bind_slot(slot, self.config.listeners)
        except OSError as e:
            log.error("TTIN: cannot bind for slot %d: %s", slot, e.strerror)
            return
        self.nworkers += 1
        self.spawn(slot, self.generation, self.config)
        self.write_state()

    def handle_ttou(self) -> None:
        if self.nworkers <= 1:
            log.warning("TTOU: keeping the last worker")
            return
        self.nworkers -= 1
        slot = self.nworkers
        self.slots.pop(slot, None)
        for child in list(self.children.values()):
            if child.slot == slot and not child.retiring:
                self.retire(child)
        self.close_removed_slot(slot)
        self.write_state()
        if not self._tcp_migrate_noted:
            self._tcp_migrate_noted = True
            note = sock_mod.tcp_migrate_note()
            if note is not None:
                log.info("TTOU: %s", note)

    def close_removed_slot(self, slot: int) -> None:
        if slot < self.nworkers or any(c.slot == slot for c in self.children.values()):
            return
        self.sockets.close_slot(slot)

    def _maybe_release_columns(self) -> None:
        if self.colmap is not None and all(
            c.generation == self.generation for c in self.children.values()
        ):
            self.colmap.release_retired()

    def write_state(self) -> None:
        r = self.reload_state
        control.write_state(
            self.pidfile,
            {
                "pid": os.getpid(),
                "instance": self.instance,
                "config": self.config.source,
                "config_hash": self.config.hash,
                "generation": self.generation,
                "workers": self.nworkers,
                "stopping": self.stopping,  # the admin's /readyz is 503 from here on
                "admin": self.admin.address if self.admin is not None else None,
                "reload": dataclasses.asdict(r),  # seq, ok, message, generation
                # the shared records of health, ejection and breakers, for admin and status
                "observed": observed_columns(self.config, self.columns),
            },
        )

    # -- metrics and the admin listener (weft.metrics, weft.admin) -----------------------------

    def _start_observability(self) -> None:
        """Make the metrics directory (before any worker is forked: workers inherit
        $PROMETHEUS_MULTIPROC_DIR) and start the admin process (before the workers, so that
        /readyz answers 503 while they boot)."""
        assert self.shared is not None
        try:
            self.metrics_dir = metrics.prepare_directory(self.instance)
        except OSError as e:
            raise StartupError(f"weft: cannot make the metrics directory: {e}") from None
        self.supervisor_metrics = metrics.SupervisorMetrics(self.metrics_dir, self.generation)
        if not self.config.admin.enabled:
            return
        try:
            self.admin = AdminProcess.bound(
                self.config.admin, self.pidfile, self.metrics_dir, self.shared
            )
        except OSError as e:
            raise StartupError(f"weft: admin listener: {e.strerror}") from None
        self.write_state()  # with the admin's address
        self.admin.spawn(self._admin_preamble())

    def _admin_preamble(self) -> Preamble:
        return self._preamble([], [])

    def _identity_preamble(self) -> Preamble:
        admin = self.admin.fileno() if self.admin is not None else None
        return self._preamble([], [] if admin is None else [admin])

    # -- the identity process (weft.identity_process) -------------------------------------------

    def set_identity(self, settings: IdentitySettings | None) -> None:
        """Run the identity process with `settings`: start it (before any worker that needs
        its SVID), restart it with changed settings, or stop it (None). Raises OSError when its
        directory cannot be made."""
        if settings is None:
            if self.identity is not None:
                self.identity.stop()
                self.identity = None
            return
        if self.identity is not None:
            self.identity.reconfigure(settings)
            return
        assert self.shared is not None
        proc = IdentityProcess(self.instance, settings, self.shared)
        proc.prepare()
        proc.spawn(self._identity_preamble())
        self.identity = proc

    def _preamble(self, keep: list[socket.socket], close: list[int]) -> Preamble:
        """A child keeps nothing of the supervisor's but `keep` (its listeners) and the read
        end of the liveness pipe: the instance lock above all (a held lock would outlive the
        supervisor), and the notify socket (only the supervisor talks to systemd)."""
        assert self._parent_pipe is not None and self.lock is not None
        close = [*close, *self.sockets.filenos(but=keep), *self.signals.fds, self._parent_pipe[1]]
        close.append(self.lock.fileno())
        if self.notifier.fileno() is not None:
            close.append(self.notifier.fileno())  # type: ignore[arg-type]
        return Preamble(os.getpid(), tuple(close), self.SIGNALS)

    def _stop_observability(self) -> None:
        """Last of all (the admin answers /readyz 503 while the workers drain)."""
        self.set_identity(None)
        if self.admin is not None:
            self.admin.stop()
            self.admin = None
        if self.metrics_dir is not None:
            metrics.remove_directory(self.metrics_dir)
            self.metrics_dir = None


def _how(code: int, status: int) -> str:
    if code == os.CLD_EXITED:
        return f"exit code {status}"
    return f"signal {signal.Signals(status).name}"
