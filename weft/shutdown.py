"""The stop sequence: from SIGTERM (or INT/QUIT) to the last worker reaped.

The supervisor's loop calls `stop` once ``sup.stopping`` is set; this module owns the order:

1. systemd hears ``STOPPING=1`` and the state file says "stopping" (the admin's /readyz turns
   503, so a load balancer stops sending before the listeners go).
2. Every worker gets SIGTERM and a deadline: ``timeouts.drain + DRAIN_MARGIN`` for a graceful
   stop (the worker stops accepting, finishes its requests, closes idle connections and exits
   by the drain deadline), `KILL_GRACE` for a fast one. A fast stop sends a second SIGTERM,
   which makes a draining worker stop at once (see `weft.workers.worker`).
3. Until every worker is reaped: reap (reclaiming what each held), turn a graceful stop into
   a fast one on INT or QUIT, and SIGKILL whoever is past its deadline.

The admin process and the sockets are not touched here: the supervisor closes them last, in
`Supervisor.cleanup`, so /readyz keeps answering 503 and queued connections keep waiting
until the workers are gone.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from weft.supervisor import Supervisor

__all__ = ["DRAIN_MARGIN", "KILL_GRACE", "stop"]

log = logging.getLogger("weft.supervisor")

KILL_GRACE = 2.0  # SIGABRT -> SIGKILL, fast stop -> SIGKILL
DRAIN_MARGIN = 5.0  # a draining worker is SIGKILLed this long after the drain deadline
POLL = 0.05  # seconds between reaps while waiting for the workers


def stop(sup: Supervisor) -> None:
    """Stop every worker of `sup` (see the module docstring); returns once none is left."""
    fast = sup.stopping == "fast"
    sup.notifier.stopping()
    sup.write_state()  # publishes "stopping"
    now = time.monotonic()
    grace = KILL_GRACE if fast else sup.config.timeouts.drain + DRAIN_MARGIN
    for child in sup.children.values():
        child.retiring = True
        child.kill_at = now + grace
        sup.kill(child.pid, signal.SIGTERM)
    if fast:
        # A second signal makes a draining worker stop at once (see weft.workers.worker).
        time.sleep(POLL)
        for child in sup.children.values():
            sup.kill(child.pid, signal.SIGTERM)
    while sup.children:
        sup.signals.wait(POLL)
        queue = sup.signals.take()
        if not fast and any(s in (signal.SIGINT, signal.SIGQUIT) for s in queue):
            fast = True  # INT/QUIT during a graceful stop: stop now
            log.info("fast stop")
            for child in sup.children.values():
                child.kill_at = min(child.kill_at or now, time.monotonic() + KILL_GRACE)
                sup.kill(child.pid, signal.SIGTERM)
        sup.reap()
        sup.kill_overdue("still running at the deadline")
    log.info("stopped")
