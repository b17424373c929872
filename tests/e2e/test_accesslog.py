"""The access log: one JSON object per request, to a file or stdout, or nothing when disabled.
It is flushed in batches, so every read of it is a bounded poll."""

from __future__ import annotations

import httpx
import pytest
from support.config import base_config, destination, route, simple_config
from support.procs import wait_for
from support.rawhttp import RawConnection

pytestmark = pytest.mark.e2e


def _records(proxy, n: int) -> list[dict]:
    return wait_for(lambda: len(proxy.access_log_records()) >= n and proxy.access_log_records(),
                    5.0, f"{n} access log records")


def test_a_record_describes_the_exchange(upstream, weft, free_port, tmp_path):
    up = upstream("logged")
    proxy = weft(simple_config(free_port(), [up.address], access_log=tmp_path / "access.log",
                               route_keys={"name": "everything"}))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.post("/echo?x=1", content=b"0123456789",
                           headers={"X-Request-Id": "log-me-1"})
    (record,) = _records(proxy, 1)
    assert record["request_id"] == "log-me-1" == resp.headers["x-request-id"]
    assert record["method"] == "POST"
    assert record["target"] == "/echo?x=1"
    assert record["status"] == 200
    assert record["route"] == "everything"
    assert record["endpoint"] == up.address
    assert record["bytes_in"] == 10
    assert record["bytes_out"] >= len(resp.content)
    assert record["client"].startswith("127.0.0.1:")
    assert record["error"] is None


def test_errors_are_logged_with_their_reason(upstream, weft, free_port, tmp_path):
    up = upstream("errlog")
    proxy = weft(simple_config(free_port(), [up.address], access_log=tmp_path / "access.log",
                               timeouts={"upstream_header": "200ms"}))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        assert client.get("/slow", params={"delay": 2}).status_code == 504
        assert client.get("/bad-response").status_code == 502
    records = _records(proxy, 2)
    assert [r["status"] for r in records] == [504, 502]
    assert all(r["error"] for r in records), records


def test_access_log_to_stdout(upstream, weft, free_port):
    up = upstream("stdout")
    proxy = weft(simple_config(free_port(), [up.address], access_log="-"))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        client.get("/echo")
    (record,) = _records(proxy, 1)
    assert record["target"] == "/echo"


def test_disabled_access_log_writes_nothing(upstream, weft, free_port, tmp_path):
    up = upstream("quiet")
    log = tmp_path / "never.log"
    proxy = weft(base_config(free_port())
                 + f'[access_log]\nenabled = false\npath = "{log}"\n\n'
                 + destination("app", [up.address]) + route("app"))
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        client.get("/echo")
    proxy.stop()  # the last lines are flushed at stop: after it, nothing may be there
    assert not log.exists() or log.read_text() == ""
    assert proxy.stdout_text() == ""


@pytest.mark.parametrize(
    ("sent", "status", "limits", "timeouts"),
    [
        pytest.param(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n", 413,
                     {"max_body_bytes": 10}, {}, id="413-body-too-large"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: t\r\n", 408, {}, {"client_header": "300ms"},
                     id="408-head-too-slow"),
        pytest.param(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc", 408,
                     {}, {"client_body_idle": "300ms"}, id="408-body-too-slow"),
        pytest.param(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, {}, {},
                     id="414-before-any-request"),
    ],
)
def test_weft_s_own_answers_log_the_bytes_they_sent(upstream, weft, free_port, tmp_path,
                                                    sent, status, limits, timeouts):
    """bytes_out is the body weft wrote, for the answers weft makes itself too (it said 0)."""
    up = upstream("own")
    proxy = weft(simple_config(free_port(), [up.address], access_log=tmp_path / "access.log",
                               limits=limits, timeouts=timeouts))
    with RawConnection(proxy.port) as conn:
        conn.send(sent)
        resp = conn.read_response(timeout=5.0)
    assert resp.status == status
    (record,) = _records(proxy, 1)
    assert record["status"] == status
    assert record["bytes_out"] == len(resp.body) > 0, (record, resp.body)
