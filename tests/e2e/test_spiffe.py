"""SPIFFE identity (issue 12) through the real ``python -m weft run`` and a real Workload API.

The agent is tests/support/workload_api_server.py: grpcio in a subprocess, on a unix socket
(or the same agent on loopback TCP), driven by commands (``x509`` rotates, ``jwt`` publishes
JWT bundles, ``mode``/``break``/``restart``/``stop``/``start`` misbehave). Certificates and
tokens come from tests/support/spiffe_certs.py:

* **example.org** is weft's own trust domain: weft's SVID is ``spiffe://example.org/weft``,
  the clients are workloads of it (``/frontend``, ``/backend``, ``/ns/prod/batch``);
* **partner.example** is federated (in ``trust_domains``): its workloads are trusted, and its
  CA is the one that forges an example.org ID (the union-of-bundles attack);
* **stranger.example** has a bundle the agent sends, but weft is not told to trust it.

The peers that judge weft are real: Python's ssl (OpenSSL) as the client, verifying weft's
SVID against the example.org bundle with no host name check (an SVID has no DNS name; its
identity is the URI SAN), and tests/support/upstream.py serving TLS that requires a client
certificate of example.org and reports the client's URI SAN.

Every wait is bounded; the agent, upstreams and weft are stopped by their fixtures.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from support.config import base_config, destination, route, table
from support.procs import start_upstream, unique_instance, wait_for
from support.prometheus import admin_answers, admin_get
from support.spiffe_certs import Svid, TrustDomain, agent_bundle, agent_svid
from support.supervised import Supervised, pidfile_in, run_weft_to_exit, start_supervised
from support.workload_api_server import WorkloadAPIServer

pytestmark = pytest.mark.e2e

WEFT_ID = "spiffe://example.org/weft"
FRONTEND = "spiffe://example.org/frontend"
AUDIENCE = "spiffe://example.org/api"
# Bounds: a weft boots in ~1-2 s on two loaded cores; a rotation reaches the workers in well
# under a second; a reconnect waits out the client's backoff (1 s doubling, jittered).
SERVED_TIMEOUT = 15.0
ROTATION_TIMEOUT = 10.0
RECONNECT_TIMEOUT = 15.0


# -- trust domains, SVIDs, the agent --------------------------------------------------------------


@dataclass
class Pki:
    """The three trust domains, and client SVIDs written to files (`client`)."""

    directory: Path
    example: TrustDomain = field(default_factory=lambda: TrustDomain("example.org"))
    partner: TrustDomain = field(default_factory=lambda: TrustDomain("partner.example"))
    stranger: TrustDomain = field(default_factory=lambda: TrustDomain("stranger.example"))
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def add_client(self, name: str, svid: Svid) -> None:
        self.clients[name] = svid.write(self.directory, name)

    def context(self, client: str | None = None, *, verify: bool = True) -> ssl.SSLContext:
        """A client context that verifies weft's SVID against the example.org bundle (no
        host name: an SVID has none), presenting `client`'s SVID when given."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        if verify:
            ctx.load_verify_locations(cadata=self.example.ca_pem.decode())
        else:
            ctx.verify_mode = ssl.CERT_NONE
        if client is not None:
            ctx.load_cert_chain(*self.clients[client])
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    p = Pki(tmp_path_factory.mktemp("spiffe-pki"))
    ex, partner = p.example, p.partner
    p.add_client("frontend", ex.svid("/frontend"))
    p.add_client("backend", ex.svid("/backend"))
    p.add_client("batch", ex.svid("/ns/prod/batch"))
    p.add_client("partner", partner.svid("/billing"))
    # Signed by partner.example's CA (trusted, so OpenSSL's union store accepts it), claiming
    # an ID of example.org: only the re-check in the leaf's own trust domain refuses it.
    p.add_client("forged", ex.svid("/frontend", issuer=partner))
    p.add_client("stranger", p.stranger.svid("/frontend"))
    return p


def weft_svid(pki: Pki, *, lifetime: datetime.timedelta | None = None) -> Svid:
    """A fresh SVID for weft (a new key and serial each call: a rotation)."""
    not_after = None
    if lifetime is not None:
        not_after = datetime.datetime.now(datetime.UTC) + lifetime
    return pki.example.svid("/weft", not_after=not_after)


def give_x509(agent: WorkloadAPIServer, pki: Pki, svid: Svid) -> None:
    """The agent's X.509 state: `svid` as weft's (with the example.org bundle), and the
    partner.example and stranger.example bundles as federated ones. Open streams get it at
    once (a rotation)."""
    agent.command_sync(
        "x509",
        svids=[agent_svid(pki.example, svid)],
        federated={td.id: agent_bundle(td) for td in (pki.partner, pki.stranger)},
    )


