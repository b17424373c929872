"""Active health probes, one prober per endpoint across all workers, and pool eviction.

Every worker runs a `Prober`, but an endpoint is probed by one worker at a time: the one that
holds its lease word in shared memory (`weft.health.lease`, `DestinationObserver.take_lease`).
The theory of operation:

* Each worker wakes for each probed endpoint every ``interval`` (±10 % jitter, so the workers
  and endpoints spread out instead of probing in step). The holder renews its lease and
  probes; everyone else finds the lease held and sleeps half an interval, so that a holder that
  died is replaced quickly.
* A lease lasts 1.5 intervals. The holder renews it every interval (at most 1.1 with jitter),
  so a live holder never loses it; a dead one's lease is freed by the supervisor's reclaim at
  once (`weft.shm.endpoints.EndpointTable.reclaim`), and without that it expires within 1.5
  intervals and is taken within another half: probing goes on within two intervals.
* A draining worker gives its leases up, so the new generation takes them at its next tick.
* A probe is ``GET <path>`` on a fresh connection (never a pooled one: a probe must see whether
  the endpoint accepts connections, and must not take a slot a request could use; over TLS
  when the destination has ``tls``, verified as the pool's connections are), with
  ``Connection: close``, the destination's Host rule and ``User-Agent: weft-health``; for an
  h2 destination (``h2``, ``h2c``, or ``auto`` when ALPN says h2) one stream on a connection
  of its own, the Host rule as ``:authority``. The
  whole probe, connect to last body byte, is bounded by ``timeout``. Its result is classified
  (`weft.health.classify_probe`) and written with one CAS (`DestinationObserver.apply_probe`).
* **Pool eviction**: every worker (not just the holder) looks at the health words of its
  endpoints every `EVICT_TICK`, and closes its idle pooled connections to every endpoint that
  is Unhealthy: those it had when the endpoint turned, and those that requests in flight then
  give back after they finished.
"""

from __future__ import annotations

import logging
import os
import random

import trio

from weft import health
from weft.connection import UpstreamPools, open_transport
from weft.http.errors import ClientError, UpstreamError
from weft.http.h1_client import H1Upstream
from weft.http.h2_client import take_slot
from weft.http.h2_conn import H2Connection
from weft.http.messages import BytesBody
from weft.http.upstream import Outgoing
from weft.observer import DestinationObserver
from weft.schema import Destination, Timeouts

__all__ = ["EVICT_TICK", "Prober", "probe_once"]

log = logging.getLogger("weft.health")

JITTER = 0.1  # the issue's ±10 %
LEASE_INTERVALS = 1.5  # a lease's life, in intervals (see the module docstring)
EVICT_TICK = 0.25  # seconds between looks at the health words for eviction
PROBE_BODY_MAX = (
    64 * 1024
)  # a probe's body is read (to reuse nothing, but to see it end) up to this


def _ignore(_reusable: bool) -> None:
    """A probe's connection is never reused: its `on_done` has nothing to do."""


def _jittered(seconds: float) -> float:
    return seconds * random.uniform(1 - JITTER, 1 + JITTER)


