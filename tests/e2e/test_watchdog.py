"""The supervisor's heartbeat watchdog: a worker whose event loop is stuck is replaced.

A stuck worker still holds its listening socket and its connections, so nothing but the missing
heartbeat tells it apart from a busy one. The story: a middleware blocks the event loop with a
synchronous sleep (the classic mistake in async code), the heartbeat stops, the supervisor sends
SIGABRT after `heartbeat_timeout`, SIGKILL if that is not enough, and a new worker serves.
"""

from __future__ import annotations

import pytest
from support.config import simple_config
from support.procs import pid_alive, wait_for
from support.rawhttp import RawConnection, exchange
from support.supervised import start_supervised

pytestmark = pytest.mark.e2e

BLOCKER = '''
import time

from weft.http.messages import Response


def factory(config):
    async def middleware(request, next):
        if request.path == "/block":
            time.sleep(60)  # blocks the whole event loop: no heartbeat, no other request
            return Response.text(200, "never\\n")
        return await next(request)

    return middleware
'''


def test_a_worker_with_a_stuck_event_loop_is_aborted_and_replaced(upstream, weft, free_port,
                                                                 tmp_path):
    (tmp_path / "blocker.py").write_text(BLOCKER)
    a = upstream("A")
    port = free_port()
    sup = start_supervised(
        weft, tmp_path,
        simple_config(port, [a.address], server={"heartbeat_timeout": "1s"},
                      route_keys={"middleware": ["blocker:factory"]}),
        workers=1, pythonpath=[tmp_path],
    )
    (stuck,) = [w["pid"] for w in sup.workers()]

    # 1. a request that blocks the worker's event loop
    conn = RawConnection(port)
    try:
        conn.send(b"GET /block HTTP/1.1\r\nHost: weft-test\r\n\r\n")

        # 2. its heartbeat stops; after heartbeat_timeout the supervisor aborts it ...
        wait_for(lambda: not pid_alive(stuck), 10.0, "the stuck worker to be killed")
        # 3. ... and a replacement on the same slot is READY
        rows = sup.wait_workers(1, timeout=5.0, exclude=[stuck])
        assert rows[0]["pid"] != stuck and rows[0]["slot"] == 0
        # 4. the blocked request is lost with its worker; new requests are served
        with pytest.raises(ConnectionError):
            conn.read_response(timeout=3.0)
    finally:
        conn.close()
    result = exchange(port, b"GET /echo HTTP/1.1\r\nHost: weft-test\r\n\r\n")
    assert [r.status for r in result.responses] == [200]
    assert "SIGABRT" in sup.weft.stderr_text()
