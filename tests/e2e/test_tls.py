"""TLS both ways through the real ``python -m weft run``, judged by real TLS peers.

Clients: curl (``--cacert``, ``--resolve`` for SNI), `openssl s_client` (which certificate SNI
picked, what ALPN chose), and Python's http.client (a keep-alive client that reuses connections
without probing them). Upstreams: tests/support/upstream.py serving TLS, with client
certificates required where mTLS is the point. Certificates come from tests/support/certs.py.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.certs import CA, Pair, common_name, mismatched
from support.config import base_config, destination, route, table, toml_value
from support.procs import Upstream, start_upstream, unique_instance, wait_for
from support.prometheus import admin_get
from support.supervised import start_supervised
from support.wsclient import WsClient

pytestmark = pytest.mark.e2e

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path / "pki")


def tls_listener(port: int, certificates: list[dict[str, object]], *, instance: str | None = None,
                 tls: dict[str, object] | None = None, timeouts: dict[str, object] | None = None,
                 workers: int = 1, admin_port: int | None = None) -> str:
    """[server], one TLS listener, [timeouts] and, with `admin_port`, [admin]."""
    text = base_config(port, instance=instance or unique_instance(), timeouts=timeouts,
                       server={"workers": workers})
    tls_table = table("[listeners.tls]", {"certificates": certificates, **(tls or {})})
    # [listeners.tls] belongs to the last [[listeners]]: put it right after it.
    head, sep, rest = text.partition("[timeouts]")
    text = head + tls_table + sep + rest
    if admin_port is not None:
        text += table("[admin]", {"port": admin_port})
    return text


def cert_entry(pair: Pair, names: list[str] | None = None) -> dict[str, object]:
    out: dict[str, object] = {"cert": str(pair.cert), "key": str(pair.key)}
    if names:
        out["server_names"] = names
    return out


def https_context(ca: CA, client: Pair | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.pem))
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    return ctx


def get(port: int, path: str, ctx: ssl.SSLContext, *, host: str = "localhost",
        conn: http.client.HTTPSConnection | None = None) -> tuple[int, bytes]:
    """One GET over https (on `conn` when given: a kept-alive connection)."""
    c = conn or http.client.HTTPSConnection(host, port, context=ctx, timeout=10.0)
    try:
        c.request("GET", path)
        response = c.getresponse()
        return response.status, response.read()
    finally:
        if conn is None:
            c.close()


def served_certificate(port: int, ca: CA, server_name: str = "localhost") -> bytes:
    """The DER certificate a new handshake with SNI `server_name` gets."""
    ctx = https_context(ca)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return der


def s_client(port: int, *args: str) -> str:
    """`openssl s_client` against weft (stdin closed at once): what it printed."""
    assert OPENSSL, "scripts/test installs openssl"
    done = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input=b"", capture_output=True, timeout=20.0,
    )
    return (done.stdout + done.stderr).decode(errors="replace")


def alpn_of(port: int, ca: object, offered: list[str]) -> str | None:
    """The protocol weft's listener chose from `offered` (Python's ssl, i.e. OpenSSL, as the
    client), None when it chose none."""
    ctx = ssl.create_default_context(cafile=str(ca.pem))  # type: ignore[attr-defined]
    ctx.set_alpn_protocols(offered)
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.selected_alpn_protocol()


def test_https_requests_through_weft_with_curl_and_http_client(upstream, weft, free_port, ca):
    up = upstream("A")
    port = free_port()
    site = ca.leaf("site", ["localhost", "127.0.0.1"])
    weft(tls_listener(port, [cert_entry(site)]) + destination("app", [up.address])
         + route("app"))
    # 1. curl, verifying weft's certificate against the test CA
    assert CURL
    done = subprocess.run([CURL, "-sS", "--cacert", str(ca.pem), f"https://localhost:{port}/echo"],
                          capture_output=True, timeout=20.0)
    assert done.returncode == 0, done.stderr
    echoed = json.loads(done.stdout)
    headers = {k: v for k, v in echoed["headers"]}
    # 2. the upstream learns the client came over https
    assert headers["x-forwarded-proto"] == "https"
    # 3. http.client keeps one connection for several requests, bodies both ways intact
    ctx = https_context(ca)
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10.0)
    try:
        for size in (0, 1000, 3_000_000):
            status, body = get(port, f"/fixed?size={size}", ctx, conn=conn)
            assert status == 200 and len(body) == size
        upload = bytes(range(256)) * 40_000  # 10 MB
        conn.request("POST", "/sink", body=upload)
        response = conn.getresponse()
        sunk = json.loads(response.read())
        assert sunk["body_len"] == len(upload)
        assert conn.sock is not None and conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        conn.close()


def test_sni_picks_the_certificate_and_alpn_offers_only_what_weft_serves(
        upstream, weft, free_port, ca):
    up = upstream("A")
    port = free_port()
    site, api = ca.leaf("site", ["localhost"]), ca.leaf("api", ["api.example.com"])
    weft(tls_listener(port, [cert_entry(site), cert_entry(api, ["api.example.com"])],
                      tls={"alpn": ["h2", "http/1.1"]})
         + destination("app", [up.address]) + route("app"))
    # 1. the name a certificate lists gets that certificate; no name or another gets the default
    assert "subject=CN = api.example.com" in s_client(port, "-servername", "api.example.com")
    assert "subject=CN = localhost" in s_client(port, "-servername", "other.example.com")
    assert "subject=CN = localhost" in s_client(port, "-noservername")
    # 2. ALPN: h2 first when the client offers it; a protocol weft does not serve is never
    #    chosen
    assert alpn_of(port, ca, ["h2", "http/1.1"]) == "h2"
    assert alpn_of(port, ca, ["spdy/3", "http/1.1"]) == "http/1.1"
    assert alpn_of(port, ca, ["spdy/3"]) is None
    # curl over TLS speaks HTTP/2 with weft, by ALPN
    done = subprocess.run(
        [CURL or "curl", "-sS", "--http2", "--cacert", str(ca.pem), "-o", "/dev/null",
         "-w", "%{http_version}", "--resolve", f"localhost:{port}:127.0.0.1",
         f"https://localhost:{port}/echo"],
        capture_output=True, timeout=20.0)
    assert done.returncode == 0 and done.stdout == b"2", (done.stdout, done.stderr)
    # 3. curl with SNI for the api name verifies against that certificate
    done = subprocess.run(
        [CURL or "curl", "-sS", "--cacert", str(ca.pem), "--resolve",
         f"api.example.com:{port}:127.0.0.1", f"https://api.example.com:{port}/echo"],
        capture_output=True, timeout=20.0)
    assert done.returncode == 0, done.stderr


def test_failed_handshakes_are_bounded_counted_and_logged_without_traceback(
        upstream, weft, free_port, ca, tmp_path):
    up = upstream("A")
    port, admin_port = free_port(), free_port()
    site = ca.leaf("site", ["localhost"])
    sup = start_supervised(weft, tmp_path, tls_listener(
        port, [cert_entry(site)], timeouts={"tls_handshake": "1s"}, admin_port=admin_port)
        + destination("app", [up.address]) + route("app"), workers=1)
    # 1. a client that connects and says nothing is closed after tls_handshake
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as silent:
        started = time.monotonic()
        assert silent.recv(100) == b""
        waited = time.monotonic() - started
    assert 0.8 <= waited < 3.0, waited
    # 2. plain HTTP to the TLS port, and a client that does not trust weft's certificate
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        plain.recv(100)
    untrusting = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        get(port, "/echo", untrusting)
    # 3. a good client is served meanwhile
    assert get(port, "/echo", https_context(ca))[0] == 200
    # 4. each failure counted under its reason
    label = f'listener="127.0.0.1:{port}"'

    def counted() -> str | None:
        text = admin_get(admin_port, "/metrics").text
        wanted = [f'weft_tls_handshake_failures_total{{{label},reason="{r}"}}'
                  for r in ("timeout", "http_request", "unknown_ca")]
        return text if all(w in text for w in wanted) else None

    wait_for(counted, 10.0, "the handshake failures in /metrics")
    # 5. logged at info, one line each, no traceback
    log = sup.weft.stderr_text()
    assert "failed: timeout" in log and "failed: http_request" in log
    assert "failed: unknown_ca" in log
    assert "Traceback" not in log


def test_client_certificates_are_required_and_verified(upstream, weft, free_port, ca, tmp_path):
    up = upstream("A")
    port = free_port()
    site = ca.leaf("site", ["localhost"])
    client = ca.leaf("client", ["trusted-client"], client=True)
    stranger = CA(tmp_path / "stranger", name="stranger CA").leaf(
        "stranger", ["stranger"], client=True)
    weft(tls_listener(port, [cert_entry(site)], tls={"client_ca": str(ca.pem)})
         + destination("app", [up.address]) + route("app"))
    # 1. with a certificate from the client CA: served
    assert get(port, "/echo", https_context(ca, client))[0] == 200
    # 2. without one, or with one from another CA: refused during the handshake
    for who in (None, stranger):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            get(port, "/echo", https_context(ca, who))
    # 3. curl agrees
    done = subprocess.run([CURL or "curl", "-sS", "--cacert", str(ca.pem), "--cert",
                           str(client.cert), "--key", str(client.key),
                           f"https://localhost:{port}/echo"], capture_output=True, timeout=20.0)
    assert done.returncode == 0, done.stderr


def test_reload_serves_a_replaced_certificate_and_refuses_a_broken_one(
        upstream, weft, free_port, ca, tmp_path):
    up = upstream("A")
    port = free_port()
    v1 = ca.leaf("site", ["localhost"])
    sup = start_supervised(weft, tmp_path, tls_listener(
        port, [cert_entry(v1)], timeouts={"drain_idle": "5s", "drain": "8s"})
        + destination("app", [up.address]) + route("app"), workers=1)
    ctx = https_context(ca)
    # 1. a keep-alive connection, handshaken with v1
    kept = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10.0)
    try:
        assert get(port, "/echo", ctx, conn=kept)[0] == 200
        assert kept.sock is not None and kept.sock.getpeercert(binary_form=True) == v1.der
        # 2. the files are replaced in place (same paths, new certificate) and weft reloads
        v2 = ca.leaf("site", ["localhost"])
        assert v2.der != v1.der
        result = sup.reload()
        assert result.returncode == 0, result.stdout + result.stderr
        # 3. new handshakes get v2; the open connection (v1's) is still served, by the old
        # worker, which closes it after this answer (it drains)
        assert served_certificate(port, ca) == v2.der
        assert get(port, "/echo", ctx, conn=kept)[0] == 200
    finally:
        kept.close()
    # 4. a key that does not match: the reload is refused, naming the key path; v2 serves on
    broken = mismatched(v2, "broken")
    v2.key.write_bytes(broken.key.read_bytes())
    result = sup.reload()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "listeners[0].tls.certificates[0].key" in result.stderr
    assert "does not match the certificate" in result.stderr
    assert served_certificate(port, ca) == v2.der
    assert get(port, "/echo", ctx)[0] == 200
    # 5. a missing file is refused the same way
    v2.key.unlink()
    result = sup.reload()
    assert result.returncode == 1 and "certificates[0].key: cannot read" in result.stderr
    assert common_name(served_certificate(port, ca)) == "localhost"
    assert sup.status()["generation"] == 2


@pytest.fixture
def tls_upstream(tmp_path: Path) -> Iterator[Callable[..., Upstream]]:
    """Factory ``tls_upstream(name, ca, leaf, *, client_ca=None, control_client=None)``: an
    upstream serving TLS with `leaf` (requiring client certificates from `client_ca`); all
    stopped at the end."""
    started: list[Upstream] = []

    def start(name: str, ca: CA, leaf: Pair, *, client_ca: Path | None = None,
              control_client: Pair | None = None) -> Upstream:
        ctx = https_context(ca, control_client)
        ctx.check_hostname = False
        up = start_upstream(name, tmp_path, tls=(leaf.cert, leaf.key), client_ca=client_ca,
                            control_tls=ctx)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


def upstream_tls_config(port: int, up_address: str, tls: dict[str, object], *,
                        access_log: Path, health: dict[str, object] | None = None) -> str:
    return (base_config(port, access_log=access_log)
            + destination("app", [up_address], health=health)
            + table("[destinations.app.tls]", tls) + route("app"))


def test_upstream_tls_is_verified_and_a_refused_certificate_is_a_502_naming_why(
        weft, tls_upstream, free_port, ca, tmp_path):
    good = tls_upstream("good", ca, ca.leaf("up", ["127.0.0.1", "upstream.internal"]))
    expired = tls_upstream("old", ca, ca.leaf("old", ["127.0.0.1"], expired=True))
    port, port2, port3 = free_port(), free_port(), free_port()
    # 1. verified against the configured CA: served, and the upstream saw TLS
    weft(upstream_tls_config(port, good.address, {"ca": str(ca.pem)},
                             access_log=tmp_path / "a.log"))
    status, body = get_plain(port, "/echo")
    assert status == 200 and json.loads(body)["name"] == "good"
    # 2. an expired certificate: 502, the reason names the verification error
    w2 = weft(upstream_tls_config(port2, expired.address, {"ca": str(ca.pem)},
                                  access_log=tmp_path / "b.log"), name="weft2")
    status, body = get_plain(port2, "/echo")
    assert status == 502
    assert b"certificate was refused: certificate has expired" in body
    wait_for(lambda: w2.access_log_records(), 5.0, "the access log line")
    assert w2.access_log_records()[-1]["error"] == "upstream_tls"
    # 3. the name verified is server_name when set: a wrong one is refused, the right one not
    w3 = weft(upstream_tls_config(port3, good.address,
                                  {"ca": str(ca.pem), "server_name": "other.internal"},
                                  access_log=tmp_path / "c.log"), name="weft3")
    status, body = get_plain(port3, "/echo")
    assert status == 502 and b"Hostname mismatch" in body, body
    assert "Traceback" not in w2.stderr_text() + w3.stderr_text()


def get_plain(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_upstream_mtls_sends_the_configured_client_certificate(weft, tls_upstream, free_port, ca,
                                                               tmp_path):
    client = ca.leaf("weft-client", ["weft-client"], client=True)
    up = tls_upstream("mtls", ca, ca.leaf("up", ["upstream.internal"]),
                      client_ca=ca.pem, control_client=client)
    port, port2 = free_port(), free_port()
    # 1. with cert and key: the upstream verified weft's client certificate
    weft(upstream_tls_config(port, up.address, {
        "ca": str(ca.pem), "server_name": "upstream.internal",
        "cert": str(client.cert), "key": str(client.key)}, access_log=tmp_path / "a.log"))
    status, body = get_plain(port, "/echo")
    assert status == 200 and json.loads(body)["tls_client"] == "weft-client"
    # 2. without: the upstream refuses the handshake, and the client gets a 502
    weft(upstream_tls_config(port2, up.address, {
        "ca": str(ca.pem), "server_name": "upstream.internal"},
        access_log=tmp_path / "b.log"), name="weft2")
    status, body = get_plain(port2, "/echo")
    assert status == 502 and b"tlsv13 alert certificate required" in body, body


def test_health_probes_go_over_tls(weft, tls_upstream, free_port, ca, tmp_path):
    up = tls_upstream("probed", ca, ca.leaf("up", ["127.0.0.1"]))
    port = free_port()
    weft(upstream_tls_config(port, up.address, {"ca": str(ca.pem)},
                             access_log=tmp_path / "a.log",
                             health={"interval": "300ms", "timeout": "250ms"}))
    # the upstream speaks only TLS: a /healthz it records came over a verified TLS probe
    wait_for(lambda: len(up.stats()["healthz_times"]) >= 3, 10.0, "three TLS probes")
    assert get_plain(port, "/echo")[0] == 200


def test_a_websocket_tunnels_over_tls_on_both_sides(weft, tls_upstream, free_port, ca, tmp_path):
    """The tunnel reads and writes each TLS connection from two tasks at once."""
    up = tls_upstream("wss", ca, ca.leaf("up", ["127.0.0.1"]))
    port = free_port()
    site = ca.leaf("site", ["localhost"])
    weft(tls_listener(port, [cert_entry(site)]) + destination("app", [up.address])
         + table("[destinations.app.tls]", {"ca": str(ca.pem)}) + route("app"))
    with WsClient(port, "/ws", tls=https_context(ca)) as ws:
        assert ws.accepted, ws.rejected_status
        for i in range(3):
            big = f"{i}" * 1_500_000  # past the kernel's buffers: short writes both ways
            ws.send_text(big)
            assert ws.receive(timeout=20.0) == big
        assert ws.ping(b"still there") == b"still there"


def test_listener_tls_in_toml_as_the_issue_writes_it(tmp_path, ca):
    """The issue's own example shape loads: inline certificate tables, empty strings unset."""
    from support.config import load_text

    site, api = ca.leaf("site", ["site.example"]), ca.leaf("api", ["api.example.com"])
    text = (base_config(8443) + destination("api", ["127.0.0.1:9000"]) + route("api"))
    text = text.replace("[timeouts]", table("[listeners.tls]", {
        "certificates": [cert_entry(site), cert_entry(api, ["api.example.com"])],
        "min_version": "1.2", "alpn": ["h2", "http/1.1"], "client_ca": ""}) + "[timeouts]", 1)
    text += "[destinations.api.tls]\n" + "\n".join(
        f"{k} = {toml_value(v)}" for k, v in {"ca": "", "server_name": "", "cert": "",
                                              "key": "", "verify": True}.items()) + "\n"
    cfg = load_text(tmp_path, text)
    assert cfg.listeners[0].tls is not None and cfg.destinations["api"].tls is not None