def x509_fetches(agent: WorkloadAPIServer) -> list[dict[str, object]]:
    return [c for c in agent.command_sync("log")["log"] if c["method"] == "FetchX509SVID"]


# -- config ---------------------------------------------------------------------------------------


def spiffe_config(
    port: int,
    endpoint: str | None,
    *,
    client_auth: str | None = "required",
    trust_domains: Sequence[str] = ("partner.example",),
    first_fetch_timeout: str = "3s",
    admin_port: int | None = None,
    access_log: Path | None = None,
    workers: int = 1,
    instance: str | None = None,
) -> str:
    """[server], one listener (a SPIFFE TLS one unless `client_auth` is None: cleartext),
    [timeouts], [spiffe] (`endpoint` None: from $SPIFFE_ENDPOINT_SOCKET) and [admin]."""
    text = base_config(port, access_log=access_log, server={"workers": workers},
                       instance=instance)
    if client_auth is not None:
        tls = table("[listeners.tls]", {"spiffe": True, "client_auth": client_auth})
        # [listeners.tls] belongs to the last [[listeners]]: put it right after it.
        head, sep, rest = text.partition("[timeouts]")
        text = head + tls + sep + rest
    spiffe: dict[str, object] = {"trust_domains": list(trust_domains),
                                 "first_fetch_timeout": first_fetch_timeout}
    if endpoint is not None:
        spiffe = {"endpoint": endpoint, **spiffe}
    text += table("[spiffe]", spiffe)
    if admin_port is not None:
        text += table("[admin]", {"port": admin_port})
    return text


def authorize(**lists: Sequence[str]) -> str:
    """One ``[[routes.authorize]]`` entry of the route before it."""
    return table("[[routes.authorize]]", {k: list(v) for k, v in lists.items()})


# -- clients --------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        return json.loads(self.body)


def request(port: int, path: str, ctx: ssl.SSLContext | None, *,
            headers: Mapping[str, str] | None = None,
            conn: http.client.HTTPConnection | None = None) -> Answer:
    """One GET to weft (https with `ctx`, else http), on `conn` when given (kept alive)."""
    c = conn or (http.client.HTTPConnection("127.0.0.1", port, timeout=10.0) if ctx is None
                 else http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10.0))
    try:
        c.request("GET", path, headers=dict(headers or {}))
        r = c.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        if conn is None:
            c.close()


def refused(port: int, ctx: ssl.SSLContext, path: str = "/echo") -> str | None:
    """Why a GET with `ctx` got no HTTP answer (the handshake or the connection failed), or
    None when it got one."""
    try:
        request(port, path, ctx)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        return repr(e)
    return None


def closed_before_any_http(port: int, ctx: ssl.SSLContext) -> str:
    """Complete the client side of a handshake, send nothing, and return how weft ended the
    connection; AssertionError if it waited for a request instead (5 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                data = tls.recv(1)
        except (ssl.SSLError, ConnectionError) as e:
            return repr(e)
        except TimeoutError:
            raise AssertionError("weft kept the connection open, waiting for HTTP") from None
    assert data == b"", data
    return "EOF"


def presented(port: int, ctx: ssl.SSLContext) -> x509.Certificate:
    """The certificate a new handshake with weft gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as raw, \
            ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def wait_served(port: int, ctx: ssl.SSLContext | None, path: str = "/echo",
                headers: Mapping[str, str] | None = None) -> Answer:
    """Poll until weft answers `path` with 200 (its workers have their SVID)."""
    last: list[object] = [None]

    def answered() -> Answer | None:
        try:
            a = request(port, path, ctx, headers=headers)
        except OSError as e:
            last[0] = e
            return None
        last[0] = a.status
        return a if a.status == 200 else None

    try:
        return wait_for(answered, SERVED_TIMEOUT, f"weft to serve {path}", interval=0.1)
    except AssertionError as e:
        raise AssertionError(f"{e}; last: {last[0]!r}") from None


def wait_presented(port: int, ctx: ssl.SSLContext, svid: Svid, *, in_a_row: int = 1,
                   timeout: float = ROTATION_TIMEOUT) -> None:
    """Poll new handshakes until `in_a_row` consecutive ones get `svid`'s certificate."""
    streak = [0]

    def seen() -> bool:
        try:
            got = presented(port, ctx).serial_number == svid.cert.serial_number
        except OSError:
            got = False
        streak[0] = streak[0] + 1 if got else 0
        return streak[0] >= in_a_row

    wait_for(seen, timeout, f"new handshakes to present the SVID with serial "
                            f"{svid.cert.serial_number:x}", interval=0.05)


