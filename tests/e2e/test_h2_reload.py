"""Drain and reload under HTTP/2 load: GOAWAY with the last stream id, in-flight streams
finish, and not one stream a client sent fails or is refused.

The load is `support.h2client` connections, each keeping four streams in flight (one of them
slow, so a drain always finds streams in flight) and, at a GOAWAY, finishing its streams and
reconnecting, as browsers and gRPC clients do. h2load cannot judge this: it does not reconnect
after a GOAWAY, and counts the requests it then declines to submit itself as failed
("Process Request Failure"), although they never reach the server.
"""

from __future__ import annotations

import threading
import time

import pytest
from support.config import base_config, destination, route
from support.h2client import Closed, H2Client
from support.procs import unique_instance, wait_for
from support.supervised import start_supervised

pytestmark = pytest.mark.e2e


class H2Load:
    """`clients` threads, each on its own h2c connection with four streams at a time."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.ok = 0
        self.goaways = 0
        self.connections = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        paths = ["/echo", "/fixed?size=2000", "/slow?delay=0.3", "/echo"]
        while not self._stop.is_set():
            try:
                client = H2Client(self.port, timeout=15.0)
            except OSError as e:
                self.failures.append(f"connect: {e!r}")
                return
            self.connections += 1
            with client:
                while not self._stop.is_set() and client.goaway is None:
                    sids = [client.start("GET", p) for p in paths]
                    for sid in sids:
                        try:
                            r = client.wait(sid)
                        except (Closed, TimeoutError, OSError) as e:
                            self.failures.append(f"stream {sid}: {e!r} goaway={client.goaway}")
                            return
                        if r.status != 200 or r.reset is not None:
                            self.failures.append(
                                f"stream {sid}: status {r.status} reset {r.reset}"
                                f" goaway={client.goaway}")
                        else:
                            self.ok += 1
                if client.goaway is not None:
                    self.goaways += 1
                    if client.goaway[0] != 0:
                        self.failures.append(f"GOAWAY with error {client.goaway}")

    def __enter__(self) -> H2Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20.0)

    def wait_ok(self, n: int) -> None:
        target = self.ok + n
        wait_for(lambda: self.ok >= target or bool(self.failures), 20.0, f"{n} more streams")


def test_reload_under_h2_load_fails_no_stream(upstream, weft, free_port, tmp_path):
    up = upstream("A")
    port, instance = free_port(), unique_instance()
    text = (base_config(port, instance=instance, server={"workers": 2},
                        timeouts={"drain": "10s", "drain_idle": "2s"})
            + destination("a", [up.address]) + route("a"))
    sup = start_supervised(weft, tmp_path, text, workers=2)
    # 1. six clients keep four streams each in flight the whole time
    with H2Load(port, clients=6) as load:
        load.wait_ok(100)
        for i in range(1, 5):
            # 2. four reloads; each drains the old workers under the load
            result = sup.reload(timeout=20.0)
            assert result.returncode == 0, result.stdout + result.stderr
            assert sup.status()["generation"] == 1 + i
            load.wait_ok(50)
        time.sleep(0.5)
    # 3. every stream of every client was answered 200: none failed, none was refused
    assert load.failures == [], load.failures[:10]
    # the old workers did send GOAWAY, and the clients reconnected to the new ones
    assert load.goaways > 0 and load.connections > 6
    sup.wait_workers(2, generation=5, timeout=10.0)
