"""gRPC through the real ``python -m weft run``: a grpcio client over TLS (ALPN h2) to weft,
weft over h2c to a grpcio server.

Both grpcio peers are processes of their own (tests/support/grpc_peer.py): grpcio must not be
loaded in a process that forks afterwards, and this one starts weft and upstreams. The client
prints what it saw for every call (code, details, initial and trailing metadata, messages); the
server counts its calls and the ones whose context saw the cancellation. Raw h2 checks (the
shape of weft's own answers, grpc-timeout without a client deadline) use tests/support/
h2client.py on a second, cleartext listener of the same weft.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.certs import CA
from support.config import base_config, destination, route, table
from support.h2client import H2Client
from support.procs import Weft, free_port, wait_for

pytestmark = pytest.mark.e2e

PEER = Path(__file__).resolve().parent.parent / "support" / "grpc_peer.py"
SERVICE = "weft.test.Echo"
CALL_TIMEOUT = 60.0  # seconds one client process may take (grpcio import included)


class GrpcServer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, name: str) -> None:
        self.proc = proc
        self.port = port
        self.name = name
        self.address = f"127.0.0.1:{port}"


@pytest.fixture
def grpc_server(tmp_path: Path) -> Iterator[Callable[..., GrpcServer]]:
    """Factory ``grpc_server(name, *, sick=False) -> GrpcServer``; all stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str = "up", *, sick: bool = False) -> GrpcServer:
        err = open(tmp_path / f"grpc-{name}.stderr", "wb")
        cmd = [sys.executable, str(PEER), "server", "--name", name]
        if sick:
            cmd.append("--sick")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        err.close()
        started.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30.0)
        assert ready, "the grpc server did not start"
        line = proc.stdout.readline().decode()
        assert line.startswith("LISTENING "), line
        return GrpcServer(proc, int(line.split()[1]), name)

    yield start
    for p in started:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
        if p.stdout is not None:
            p.stdout.close()


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path / "pki")


def grpc_config(
    port: int,
    ca: CA,
    endpoints: list[str],
    *,
    h2c_port: int | None = None,
    route_keys: dict[str, Any] | None = None,
    route_timeouts: dict[str, Any] | None = None,
    rate_limit: dict[str, Any] | None = None,
    access_log: Path | None = None,
    **dest: Any,
) -> str:
    """A TLS listener (ALPN h2) on `port`, optionally a cleartext one on `h2c_port`, and one
    h2c destination "grpc" with `endpoints`."""
    site = ca.leaf("site", ["localhost", "127.0.0.1"])
    text = base_config(port, access_log=access_log)
    tls = table(
        "[listeners.tls]",
        {"certificates": [{"cert": str(site.cert), "key": str(site.key)}], "alpn": ["h2"]},
    )
    head, sep, rest = text.partition("[timeouts]")
    text = head + tls + sep + rest
    if h2c_port is not None:
        text += table("[[listeners]]", {"address": "127.0.0.1", "port": h2c_port})
    text += destination("grpc", endpoints, protocol="h2c", **dest)
    text += route("grpc", timeouts=route_timeouts, **(route_keys or {}))
    if rate_limit is not None:
        text += table("[[routes.rate_limit]]", rate_limit)
    return text