def handshake_failures(admin_port: int, port: int) -> dict[str, float]:
    """weft_tls_handshake_failures_total of the listener on `port`, by reason."""
    text = admin_get(admin_port, "/metrics").text
    pattern = re.compile(r'^weft_tls_handshake_failures_total\{([^}]*)\} (\S+)$', re.M)
    out: dict[str, float] = {}
    for labels, value in pattern.findall(text):
        if f'listener="127.0.0.1:{port}"' in labels:
            reason = re.search(r'reason="([^"]*)"', labels)
            if reason:
                out[reason.group(1)] = out.get(reason.group(1), 0.0) + float(value)
    return out


# -- tests ----------------------------------------------------------------------------------------


def test_mtls_clients_are_verified_in_their_own_trust_domain_and_authorized_by_id(
        agent, pki, upstream, weft, free_port, tmp_path):
    """1. weft presents the SVID the agent gave it, which a client verifies with the
       example.org bundle alone.
    2. Verified clients are authorized per route: by ID, by path prefix, by trust domain;
       an ID of a trusted domain that no entry names gets 403, not the upstream.
    3. No certificate, a domain weft does not trust, and a partner.example certificate
       claiming an example.org ID are refused at the handshake: weft closes the connection
       without reading HTTP, and counts the forgery under a ``svid_`` reason.
    4. The access log names the principal; nothing of it is sent to the upstream."""
    up = upstream("app")
    port, admin_port = free_port(), free_port()
    give_x509(agent, pki, svid := weft_svid(pki))
    weft(spiffe_config(port, agent.uri, admin_port=admin_port,
                       access_log=tmp_path / "access.log")
         + destination("app", [up.address])
         + route("app", path_prefix="/frontend", strip_prefix=True)
         + authorize(allow_ids=[FRONTEND])
         + route("app", path_prefix="/prod", strip_prefix=True)
         + authorize(allow_path_prefixes=["spiffe://example.org/ns/prod/"])
         + route("app", path_prefix="/partner", strip_prefix=True)
         + authorize(allow_trust_domains=["partner.example"])
         + route("app"))
    # 1. weft's SVID, verified by OpenSSL against the example.org bundle
    wait_served(port, pki.context("frontend"))
    cert = presented(port, pki.context("frontend"))
    assert uri_sans(cert) == [WEFT_ID]
    assert cert == svid.cert
    # 2. authorization, route by route: (client, path) -> status
    expected = {
        ("frontend", "/frontend/echo"): 200,
        ("backend", "/frontend/echo"): 403,
        ("partner", "/frontend/echo"): 403,
        ("batch", "/prod/echo"): 200,
        ("frontend", "/prod/echo"): 403,
        ("partner", "/partner/echo"): 200,
        ("frontend", "/partner/echo"): 403,
        ("backend", "/echo"): 200,  # no authorize: any verified client
        ("partner", "/echo"): 200,
    }
    up.reset_stats()
    got = {key: request(port, key[1], pki.context(key[0])).status for key in expected}
    assert got == expected
    assert up.stats()["requests"] == list(expected.values()).count(200)
    # 3. refused at the handshake, before any HTTP; the upstream sees none of them
    up.reset_stats()
    for who in (None, "stranger", "forged"):
        assert refused(port, pki.context(who)) is not None, who
        closed_before_any_http(port, pki.context(who))
    assert up.stats()["requests"] == 0

    def counted() -> dict[str, float] | None:
        failures = handshake_failures(admin_port, port)
        return failures if failures.get("svid_bad_chain", 0) >= 2 else None

    wait_for(counted, 10.0, "the forged SVID's two svid_bad_chain handshake failures")
    # 4. the principal is logged, and not sent upstream
    answer = request(port, "/frontend/echo", pki.context("frontend"))
    sent = answer.json()["headers"]
    assert not [h for h in sent if "spiffe://" in h[1]], sent  # type: ignore[index]

    def logged() -> dict[str, object] | None:
        for r in reversed(weft_records(tmp_path / "access.log")):
            if r.get("target") == "/frontend/echo" and r.get("status") == 200:
                return r
        return None

    record = wait_for(logged, 5.0, "the access log line of /frontend/echo")
    assert record["principal"] == FRONTEND, record
    denied = [r for r in weft_records(tmp_path / "access.log") if r.get("status") == 403]
    assert "spiffe://example.org/backend" in [r["principal"] for r in denied], denied


