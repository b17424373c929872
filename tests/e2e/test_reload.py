"""Reloading a running weft (`weft reload`: SIGHUP to the supervisor, outcome in its state file).

A reload starts a new generation of workers on the listening sockets the supervisor keeps, and
only once all of them are READY tells the old ones to drain; an invalid config or new workers
that cannot get ready change nothing. Clients are the judges: keep-alive clients loop requests
through every reload and count each one, and the upstream that answers (``x-upstream``) says
which config is serving.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections import Counter

import pytest
from support.config import base_config, destination, route
from support.loads import HttpClientLoad, WrkLoad
from support.procs import unique_instance, wait_for
from support.rawhttp import exchange
from support.supervised import KeepAliveLoad, start_supervised

pytestmark = pytest.mark.e2e

GET_CLOSE = b"GET /echo HTTP/1.1\r\nHost: weft-test\r\nConnection: close\r\n\r\n"


def answered_by(port: int) -> str | None:
    """The upstream that answers a request on a fresh connection."""
    result = exchange(port, GET_CLOSE, close_wait=0.5)
    assert result.responses, f"no response on a fresh connection: {result.leftover[:200]!r}"
    assert result.responses[0].status == 200, result.responses[0]
    return result.responses[0].header("x-upstream")


def two_routes_config(port: int, instance: str, a: str, b: str, target: str, *,
                      middleware: list[dict[str, object]] | None = None,
                      timeouts: dict[str, object] | None = None,
                      **server: object) -> str:
    """Two workers; destinations "a" and "b" (one upstream each); one catch-all route to
    `target`, with `middleware` if given."""
    route_keys = {"middleware": middleware} if middleware else {}
    return (base_config(port, instance=instance, server={"workers": 2, **server},
                        timeouts=timeouts)
            + destination("a", [a]) + destination("b", [b]) + route(target, **route_keys))


def test_reload_under_keepalive_load_loses_no_request(upstream, weft, free_port, tmp_path):
    """Ten reloads, every other one changing the route, under four keep-alive loads at once:
    the careful client (probes idle connections), http.client threads back to back, slow
    http.client threads that think up to 1.5 s between requests (below ``drain_idle``), and
    wrk. Not one request of any of them may fail."""
    test_deadline = time.monotonic() + 90.0
    ups = {"a": upstream("A"), "b": upstream("B")}
    port, instance = free_port(), unique_instance()
    # the drain deadline well above drain_idle: idle connections close by drain_idle alone
    timeouts = {"drain": "10s", "drain_idle": "2s"}
    text = {t: two_routes_config(port, instance, ups["a"].address, ups["b"].address, t,
                                 timeouts=timeouts)
            for t in ("a", "b")}
    sup = start_supervised(weft, tmp_path, text["a"], workers=2)
    config_path = sup.weft.config_path
    assert config_path is not None
    assert answered_by(port) == "A"
    host = sup.weft.host

    careful = KeepAliveLoad(host, port, clients=16, pause=0.005)
    fast = HttpClientLoad(host, port, clients=8, name="http.client-fast")
    slow = HttpClientLoad(host, port, clients=4, think=(0.3, 1.5), name="http.client-slow")
    wrk = WrkLoad(host, port, tmp_path, connections=8, delay_ms=5)
    # 1. every client loops requests, each on its own keep-alive connection, the whole time
    with careful, fast, slow, wrk:
        careful.wait_requests(300)
        fast.wait_requests(100)
        target = "a"
        for i in range(1, 11):
            # 2. ten reloads; every other one changes the route (A <-> B)
            if i % 2 == 1:
                target = "b" if target == "a" else "a"
            config_path.write_text(text[target])
            result = sup.reload(timeout=15.0)
            assert result.returncode == 0, (
                f"reload {i}: rc={result.returncode}\n{result.stdout}{result.stderr}\n"
                + sup.weft.diagnostics())
            assert "generation" in result.stdout
            assert sup.status()["generation"] == 1 + i
            # 3. once `weft reload` is back, a new connection is served by the new config
            for _ in range(3):
                assert answered_by(port) == target.upper(), f"after reload {i}"
            # 4. and the clients keep getting answers
            careful.wait_requests(100)
            fast.wait_requests(50)
            assert time.monotonic() < test_deadline, f"only {i} reloads within the bound"
        # every careful client is still being served at the end, and the slow ones too
        careful.mark()
        wait_for(lambda: careful.clients_ok_since_mark() == careful.clients, 10.0,
                 "every client to complete a request after the last reload")
        slow.wait_requests(4)
        wrk_result = wrk.stop()

    # 5. every request of every client got a complete 200: no reset, no lost response
    counts = careful.counts
    assert careful.failures == [], (
        f"{len(careful.failures)} failed requests of {counts.requests_ok + len(careful.failures)};"
        f" by kind and request index on the connection:"
        f" {Counter((f.kind, f.nth) for f in careful.failures)}; {counts}; first:"
        f" {careful.failures[:5]}")
    assert counts.idle_reset == 0
    assert fast.failures == [], fast.summary()
    assert slow.failures == [], slow.summary()
    assert wrk_result.failures == 0, wrk_result.output
    assert wrk_result.requests > 100, wrk_result.output
    # the old generations did close the clients' connections, and the clients reconnected
    assert counts.closed_after_response + counts.idle_closed > 0
    assert counts.connects > 16
    assert counts.upstreams["A"] > 0 and counts.upstreams["B"] > 0
    # slow clients were idle when drains began, and still got answers (with Connection: close)
    assert slow.counts.closed_by_server > 0, slow.summary()
    assert fast.counts.upstreams["A"] > 0 and fast.counts.upstreams["B"] > 0, fast.summary()
    # 6. only the last generation is left
    sup.wait_workers(2, generation=11, timeout=10.0)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            lambda text: text.replace('drain = "2s"', 'drain = "banana"'),
            ["timeouts.drain", "banana"],
            id="bad-value",
        ),
        pytest.param(
            lambda text: text + '[[routes.middleware]]\nuse = "weft_no_such_mw:factory"\n',
            ["routes[0].middleware[0]", "cannot import 'weft_no_such_mw'"],
            id="unimportable-middleware",
        ),
    ],
)
def test_reload_of_an_invalid_config_changes_nothing(upstream, weft, free_port, tmp_path,
                                                      change, expected):
    a, b = upstream("A"), upstream("B")
    port = free_port()
    good = two_routes_config(port, unique_instance(), a.address, b.address, "a")
    sup = start_supervised(weft, tmp_path, good, workers=2)
    before = sup.status()
    pids = sorted(w["pid"] for w in before["workers"])

    with KeepAliveLoad(sup.weft.host, port, clients=4, pause=0.005) as load:
        load.wait_requests(20)
        # 1. the new file routes to B, but is invalid
        assert sup.weft.config_path is not None
        sup.weft.config_path.write_text(change(good.replace('destination = "a"',
                                                             'destination = "b"')))
        result = sup.reload()
        # 2. `weft reload` fails and says what is wrong, with the key path
        assert result.returncode == 1, result.stdout + result.stderr
        for text in expected:
            assert text in result.stderr, result.stderr
        # 3. nothing changed: same generation, same workers, the old config answers
        after = sup.status()
        assert after["generation"] == before["generation"] == 1
        assert after["last_reload"]["ok"] is False
        assert sorted(w["pid"] for w in after["workers"]) == pids
        assert answered_by(port) == "A"
        load.wait_requests(20)
    # 4. the clients never noticed
    assert load.failures == []
    assert load.counts.upstreams.keys() == {"A"}


# Called in the supervisor (config validation at reload) and again in every worker it forks.
# It returns at once in the supervisor and sleeps far past boot_timeout in a worker: a config
# that validates, whose new workers cannot get ready.
SLOW_BOOT = textwrap.dedent('''
    import os
    import time


    def factory(config):
        with open(config["pidfile"]) as f:
            supervisor = int(f.read())
        if os.getppid() == supervisor:
            time.sleep(float(config["seconds"]))

        async def mw(request, next):
            return await next(request)

        return mw
''')


def test_reload_whose_workers_never_get_ready_is_rolled_back(upstream, weft, free_port,
                                                             tmp_path):
    a, b = upstream("A"), upstream("B")
    mw_dir = tmp_path / "mw"
    mw_dir.mkdir()
    (mw_dir / "slow_boot.py").write_text(SLOW_BOOT)
    port, instance = free_port(), unique_instance()
    good = two_routes_config(port, instance, a.address, b.address, "a")
    sup = start_supervised(weft, tmp_path, good, workers=2, pythonpath=[mw_dir])
    pids = sorted(w["pid"] for w in sup.workers())

    with KeepAliveLoad(sup.weft.host, port, clients=4, pause=0.005) as load:
        load.wait_requests(20)
        # 1. a valid config (route to B) whose middleware keeps new workers from getting ready
        stuck = two_routes_config(
            port, instance, a.address, b.address, "b", boot_timeout="1s",
            middleware=[{"use": "slow_boot:factory", "pidfile": str(sup.pidfile), "seconds": 30}],
        )
        assert sup.weft.config_path is not None
        sup.weft.config_path.write_text(stuck)
        started = time.monotonic()
        result = sup.reload()
        # 2. `weft reload` fails with the reason, soon after boot_timeout
        assert result.returncode == 1, result.stdout + result.stderr
        assert "boot_timeout" in result.stderr, result.stderr
        assert "generation 1 keeps serving" in result.stderr, result.stderr
        assert time.monotonic() - started < 10.0
        # 3. rolled back: generation 1 and its two workers serve, the new ones are gone
        rows = sup.wait_workers(2, generation=1, timeout=5.0)
        shown = json.loads(sup.cli("status", "--json").stdout)
        assert shown["generation"] == 1
        assert [w["generation"] for w in shown["workers"]] == [1, 1]
        assert sorted(w["pid"] for w in rows) == pids
        assert answered_by(port) == "A"
        load.wait_requests(20)
    # 4. the clients never noticed
    assert load.failures == []
    assert load.counts.idle_reset == 0
    # 5. and the instance still reloads: the good config with the route to B
    sup.weft.config_path.write_text(good.replace('destination = "a"', 'destination = "b"'))
    result = sup.reload()
    assert result.returncode == 0, result.stdout + result.stderr
    assert sup.status()["generation"] == 2
    assert answered_by(port) == "B"