def call(
    proxy: Weft,
    ca: CA,
    method: str,
    *,
    payload: str = "",
    count: int = 1,
    timeout: float = 10.0,
    pause: float = 0.0,
) -> list[dict[str, Any]]:
    """`count` calls of `method` through weft's TLS listener, from a grpcio client process."""
    cmd = [
        sys.executable,
        str(PEER),
        "call",
        "--target",
        proxy.address,
        "--ca",
        str(ca.pem),
        "--name-override",
        "localhost",
        "--method",
        method,
        "--payload",
        payload,
        "--count",
        str(count),
        "--timeout",
        str(timeout),
        "--pause",
        str(pause),
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=CALL_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def server_stats(server: GrpcServer) -> dict[str, Any]:
    cmd = [sys.executable, str(PEER), "call", "--target", server.address, "--method", "Stats"]
    done = subprocess.run(cmd, capture_output=True, timeout=CALL_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr.decode()
    (result,) = json.loads(done.stdout)
    return json.loads(result["responses"][0])


def grpc_request(
    client: H2Client, method: str, body: bytes = b"", headers: list[tuple[bytes, bytes]] = ()
) -> Any:
    """One raw h2 gRPC request (`body` as one length-prefixed message)."""
    frame = b"\x00" + len(body).to_bytes(4, "big") + body
    return client.request(
        "POST",
        f"/{SERVICE}/{method}",
        headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers"), *headers],
        body=frame,
    )


def test_the_four_call_types_pass_with_their_metadata_and_trailers(grpc_server, weft, ca):
    """1. Unary: the message, the server's initial metadata (and the client's x-echo it
       echoes), the trailing metadata.
    2. Server streaming: five messages in order, then OK with trailers.
    3. Client streaming: three messages joined.
    4. Bidirectional, in lock-step: the client sends each message only once the echo of the
       previous one came back, so the request body must keep streaming after the response
       head went out.
    5. A non-OK status with custom trailing metadata (one of it binary) and a non-ASCII,
       percent-encoded message arrives as the server sent it."""
    up = grpc_server("u1")
    proxy = weft(grpc_config(free_port(), ca, [up.address]))

    (unary,) = call(proxy, ca, "Unary", payload="ping")
    assert unary["code"] == "OK", unary
    assert unary["responses"] == ["ping"]
    assert unary["initial"]["x-server"] == "u1" and unary["initial"]["x-echo"] == "hello"
    assert unary["trailing"] == {"x-trailer": "done"}

    (stream,) = call(proxy, ca, "ServerStream", payload="5")
    assert stream["code"] == "OK", stream
    assert stream["responses"] == ["0", "1", "2", "3", "4"]
    assert stream["trailing"] == {"x-trailer": "done"}

    (client,) = call(proxy, ca, "ClientStream", payload="a,b,c")
    assert client["code"] == "OK", client
    assert client["responses"] == ["a+b+c"]
    assert client["trailing"] == {"x-trailer": "done"}

    (bidi,) = call(proxy, ca, "Bidi", payload="x,y,z")
    assert bidi["code"] == "OK", bidi
    assert bidi["responses"] == ["echo:x", "echo:y", "echo:z"]
    assert bidi["initial"]["x-server"] == "u1"
    assert bidi["trailing"] == {"x-trailer": "done"}

    (fail,) = call(proxy, ca, "Fail")
    assert fail["code"] == "FAILED_PRECONDITION", fail
    assert fail["details"] == "café ☕ 100% broken\nline two"
    # Trailers-Only: the server's trailing metadata shares the head with what weft adds.
    trailing = {k: v for k, v in fail["trailing"].items() if k not in ("via", "x-request-id")}
    assert trailing == {"x-reason": "on-purpose", "x-detail-bin": "00ff"}


def test_grpc_timeout_is_the_deadline_and_the_upstream_call_is_cancelled(
    grpc_server, weft, ca, tmp_path
):
    """1. A grpcio client deadline of 0.5 s on a method that takes 5 s: the client sees
       DEADLINE_EXCEEDED and the server's context sees the call cancelled. (The client's own
       timer runs out a moment before weft's, which starts when weft has the request: what
       weft does alone is step 2.)
    2. Raw h2 with no client-side deadline at all, grpc-timeout 300m, a 2 s method: weft
       answers by itself after ~0.3 s, Trailers-Only with grpc-status 4 and its message, and
       resets the upstream stream (the server's context sees a second cancellation, though
       this client never reset anything); the access log keeps 504 request_timeout and adds
       grpc_status 4.
    3. An unparsable grpc-timeout is ignored and passed on (as Envoy does): weft sets no
       deadline from it and leaves the verdict to the server (grpcio refuses it: INTERNAL)."""
    up = grpc_server("u1")
    h2c_port = free_port()
    proxy = weft(
        grpc_config(
            free_port(), ca, [up.address], h2c_port=h2c_port, access_log=tmp_path / "access.log"
        )
    )

    (late,) = call(proxy, ca, "Slow", payload="5000", timeout=0.5)
    assert late["code"] == "DEADLINE_EXCEEDED", late
    assert late["seconds"] < 3, late
    wait_for(
        lambda: server_stats(up)["cancelled"].get("Slow") == 1,
        10,
        "the server to see the call cancelled",
    )

    with H2Client(h2c_port, timeout=10) as client:
        started = time.monotonic()
        r = grpc_request(client, "Slow", b"2000", [(b"grpc-timeout", b"300m")])
        took = time.monotonic() - started
        assert r.ended and r.status == 200, r
        assert r.header(b"grpc-status") == b"4", r.headers
        assert r.header(b"grpc-message") == b"the call's grpc-timeout ran out"
        assert not r.body and not r.trailers, "a Trailers-Only answer: one HEADERS frame"
        assert 0.25 <= took < 1.5, took
        wait_for(
            lambda: server_stats(up)["cancelled"].get("Slow") == 2,
            10,
            "the server to see weft cancel the call",
        )
        wait_for(
            lambda: any(x.get("grpc_status") == 4 for x in proxy.access_log_records()),
            5,
            "the access log record of the deadline",
        )
        record = next(x for x in proxy.access_log_records() if x.get("grpc_status") == 4)
        assert record["status"] == 504 and record["error"] == "request_timeout", record

        # Weft ignores the value and passes it on: the answer is the server's own refusal.
        r = grpc_request(client, "Slow", b"300", [(b"grpc-timeout", b"1x")])
        assert r.status == 200 and r.header(b"grpc-status") == b"13", r.headers
        assert r.header(b"grpc-message") == b"Error parsing 'grpc-timeout' metadata"


def test_weft_answers_its_own_errors_as_grpc_statuses(grpc_server, weft, ca, tmp_path):
    """1. No upstream listening: UNAVAILABLE (weft's 502 connect error) with weft's message;
       raw h2 shows the Trailers-Only shape (200, application/grpc, grpc-status 14, no
       body, no Content-Length); the access log keeps 502 and adds grpc_status 14.
    2. A route limited to 1/m with burst 1 (two calls at once): the third call is
       RESOURCE_EXHAUSTED (weft's 429) and carries the RateLimit fields; the first two went
       through."""
    dead = f"127.0.0.1:{free_port()}"
    h2c_port = free_port()
    proxy = weft(
        grpc_config(free_port(), ca, [dead], h2c_port=h2c_port, access_log=tmp_path / "access.log")
    )
    (r,) = call(proxy, ca, "Unary", payload="ping")
    assert r["code"] == "UNAVAILABLE", r
    assert r["details"] == "could not connect to the upstream"
    with H2Client(h2c_port, timeout=10) as client:
        raw = grpc_request(client, "Unary", b"ping")
    assert raw.status == 200 and raw.ended and not raw.body and not raw.trailers, raw
    assert raw.header(b"content-type") == b"application/grpc"
    assert raw.header(b"grpc-status") == b"14"
    assert raw.header(b"content-length") is None
    records = proxy.access_log_records()
    assert records and all(x["status"] == 502 and x["grpc_status"] == 14 for x in records), records

    up = grpc_server("u1")
    proxy = weft(
        grpc_config(
            free_port(), ca, [up.address], rate_limit={"key": "route", "rate": "1/m", "burst": 1}
        ),
        name="limited",
    )
    first, second, third = call(proxy, ca, "Unary", payload="ping", count=3)
    assert first["code"] == second["code"] == "OK", (first, second)
    assert third["code"] == "RESOURCE_EXHAUSTED", third
    assert third["details"] == "rate limited"
    assert third["trailing"]["ratelimit"].startswith('"route0.0";r=0;'), third


def test_grpc_unavailable_from_the_server_ejects_the_endpoint(grpc_server, weft, ca):
    """1. Two endpoints, one answering every call UNAVAILABLE after a first message (the
       status in the trailers), consecutive_gateway_errors 3, max_ejection_percent 50.
    2. Server-streaming calls alternate between them until the sick one has failed 3 times
       in a row; from then on every call goes to the healthy one (the client still saw the
       sick one's UNAVAILABLE as it was sent)."""
    sick, well = grpc_server("sick", sick=True), grpc_server("well")
    proxy = weft(
        grpc_config(
            free_port(),
            ca,
            [sick.address, well.address],
            outlier={
                "consecutive_5xx": 0,
                "consecutive_gateway_errors": 3,
                "base_ejection": "30s",
                "max_ejection_percent": 50,
            },
        )
    )
    results = call(proxy, ca, "ServerStream", payload="2", count=16)
    servers = [r["initial"].get("x-server") for r in results]
    bad = [r for r in results if r["initial"].get("x-server") == "sick"]
    assert len(bad) == 3, servers
    assert all(r["code"] == "UNAVAILABLE" and r["details"] == "sick is sick" for r in bad), bad
    assert servers[-8:] == ["well"] * 8, servers


def test_grpc_unavailable_opens_the_breaker_and_weft_then_answers_unavailable(
    grpc_server, weft, ca
):
    """1. One endpoint answering UNAVAILABLE as Trailers-Only (the status in the head), a
       breaker with minimum_calls 4 and failure_rate 50.
    2. The first 4 calls reach the server (its message); the breaker opens, and the next
       calls are weft's own UNAVAILABLE (the breaker's message), not the server's."""
    sick = grpc_server("sick", sick=True)
    proxy = weft(
        grpc_config(
            free_port(),
            ca,
            [sick.address],
            breaker={"minimum_calls": 4, "failure_rate": 50, "window": "10s", "open_for": "30s"},
        )
    )
    results = call(proxy, ca, "Unary", payload="ping", count=8)
    assert all(r["code"] == "UNAVAILABLE" for r in results), results
    details = [r["details"] for r in results]
    assert details[:4] == ["sick is sick"] * 4, details
    assert details[4:] == ["the upstream is failing; its circuit breaker is open"] * 4, details
    assert server_stats(sick)["calls"] == {"Unary": 4}