def test_optional_client_auth_serves_anonymous_clients_where_no_identity_is_needed(
        agent, pki, upstream, weft, free_port):
    """``client_auth = "optional"``: a client without a certificate is served on a route
    without authorize and refused (403) on one with it; a client with a certificate must still
    present a valid SVID of its own trust domain, or the handshake is refused."""
    up = upstream("app")
    port = free_port()
    give_x509(agent, pki, weft_svid(pki))
    weft(spiffe_config(port, agent.uri, client_auth="optional")
         + destination("app", [up.address])
         + route("app", path_prefix="/frontend", strip_prefix=True)
         + authorize(allow_ids=[FRONTEND])
         + route("app"))
    anonymous = pki.context()
    wait_served(port, anonymous)
    assert request(port, "/frontend/echo", anonymous).status == 403
    assert request(port, "/frontend/echo", pki.context("frontend")).status == 200
    assert refused(port, pki.context("forged")) is not None
    closed_before_any_http(port, pki.context("forged"))


def weft_records(path: Path) -> list[dict[str, object]]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


@pytest.mark.parametrize("agent_state", ["no identity issued", "no agent"])
def test_weft_does_not_start_without_an_svid_and_says_why(agent, pki, free_port, tmp_path,
                                                          agent_state):
    """1. The agent answers "no identity issued" (PERMISSION_DENIED), or nothing listens on
       the socket.
    2. ``weft run`` exits non-zero once first_fetch_timeout has passed (not before), naming
       the endpoint, the timeout and the last error; it leaves nothing in /dev/shm."""
    if agent_state == "no agent":
        agent.command_sync("stop")
    instance = unique_instance()
    config = tmp_path / "weft.toml"
    config.write_text(spiffe_config(free_port(), agent.uri, instance=instance)
                      + destination("app", ["127.0.0.1:9"]) + route("app"))
    started = time.monotonic()
    code, stderr = run_weft_to_exit(
        ["run", "-c", str(config), "--pidfile", str(pidfile_in(tmp_path))],
        cwd=tmp_path, timeout=25.0)
    took = time.monotonic() - started
    assert code != 0, stderr
    assert f"no X.509-SVID from {agent.uri} within 3s: " in stderr, stderr
    if agent_state == "no identity issued":
        assert "no identity issued" in stderr, stderr
    else:
        assert str(agent.socket) in stderr.split("within 3s: ", 1)[1], stderr
    assert took >= 3.0, took
    assert "Traceback" not in stderr, stderr
    assert not list(Path("/dev/shm").glob(f"weft-{instance}-*"))
    assert not list(Path("/dev/shm").glob(f"weft.{instance}.*"))


