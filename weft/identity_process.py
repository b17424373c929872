"""The identity process, as the supervisor keeps it: forked, respawned, reconfigured, stopped.

With ``[spiffe]`` the supervisor forks one process that holds the instance's only Workload API
connection (`weft.identity.run_identity`: operators want one stream per host, not one per
worker) and publishes each SVID and bundle change as files on tmpfs plus a generation word in
shared memory (`weft.workers.shared.SharedState.publish_identity`), which workers read
(`weft.spiffe`). It is shaped like the admin process (`weft.admin.AdminProcess`) and for the
same reasons: a process of its own so that a slow or hostile agent can never delay the
supervisor's loop, and so that no thread lives in a process that forks.

* **Start**: before the first worker, so that the first SVID is on its way while workers boot
  (a worker waits for it up to ``first_fetch_timeout``). A stale directory left by a killed
  instance of the same name is removed first: its SVID must never be served.
* **Respawn**: whenever it dies, with the doubling backoff of `weft.respawn.Backoff` (a process
  that exits because the agent said "stop" per the spec is respawned too, slowly: the agent
  may be fixed later). The published files and the generation word survive it, so workers go
  on serving the SVID they have until it expires.
* **Reload**: a changed ``[spiffe]`` restarts the process with the new settings (a new
  connection); an unchanged one leaves it alone.
* **Stop**: last of all, with the published directory removed (it holds a private key).

The child: trio in a fresh process (``trio.run`` after the fork), SIGTERM ends it, SIGHUP, SIGINT
and SIGQUIT are ignored (the supervisor's business), and the parent-death signal of the
preamble ends it with the supervisor.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import sys
import traceback
from pathlib import Path

import trio

from weft.identity import IdentitySettings, IdentityStore, run_identity
from weft.respawn import HelperProcess
from weft.workers.postfork import Preamble, exit_child
from weft.workers.shared import SharedState
from weft.workload_api import WatchStopped

log = logging.getLogger("weft.identity")

SHM_DIR = Path("/dev/shm")  # tmpfs: the SVID's key never reaches a disk


def directory_for(instance: str) -> Path:
    """Where an instance's identity is published (`weft.identity.IdentityStore`)."""
    return SHM_DIR / f"weft.{instance}.spiffe"


def remove_directory(directory: Path) -> None:
    """Remove a published directory if it is this user's (never follow a symlink)."""
    try:
        st = directory.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
        shutil.rmtree(directory, ignore_errors=True)


class IdentityProcess(HelperProcess):
    """The identity process of one instance (module docstring; the respawn, restart and stop
    are `weft.respawn.HelperProcess`'s)."""

    name = "identity process"

    def __init__(self, instance: str, settings: IdentitySettings, shared: SharedState) -> None:
        super().__init__()
        self.directory = directory_for(instance)
        self.settings = settings
        self.shared = shared

    def prepare(self) -> None:
        """Clear what a previous instance of this name left, and make the directory (0700).
        Raises OSError (PermissionError naming the path when it is not ours)."""
        remove_directory(self.directory)
        IdentityStore.create(self.directory)

    def spawn(self, preamble: Preamble) -> int:
        pid = self._fork(lambda: _child_main(self, preamble))
        log.info("identity process %d: Workload API at %s", pid, self.settings.endpoint.uri)
        return pid

    def reconfigure(self, settings: IdentitySettings) -> None:
        """A reload: restart the process with changed settings (at once: not a young death)."""
        if settings == self.settings:
            return
        self.settings = settings
        self.restart()

    def stop(self) -> None:
        """Stop the process (bounded wait, then SIGKILL) and remove the published directory."""
        self.stop_process()
        self.respawn_at = None
        remove_directory(self.directory)


def _child_main(proc: IdentityProcess, preamble: Preamble) -> None:
    """Become the identity process; never returns (`os._exit`)."""
    code = 1
    try:
        preamble.apply(ignore=(signal.SIGHUP, signal.SIGINT, signal.SIGQUIT))
        store = IdentityStore.create(proc.directory)
        # Numbering goes on from what workers saw last, even over a directory made anew.
        store.generation = max(store.generation, proc.shared.identity_generation())
        trio.run(_run, proc.settings, store, proc.shared)
        code = 0
    except WatchStopped as e:
        log.error("spiffe: the Workload API said to stop: %s", e)
        code = 2
    except BaseException:
        print(f"weft identity process (pid {os.getpid()}) failed:", file=sys.stderr)
        traceback.print_exc()
    finally:
        exit_child(code)


async def _run(settings: IdentitySettings, store: IdentityStore, shared: SharedState) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_identity, settings, store, shared.publish_identity)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return
