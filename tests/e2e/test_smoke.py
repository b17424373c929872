"""The first thing to work: one GET through weft, in quick mode and from a config file, with
curl and with httpx."""

from __future__ import annotations

import httpx
import pytest
from support.clients import curl
from support.config import simple_config
from support.procs import wait_for

pytestmark = pytest.mark.e2e


def test_quick_mode_forwards_a_get(upstream, weft, free_port):
    # 1. an upstream and weft in quick mode in front of it
    up = upstream("quick")
    port = free_port()
    proxy = weft(args=["--listen", f"127.0.0.1:{port}", "--upstream", up.address])

    # 2. curl gets the upstream's answer through weft
    result = curl(f"{proxy.url}/echo?via=curl")
    assert result.returncode == 0, result.stderr
    assert result.status == 200
    assert result.header("x-upstream") == "quick"
    assert httpx.Response(200, content=result.body).json()["target"] == "/echo?via=curl"

    # 3. so does httpx
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/echo", params={"via": "httpx"})
    assert resp.status_code == 200
    assert resp.headers["x-upstream"] == "quick"
    assert resp.json()["target"] == "/echo?via=httpx"
    assert up.stats()["requests"] == 2


def test_config_file_forwards_a_get_and_logs_it(upstream, weft, free_port, tmp_path):
    # 1. an upstream and weft from a config file that logs to a file
    up = upstream("fromfile")
    access_log = tmp_path / "access.log"
    proxy = weft(simple_config(free_port(), [up.address], access_log=access_log))

    # 2. curl and httpx both get through
    result = curl(f"{proxy.url}/echo?via=curl")
    assert result.returncode == 0, result.stderr
    assert result.status == 200
    assert result.header("x-upstream") == "fromfile"
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        resp = client.get("/fixed", params={"size": 12345})
    assert resp.status_code == 200
    assert len(resp.content) == 12345

    # 3. both requests are in the access log, one JSON object per line (written a moment
    #    after the response: the log is flushed in batches)
    records = wait_for(lambda: len(proxy.access_log_records()) >= 2 and proxy.access_log_records(),
                       5.0, "two access log records")
    by_target = {r["target"]: r for r in records}
    assert by_target["/echo?via=curl"]["status"] == 200
    assert by_target["/echo?via=curl"]["method"] == "GET"
    assert by_target["/fixed?size=12345"]["status"] == 200


def test_quick_mode_round_robins_over_several_upstreams(upstream, weft, free_port):
    ups = [upstream(f"q{i}") for i in range(2)]
    port = free_port()
    proxy = weft(args=["--listen", f"127.0.0.1:{port}", "--no-access-log",
                       *(a for u in ups for a in ("--upstream", u.address))])
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        names = [client.get("/echo").headers["x-upstream"] for _ in range(4)]
    assert sorted(names) == ["q0", "q0", "q1", "q1"]
    assert proxy.stdout_text() == "", "--no-access-log writes no access log"


def test_every_listener_serves_including_ipv6(upstream, weft, free_port):
    up = upstream("multi")
    port4, port6 = free_port(), free_port("::1")
    config = simple_config(port4, [up.address]) + (
        f'[[listeners]]\naddress = "::1"\nport = {port6}\n\n')
    proxy = weft(config)
    with httpx.Client(timeout=5.0) as client:
        v4 = client.get(f"http://127.0.0.1:{port4}/echo")
        v6 = client.get(f"http://[::1]:{port6}/echo")
    assert v4.status_code == v6.status_code == 200
    # X-Forwarded-For carries the client's address family as it was
    assert ["X-Forwarded-For", "::1"] in [[k.title(), v] for k, v in v6.json()["headers"]]
    assert proxy.alive()