# -- JWT-SVIDs ------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(header: dict[str, object], claims: dict[str, object]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def test_jwt_svids_are_checked_against_the_agents_jwt_bundles(agent, pki, upstream, weft,
                                                              free_port, tmp_path):
    """1. The endpoint comes from $SPIFFE_ENDPOINT_SOCKET; the JWT bundles of example.org
       and partner.example from the agent's FetchJWTBundles.
    2. Valid tokens (ES256, RS256, PS256; a partner token checked with partner keys) pass.
    3. Every bad token is 401 ``Bearer error="invalid_token"``; none is plain 401 ``Bearer``.
    4. A valid token whose subject the route's authorize does not admit is 403.
    5. The access log's principal is the token's subject, null for a refused token."""
    up = upstream("app")
    port = free_port()
    ex, partner = pki.example, pki.partner
    for kid, alg in (("ex-es", "ES256"), ("ex-rs", "RS256"), ("ex-ps", "PS256")):
        ex.jwt_key(kid, alg)
    partner.jwt_key("pa-es", "ES256")
    give_x509(agent, pki, weft_svid(pki))
    agent.command_sync("jwt", bundles={td.id: td.jwks_json().decode() for td in (ex, partner)})
    weft(spiffe_config(port, None, client_auth="none", access_log=tmp_path / "access.log")
         + destination("app", [up.address])
         + route("app")
         + table("[routes.jwt_svid]", {"audience": AUDIENCE,
                                       "algorithms": ["RS256", "ES256", "PS256"]})
         + authorize(allow_ids=[FRONTEND], allow_trust_domains=["partner.example"]),
         env={"SPIFFE_ENDPOINT_SOCKET": agent.uri})
    ctx = pki.context()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)

    def bearer(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    # 1-2. valid tokens (the first waits for the bundles to reach the workers)
    wait_served(port, ctx, headers=bearer(ex.jwt("ex-es", exp=later)))
    for token in (ex.jwt("ex-rs", exp=later), ex.jwt("ex-ps", exp=later),
                  partner.jwt("pa-es", sub="/billing", exp=later)):
        assert request(port, "/echo", ctx, headers=bearer(token)).status == 200
    # 3. invalid tokens
    rsa_public = ex.jwt_keys["ex-rs"].key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = {"sub": FRONTEND, "aud": AUDIENCE, "exp": int(later.timestamp())}
    none_token = _segments({"alg": "none", "typ": "JWT", "kid": "ex-es"}, claims) + "."
    hs_input = _segments({"alg": "HS256", "typ": "JWT", "kid": "ex-rs"}, claims)
    hs_token = hs_input + "." + _b64(hmac.new(rsa_public, hs_input.encode(),
                                              hashlib.sha256).digest())
    impostor = TrustDomain("example.org")  # same names, keys the agent never published
    bad = {
        "expired": ex.jwt("ex-es", exp=datetime.datetime.now(datetime.UTC)
                          - datetime.timedelta(minutes=5)),
        "wrong audience": ex.jwt("ex-es", aud="spiffe://example.org/other", exp=later),
        "alg none": none_token,
        "HS256 keyed with the RSA public key": hs_token,
        "unknown kid": impostor.jwt("ex-unknown", exp=later),
        "a published kid, another key": impostor.jwt("ex-es", exp=later),
        "a partner subject signed with an example.org key": ex.jwt(
            "ex-es", sub="spiffe://partner.example/billing", exp=later),
        "garbage": "not.a.jwt",
    }
    up.reset_stats()
    for what, token in bad.items():
        a = request(port, "/echo", ctx, headers=bearer(token))
        assert (a.status, a.headers.get("www-authenticate")) == (
            401, 'Bearer error="invalid_token"'), what
    missing = request(port, "/echo", ctx)
    assert (missing.status, missing.headers.get("www-authenticate")) == (401, "Bearer")
    # 4. valid, but not admitted on this route
    assert request(port, "/echo", ctx,
                   headers=bearer(ex.jwt("ex-es", sub="/backend", exp=later))).status == 403
    assert up.stats()["requests"] == 0
    # 5. who the access log names
    def logged() -> list[dict[str, object]] | None:
        records = weft_records(tmp_path / "access.log")
        return records if len([r for r in records if r.get("status") == 403]) == 1 else None

    records = wait_for(logged, 5.0, "the access log line of the 403")
    by_status: dict[object, set[object]] = {}
    for r in records:
        by_status.setdefault(r["status"], set()).add(r["principal"])
    assert by_status[200] >= {FRONTEND, "spiffe://partner.example/billing"}, by_status
    assert by_status[401] == {None}, by_status
    assert by_status[403] == {"spiffe://example.org/backend"}, by_status


# -- upstream mTLS --------------------------------------------------------------------------------


def test_weft_presents_its_svid_upstream_and_checks_the_upstreams_id(agent, pki, weft,
                                                                      free_port, tmp_path):
    """1. Over the agent's loopback TCP endpoint; a cleartext listener.
    2. The upstream, requiring a client certificate of example.org, sees weft's SPIFFE ID.
    3. An upstream with another ID of the same domain, and one of partner.example claiming
       the expected ID, get no request: 502."""
    ex = pki.example
    ca_file = tmp_path / "example-bundle.pem"
    ca_file.write_bytes(ex.ca_pem)
    upstreams = []
    for name, svid in (("api", ex.svid("/api")), ("db", ex.svid("/db")),
                       ("forged", ex.svid("/api", issuer=pki.partner))):
        files = svid.write(tmp_path / "upstream-pki", name)
        upstreams.append(start_upstream(name, tmp_path, tls=files, client_ca=ca_file))
    try:
        port = free_port()
        give_x509(agent, pki, weft_svid(pki))
        text = spiffe_config(port, agent.tcp_uri, client_auth=None)
        for up in upstreams:
            text += destination(up.name, [up.address])
            text += table(f"[destinations.{up.name}.tls]",
                          {"spiffe": True, "expect_ids": [AUDIENCE]})
            text += route(up.name, path_prefix=f"/{up.name}", strip_prefix=True)
        weft(text)
        # 2. the upstream saw weft's SVID
        echoed = wait_served(port, None, "/api/echo").json()
        assert echoed["tls_client_uris"] == [WEFT_ID], echoed
        # 3. the wrong ID, and a forgery of the right one
        assert request(port, "/db/echo", None).status == 502
        assert request(port, "/forged/echo", None).status == 502
        assert request(port, "/api/echo", None).status == 200
    finally:
        for up in upstreams:
            up.stop()


# -- principal-keyed rate limiting ----------------------------------------------------------------


def test_each_principal_has_its_own_rate_limit_bucket(agent, pki, upstream, weft, free_port):
    """One bucket of 2 (1/m, burst 1) per SPIFFE ID: frontend exhausts its bucket (429);
    backend, from the same address, is still admitted."""
    up = upstream("app")
    port = free_port()
    give_x509(agent, pki, weft_svid(pki))
    weft(spiffe_config(port, agent.uri)
         + destination("app", [up.address])
         + route("app", path_prefix="/limited", strip_prefix=True)
         + authorize(allow_trust_domains=["example.org"])
         + table("[[routes.rate_limit]]", {"key": "principal", "rate": "1/m", "burst": 1})
         + route("app"))
    wait_served(port, pki.context("frontend"))  # an unlimited route: the buckets stay full
    frontend = [request(port, "/limited/echo", pki.context("frontend")).status
                for _ in range(3)]
    assert frontend == [200, 200, 429]
    assert request(port, "/limited/echo", pki.context("backend")).status == 200
    assert request(port, "/limited/echo", pki.context("frontend")).status == 429


# -- rotation, stream loss, expiry ----------------------------------------------------------------


@dataclass
class Load:
    """Clients in threads until stopped: `keepalive` threads each looping GETs on one
    connection, `fresh` threads each making a new connection (a new handshake) per GET.
    Every request counts; an exception or a status other than 200 is a failure."""

    port: int
    ctx: ssl.SSLContext
    keepalive: int = 2
    fresh: int = 1
    statuses: Counter[object] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for keep in [True] * self.keepalive + [False] * self.fresh:
            t = threading.Thread(target=self._run, args=(keep,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15.0)
        assert not any(t.is_alive() for t in self._threads), "a load thread hangs"

    def _run(self, keep: bool) -> None:
        conn: http.client.HTTPSConnection | None = None
        while not self._stop.is_set():
            if conn is None:
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx,
                                                   timeout=10.0)
            try:
                status: object = request(self.port, "/echo", self.ctx, conn=conn).status
            except Exception as e:  # counted: the point is that there are none
                status = type(e).__name__
                with self._lock:
                    self.failures.append(repr(e))
                conn.close()
                conn = None
            with self._lock:
                self.statuses[status] += 1
                if status != 200 and isinstance(status, int):
                    self.failures.append(f"status {status}")
            if not keep and conn is not None:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def test_rotation_reaches_every_worker_without_a_failed_request(agent, pki, upstream, weft,
                                                                free_port):
    """1. Two workers; one Workload API stream for the whole weft.
    2. A keep-alive connection made with SVID v1.
    3. Under load (keep-alive and new connections), three rotations: after each, every new
       handshake presents the new SVID, and no request fails.
    4. The connection of step 2 still works, on v1's handshake."""
    up = upstream("app")
    port = free_port()
    v1 = weft_svid(pki)
    give_x509(agent, pki, v1)
    weft(spiffe_config(port, agent.uri, workers=2)
         + destination("app", [up.address]) + route("app"))
    ctx = pki.context("frontend")
    wait_served(port, ctx)
    wait_presented(port, ctx, v1, in_a_row=6)
    # 2. kept alive across the rotations
    kept = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10.0)
    try:
        assert request(port, "/echo", ctx, conn=kept).status == 200
        kept_sock = kept.sock
        # 3. rotations under load
        with Load(port, ctx) as load:
            time.sleep(0.5)
            for _ in range(3):
                svid = weft_svid(pki)
                give_x509(agent, pki, svid)
                # Two workers behind SO_REUSEPORT: a run of new handshakes samples both.
                wait_presented(port, ctx, svid, in_a_row=6)
                time.sleep(0.3)
        assert load.failures == [], (load.failures[:5], load.statuses)
        assert load.statuses[200] > 20, load.statuses
        # 4. the old connection, still on v1's handshake
        assert request(port, "/echo", ctx, conn=kept).status == 200
        assert kept.sock is kept_sock
        assert kept.sock.getpeercert(binary_form=True) == v1.der  # type: ignore[union-attr]
    finally:
        kept.close()
    # 1. one stream for the host, whatever the number of workers
    assert len(x509_fetches(agent)) == 1, x509_fetches(agent)