async def probe_once(
    dest: Destination, index: int, timers: object, identity: object = None
) -> tuple[int | None, float, bool]:
    """Probe endpoint `index` of `dest`: (status or None when it failed, seconds taken,
    whether the answer carried the degraded header). Never raises for the endpoint's faults."""
    hc = dest.health
    assert hc is not None
    ep = dest.endpoints[index]
    started = trio.current_time()
    deadline = started + hc.timeout
    if dest.host_header in ("pass", "endpoint"):
        host = ep.authority.encode()
    else:
        host = dest.host_header.encode()
    out = Outgoing(
        b"GET",
        hc.path.encode("latin-1"),
        [(b"host", host), (b"user-agent", b"weft-health"), (b"connection", b"close")],
        BytesBody(b""),
        has_body=False,
        fields_checked=False,
    )
    timeouts = Timeouts(
        upstream_connect=hc.timeout,
        upstream_header=hc.timeout,
        upstream_body_idle=hc.timeout,
        upstream_send_idle=hc.timeout,
        request_total=hc.timeout,
    )
    status: int | None = None
    degraded = False
    conn: H1Upstream | H2Connection | None = None
    with trio.move_on_at(deadline):
        try:
            # TLS too, as the pool's (with SPIFFE: the worker's SVID, `identity`)
            transport = await open_transport(ep, dest.tls, identity)  # type: ignore[arg-type]
            h2 = dest.protocol in ("h2", "h2c") or (
                dest.protocol == "auto" and transport.alpn == "h2"
            )
            if not h2:
                conn = H1Upstream(transport, ep, timers)  # type: ignore[arg-type]
                response = await conn.exchange(out, timeouts, deadline, None, _ignore)
                degraded = response.headers.get(hc.degraded_header) is not None
                await response.body.read(PROBE_BODY_MAX)
                status = response.status
            else:
                # An h2 probe: a connection of its own (as for h1), one stream on it.
                conn = H2Connection(transport, ep, tls=dest.tls is not None, max_streams=1)
                await conn.handshake()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.run)
                    try:
                        response = await take_slot(conn, None).exchange(
                            out, timeouts, deadline, None, _ignore
                        )
                        degraded = response.headers.get(hc.degraded_header) is not None
                        await response.body.read(PROBE_BODY_MAX)
                        status = response.status
                    finally:
                        nursery.cancel_scope.cancel()
        except (OSError, UpstreamError, ClientError) as e:
            log.debug("probe of %s: %s", ep.authority, e)
    if conn is not None:
        conn.close()
    return status, trio.current_time() - started, degraded


class Prober:
    """The probing and eviction tasks of one worker."""

    def __init__(
        self,
        observers: dict[str, DestinationObserver],
        pools: UpstreamPools,
    ) -> None:
        self.observers = observers
        self.pools = pools
        self.pid = os.getpid()
        #: probes this worker ran, per "destination/endpoint" (tests and status)
        self.probes = 0

    @property
    def needed(self) -> bool:
        return any(o.dest.observed for o in self.observers.values())

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for name, obs in self.observers.items():
                if obs.dest.health is not None:
                    for i in range(obs.n):
                        nursery.start_soon(self._probe_loop, obs, i, name=f"probe {name}/{i}")
            nursery.start_soon(self._evict_loop)
            task_status.started()

    async def _probe_loop(self, obs: DestinationObserver, i: int) -> None:
        hc = obs.dest.health
        assert hc is not None
        ttl_ms = round(hc.interval * LEASE_INTERVALS * 1000)
        # Start at a random point of the first interval: workers started together would
        # otherwise race for every lease at once.
        await trio.sleep(random.uniform(0, hc.interval / 2))
        try:
            while True:
                if obs.take_lease(i, ttl_ms):
                    status, latency, degraded_header = await probe_once(
                        obs.dest, i, self.pools.timers, self.pools.identity
                    )
                    self.probes += 1
                    event = health.classify_probe(
                        status,
                        latency,
                        expected=hc.expected_statuses,
                        degraded_latency=hc.degraded_latency,
                        degraded_header=degraded_header,
                    )
                    old, new = obs.apply_probe(i, event)
                    if new is not old:
                        log.warning(
                            "endpoint %s of %s is now %s (probe: %s)",
                            obs.dest.endpoints[i].authority,
                            obs.name,
                            new.name.lower(),
                            f"status {status}" if status is not None else "no answer",
                        )
                    await trio.sleep(_jittered(hc.interval))
                else:
                    await trio.sleep(_jittered(hc.interval / 2))
        finally:
            obs.drop_lease(i)

    async def _evict_loop(self) -> None:
        by_dest = self.pools.by_destination
        watched = [
            (obs, by_dest[name]) for name, obs in self.observers.items() if obs.dest.health
        ]
        while True:
            await trio.sleep(EVICT_TICK)
            for obs, pools in watched:
                skipped = None
                for i in range(obs.n):
                    # Every tick, not only at the transition: a request that was in flight when
                    # the endpoint turned Unhealthy gives its connection back afterwards. Not
                    # in panic, though: then the endpoint still gets traffic.
                    if not pools[i].idle or obs.health_word(i) & 3 != health.UNHEALTHY.code:
                        continue
                    if skipped is None:
                        skipped = obs.excluded()
                    if i in skipped:
                        closed = pools[i].close_idle()
                        log.info(
                            "closed %d idle connections to unhealthy %s",
                            closed,
                            obs.dest.endpoints[i].authority,
                        )
