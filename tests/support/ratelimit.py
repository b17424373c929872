"""Helpers of the rate-limit e2e tests: a config with rate limits, one GET, and a keep-alive
load that counts statuses."""

from __future__ import annotations

import http.client
import threading
import time

from support.config import base_config, destination, route, table


def rate_limit_config(port: int, up: str, workers: int, limits: list[dict[str, object]], *,
            server: dict[str, object] | None = None, rate_table: dict[str, object] | None = None,
            access_log: object = None) -> str:
    text = base_config(port, server={"workers": workers, **(server or {})}, access_log=access_log)
    if rate_table:
        text += table("[limits.rate_table]", rate_table)
    text += destination("app", [up]) + route("app")
    for limit in limits:
        text += table("[[routes.rate_limit]]", limit)
    return text


def get(host: str, port: int, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/echo", headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def hammer(host: str, port: int, clients: int, seconds: float) -> dict[int, int]:
    """`clients` keep-alive threads looping GETs for `seconds`; statuses counted."""
    counts: dict[int, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            while time.monotonic() < stop:
                conn.request("GET", "/echo")
                resp = conn.getresponse()
                resp.read()
                with lock:
                    counts[resp.status] = counts.get(resp.status, 0) + 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 15)
    assert not any(t.is_alive() for t in threads)
    return counts