def test_weft_serves_through_agent_outages_and_picks_up_rotations_after(agent, pki, upstream,
                                                                         weft, free_port):
    """For each outage, the stream broken, the agent restarted, and no agent for 2 s: weft
    keeps serving with the SVID it has; once the agent is back, weft reconnects (its backoff
    is 1 s doubling) and a rotation made then reaches new handshakes."""
    up = upstream("app")
    port = free_port()
    give_x509(agent, pki, svid := weft_svid(pki))
    weft(spiffe_config(port, agent.uri) + destination("app", [up.address]) + route("app"))
    ctx = pki.context("frontend")
    wait_served(port, ctx)
    for outage in ("break", "restart", "stop"):
        calls = len(x509_fetches(agent))
        agent.command_sync(outage)
        if outage == "stop":
            for _ in range(4):  # 2 s without an agent
                assert request(port, "/echo", ctx).status == 200
                time.sleep(0.5)
            agent.command_sync("start")
        # still served, with the SVID it had
        assert request(port, "/echo", ctx).status == 200
        assert presented(port, ctx).serial_number == svid.cert.serial_number
        wait_for(lambda calls=calls: len(x509_fetches(agent)) > calls, RECONNECT_TIMEOUT,
                 f"weft to call FetchX509SVID again after {outage}", interval=0.2)
        give_x509(agent, pki, svid := weft_svid(pki))
        wait_presented(port, ctx, svid)
        assert request(port, "/echo", ctx).status == 200


def test_an_expired_svid_is_never_presented_and_makes_weft_unready(agent, pki, upstream, weft,
                                                                    free_port):
    """1. weft's SVID lives 8 s; the agent then refuses weft ("no identity issued").
    2. Until expiry, handshakes succeed, every one of them before the certificate's notAfter.
    3. After expiry, new handshakes are refused and /readyz says 503.
    4. The agent issues again: weft serves the new SVID and is ready."""
    up = upstream("app")
    port, admin_port = free_port(), free_port()
    svid = weft_svid(pki, lifetime=datetime.timedelta(seconds=8))
    expiry = svid.cert.not_valid_after_utc.timestamp()
    give_x509(agent, pki, svid)
    weft(spiffe_config(port, agent.uri, admin_port=admin_port)
         + destination("app", [up.address]) + route("app"))
    ctx = pki.context("frontend")
    # Without verification, so that an expired certificate would be seen, not refused.
    looking = pki.context("frontend", verify=False)
    wait_served(port, ctx)
    wait_for(lambda: (a := admin_answers(admin_port, "/readyz")) is not None and a.status == 200,
             5.0, "/readyz 200")
    agent.command_sync("mode", mode="deny")
    # 2-3. handshakes until one is refused
    served: list[tuple[float, int]] = []
    refusal = None
    while refusal is None:
        began = time.time()
        assert began < expiry + 5.0, f"still served 5 s after the SVID expired: {served[-3:]}"
        try:
            cert = presented(port, looking)
        except OSError as e:
            refusal = repr(e)
            break
        served.append((began, cert.serial_number))
        assert cert.serial_number == svid.cert.serial_number
        assert began <= expiry, f"the expired SVID was presented {began - expiry:.2f}s late"
        time.sleep(0.1)
    assert served, "no handshake succeeded before the SVID expired"
    assert time.time() >= expiry - 1.0, f"refused {expiry - time.time():.1f}s before expiry"
    assert refused(port, ctx) is not None
    wait_for(lambda: (a := admin_answers(admin_port, "/readyz")) is not None and a.status == 503,
             5.0, "/readyz 503 after expiry")
    # 4. issued again
    agent.command_sync("mode", mode="serve")
    give_x509(agent, pki, renewed := weft_svid(pki))
    wait_presented(port, ctx, renewed, timeout=RECONNECT_TIMEOUT)
    assert request(port, "/echo", ctx).status == 200
    wait_for(lambda: (a := admin_answers(admin_port, "/readyz")) is not None and a.status == 200,
             5.0, "/readyz 200 again")


def _identity_pid(sup: Supervised) -> int:
    """The supervisor's child that is neither a worker nor the admin process (no [admin])."""
    children = Path(f"/proc/{sup.pid}/task/{sup.pid}/children").read_text().split()
    workers = {w["pid"] for w in sup.workers()}
    others = [int(p) for p in children if int(p) not in workers]
    assert len(others) == 1, (children, workers)
    return others[0]


def test_the_identity_process_is_respawned_restarted_on_reload_and_never_doubled(
        agent, pki, upstream, weft, free_port, tmp_path):
    """One identity process per instance (one FetchX509SVID stream however many workers):
    1. killed, it is respawned and weft serves on with the SVID it has, then takes a rotation;
    2. a reload that moves [spiffe] endpoint to the agent's TCP address restarts it there;
    3. a reload whose [spiffe] names no endpoint (and no $SPIFFE_ENDPOINT_SOCKET) is refused
       with the reason, and the running generation and identity process go on;
    4. weft status shows weft's SPIFFE ID and the trusted domains."""
    up = upstream("app")
    port = free_port()
    give_x509(agent, pki, svid := weft_svid(pki))
    tail = destination("app", [up.address]) + route("app")
    name = unique_instance()
    text = spiffe_config(port, agent.uri, workers=2, instance=name) + tail
    sup = start_supervised(weft, tmp_path, text, workers=2, env={"SPIFFE_ENDPOINT_SOCKET": ""})
    ctx = pki.context("frontend")
    wait_served(port, ctx)
    assert len([c for c in x509_fetches(agent) if c.get("header", True)]) >= 1
    streams = len(x509_fetches(agent))
    # 1. killed and respawned
    first = _identity_pid(sup)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(x509_fetches(agent)) > streams, RECONNECT_TIMEOUT,
             "a respawned identity process to watch again", interval=0.2)
    assert request(port, "/echo", ctx).status == 200
    assert presented(port, ctx).serial_number == svid.cert.serial_number
    second = _identity_pid(sup)
    assert second != first
    give_x509(agent, pki, svid := weft_svid(pki))
    wait_presented(port, ctx, svid)
    # 2. reload to the TCP endpoint: a new identity process, the same SVID meanwhile
    config = sup.weft.config_path
    assert config is not None
    config.write_text(spiffe_config(port, agent.tcp_uri, workers=2, instance=name) + tail)
    result = sup.reload()
    assert result.returncode == 0, result.stdout + result.stderr
    third = wait_for(lambda: (p := _identity_pid(sup)) != second and p, 10.0,
                     "the identity process restarted by the reload")
    give_x509(agent, pki, svid := weft_svid(pki))
    wait_presented(port, ctx, svid)
    # 3. no endpoint anywhere: refused, and nothing changes
    config.write_text(spiffe_config(port, None, workers=2, instance=name) + tail)
    result = sup.reload()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "spiffe.endpoint" in result.stderr and "SPIFFE_ENDPOINT_SOCKET" in result.stderr
    assert _identity_pid(sup) == third
    assert request(port, "/echo", ctx).status == 200
    # 4. status
    ident = sup.status()["identity"]
    assert ident["spiffe_id"] == WEFT_ID and ident["problem"] is None
    assert ident["trust_domains"] == ["example.org", "partner.example"]
    text_status = sup.cli("status")
    assert f"identity {WEFT_ID} until" in text_status.stdout, text_status.stdout


def test_a_reload_that_adds_spiffe_needs_an_svid_and_undoes_itself_without_one(
        agent, pki, upstream, weft, free_port, tmp_path):
    """A running weft without [spiffe]:
    1. reloaded with [spiffe] and a SPIFFE listener while the agent issues nothing: the new
       workers never get an SVID, the reload fails naming why, the identity process it started
       is stopped again, and the old generation serves on;
    2. reloaded again once the agent issues: weft serves mTLS with its SVID."""
    up = upstream("app")
    plain, tls_port = free_port(), free_port()
    name = unique_instance()
    tail = destination("app", [up.address]) + route("app")
    sup = start_supervised(weft, tmp_path, spiffe_config(plain, None, client_auth=None,
                           instance=name).split("[spiffe]")[0] + tail, workers=1)
    assert request(plain, "/echo", None).status == 200
    both = spiffe_config(tls_port, agent.uri, first_fetch_timeout="1s", instance=name)
    listener = both.split("[[listeners]]")[1].split("[timeouts]")[0]
    text = spiffe_config(plain, agent.uri, client_auth=None, first_fetch_timeout="1s",
                         instance=name)
    text = text.replace("[timeouts]", "[[listeners]]" + listener + "[timeouts]", 1) + tail
    config = sup.weft.config_path
    assert config is not None
    # 1. the agent issues nothing
    agent.command_sync("mode", mode="deny")
    config.write_text(text)
    result = sup.reload(timeout=30.0)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "new workers failed" in result.stderr, result.stderr
    assert request(plain, "/echo", None).status == 200
    children = Path(f"/proc/{sup.pid}/task/{sup.pid}/children").read_text().split()
    assert sorted(map(int, children)) == sorted(w["pid"] for w in sup.workers()), children
    assert sup.status()["identity"] is None  # its directory went with it
    # 2. issued: the same reload succeeds
    agent.command_sync("mode", mode="serve")
    give_x509(agent, pki, weft_svid(pki))
    result = sup.reload(timeout=30.0)
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_served(tls_port, pki.context("frontend")).status == 200
    assert request(plain, "/echo", None).status == 200
