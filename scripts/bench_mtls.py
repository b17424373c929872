"""The mTLS cases of scripts/bench: weft's SPIFFE listener (``[listeners.tls] spiffe = true``,
client certificates required, ``[[routes.authorize]]``) against nginx terminating TLS with
client certificate verification, in front of the same upstream as bench_driver.py's cases.

Two cases (``--protocols mtls,mtls-hs``), both HTTP/1.1 over TLS 1.3, GET of a fixed body:

* ``mtls``: keep-alive. 64 connections, each handshaken once before the timed window, then
  one request after another on each. The reference is the usual nginx (2 workers), with an
  mTLS ``server`` of its own (scripts/bench_nginx/mtls_server.conf).
* ``mtls-hs``: a new connection per request (connect, full handshake with the client's
  certificate, one request with ``Connection: close``, close), so req/s is handshakes/s.
  The reference is ``nginx-w1``, the same proxy config with ``worker_processes 1``: one
  worker against one, as ``--workers 1`` runs weft. No session is ever resumed: the client
  never offers one, weft's contexts that check peers issue no tickets (weft.svid), and the
  nginx server sets ``ssl_session_tickets off`` and ``ssl_session_cache off``; `verify`
  checks that neither proxy sent a ticket.

What this module owns: the trust domain and certificates (tests/support/spiffe_certs.py: CA
of ``example.org``, weft's SVID ``spiffe://example.org/weft``, the client's
``spiffe://example.org/bench``), the Workload API agent weft takes its SVID from
(tests/support/workload_api_server.py, a real grpcio server in a subprocess; grpcio and spiffe
are weft's test extras, which scripts/bench installs for these cases), weft's mTLS listener,
route and ``[spiffe]`` table, nginx's mTLS server, and the load generator. The driver keeps
processes, rounds, order, CPU accounting and the summary.

**weft's side.** The mTLS listener serves a route of its own, selected by ``Host:
mtls.bench`` (weft's host tier, like nginx's server_name), whose ``[[routes.authorize]]``
allows only the client's ID; the plain route stays open for the other cases and for the
readiness checks. nginx checks the chain only (it has no SPIFFE ID to authorise): the per-
trust-domain chain check and the authorisation are work weft does and nginx does not, and the
ratio charges them to weft, as a deployment would.

**The load generator** is this file run as a script (``load``), because no ready-made tool
here presents a client certificate while generating enough load: wrk has no certificate
option (and its Lua cannot set one), nor has h2load (``--h1`` included), hey or ab;
``openssl s_time`` can present one but runs one connection at a time in one process (it
measures a round trip, not a proxy's capacity) and speaks HTTP/1.0; curl starts one process
per handshake or, with ``--parallel``, runs a fixed count, not a timed load. It forks
`LOAD_PROCESSES` processes (one per core, so the client is not one GIL), each driving its
share of `LOAD_CONNECTIONS` non-blocking ``ssl`` sockets from one ``selectors`` loop: send
a GET, read the response by its Content-Length, check the status, send the next. Python's
client costs more CPU per request than wrk's C; the driver records it (the ``wrk_cpu_s``
of each run) beside the proxy's cores, so a run whose proxy is not using its cores while the
client is shows as client-bound. The client does not verify the server's chain (h2load and
wrk do not either); it presents its certificate, which both proxies verify.

Any error (a refused or reset connection, a TLS failure, a status other than 200, a body of
the wrong length) fails the run (`MtlsBenchError`), never a row with a count in it.
"""

from __future__ import annotations

import argparse
import array
import base64
import ctypes
import errno
import json
import multiprocessing
import os
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "scripts" / "bench_nginx"

MTLS_PROTOCOLS = ("mtls", "mtls-hs")
KEEPALIVE, HANDSHAKE = MTLS_PROTOCOLS
HANDSHAKE_REFERENCE = "nginx-w1"  # the reference of the mtls-hs case: nginx, 1 worker
HOST = "mtls.bench"  # the Host header that selects weft's mTLS route
TRUST_DOMAIN = "example.org"
WEFT_ID = f"spiffe://{TRUST_DOMAIN}/weft"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/bench"
# One process per core of the 2-core machine this was written for; 64 connections as wrk's
# -c64, so keep-alive mtls rows and h1 rows differ by TLS only.
LOAD_PROCESSES = 2
LOAD_CONNECTIONS = 64
LOAD_ARGS = f"{LOAD_PROCESSES} processes, {LOAD_CONNECTIONS} connections"
LOAD_GRACE_S = 30.0  # the load generator gets its duration plus this before it is killed
# weft must have its SVID within this; below [server] boot_timeout (30 s by default), as the
# config demands, and far above the agent's answer on loopback (milliseconds).
FIRST_FETCH_TIMEOUT = "10s"

# Appended to weft's bench config when an mtls case runs: the mTLS listener, its route (by
# host, so the plain route stays open) and where the SVID comes from.
WEFT_MTLS_CONFIG = """
[spiffe]
endpoint = "{endpoint}"
first_fetch_timeout = "{first_fetch_timeout}"

[[listeners]]
address = "127.0.0.1"
port = {port}

[listeners.tls]
spiffe = true
client_auth = "required"

[[routes]]
name = "bench-mtls"
host = "{host}"
path_prefix = "/"
destination = "bench"

[[routes.authorize]]
allow_ids = ["{client_id}"]
"""


class MtlsBenchError(Exception):
    """A failure of an mtls case the user should read (the driver reports it like its own)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Identity:
    """The trust domain's files (PEM, in the bench's temp dir) and the agent serving weft's
    SVID. `close` stops the agent (its subprocess and socket directory)."""

    cert: Path  # weft's SVID chain: nginx serves the same certificate
    key: Path
    bundle: Path  # the trust domain's CA
    client_cert: Path  # the load generator's SVID, chain and key in one file
    agent: Any  # tests/support/workload_api_server.WorkloadAPIServer

    @property
    def endpoint(self) -> str:
        return str(self.agent.uri)

    def close(self) -> None:
        self.agent.close()


def start_identity(directory: Path) -> Identity:
    """Make the trust domain and both SVIDs, write the PEM files in `directory`, start the
    Workload API agent and give it weft's SVID. MtlsBenchError if grpcio or spiffe is
    missing or the agent does not start."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from support.spiffe_certs import TrustDomain
        from support.workload_api_server import WorkloadAPIServer
    except ImportError as exc:
        raise MtlsBenchError(f"the mtls cases need weft's test extras ({exc})") from exc
    finally:
        sys.path.remove(str(ROOT / "tests"))
    td = TrustDomain(TRUST_DOMAIN)
    weft, client = td.svid("/weft"), td.svid("/bench")
    files = {
        "mtls-cert.pem": weft.chain_pem,
        "mtls-key.pem": weft.key_pem,
        "mtls-bundle.pem": td.ca_pem,
        "mtls-client.pem": client.chain_pem + client.key_pem,
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    # nginx's master reads these as the user that starts it, before its workers drop to nobody.
    (directory / "mtls-key.pem").chmod(0o600)
    (directory / "mtls-client.pem").chmod(0o600)
    try:
        agent = WorkloadAPIServer()
    except (OSError, RuntimeError, TimeoutError) as exc:
        raise MtlsBenchError(f"the Workload API agent did not start: {exc}") from exc
    try:
        svid = {
            "spiffe_id": WEFT_ID,
            "x509_svid": _b64(b"".join(weft.chain_der)),
            "x509_svid_key": _b64(weft.key_der),
            "bundle": _b64(td.ca_der),
        }
        agent.command_sync("x509", svids=[svid])
    except BaseException:
        agent.close()
        raise
    return Identity(
        cert=directory / "mtls-cert.pem",
        key=directory / "mtls-key.pem",
        bundle=directory / "mtls-bundle.pem",
        client_cert=directory / "mtls-client.pem",
        agent=agent,
    )


def nginx_server(port: int, identity: Identity) -> str:
    """nginx's mTLS server block (mtls_server.conf), for proxy.conf's @MTLS_SERVER@."""
    text = (TEMPLATES / "mtls_server.conf").read_text()
    values = {
        "MTLS_PORT": str(port),
        "CERT": str(identity.cert),
        "KEY": str(identity.key),
        "BUNDLE": str(identity.bundle),
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def weft_config(port: int, identity: Identity) -> str:
    """What weft's bench config gets for the mtls cases (appended after its plain route)."""
    return WEFT_MTLS_CONFIG.format(
        endpoint=identity.endpoint,
        first_fetch_timeout=FIRST_FETCH_TIMEOUT,
        port=port,
        host=HOST,
        client_id=CLIENT_ID,
    )


def check_baseline(tree: Path, rev: str) -> None:
    """Refuse a --baseline revision that has no SPIFFE listener."""
    if not (tree / "weft" / "svid.py").exists():
        raise MtlsBenchError(
            f"--baseline {rev} has no SPIFFE support (weft/svid.py): drop mtls and mtls-hs "
            "from --protocols, or pick a later revision"
        )


def client_context(cert: str | None) -> ssl.SSLContext:
    """The load generator's context: TLS 1.3, HTTP/1.1 by ALPN, `cert` (chain and key in one
    PEM file) presented when given, the server's chain not verified, no session resumed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_TICKET
    if cert is not None:
        ctx.load_cert_chain(cert)
    return ctx


def request(path: str, close: bool) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET /{path} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n".encode()


# -- checks, and one run as the driver sees it --------------------------------------------------


def _get_once(port: int, ctx: ssl.SSLContext, path: str) -> tuple[int, int, bool]:
    """(status, body length, whether a session ticket came) of one request on a new
    connection; OSError (ssl.SSLError included) if the proxy refused it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as raw:
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(request(path, close=True))
            data = bytearray()
            while chunk := tls.recv(65536):
                data += chunk
                status, length, done = _parse(data)
                if done:
                    break
            else:
                raise ConnectionError(f"connection closed after {len(data)} bytes")
            session = tls.session
            return status, length, bool(session is not None and session.has_ticket)


def verify(name: str, port: int, identity: Identity, sizes: dict[str, int]) -> None:
    """Through `port`: each body comes back whole to the client's SVID, with no session ticket
    (every handshake of the mtls-hs case is a full one), and a client without a certificate is
    refused (no connection or no 200). MtlsBenchError otherwise."""
    with_cert = client_context(str(identity.client_cert))
    for size, length in sizes.items():
        try:
            status, got, ticket = _get_once(port, with_cert, size)
        except OSError as exc:
            raise MtlsBenchError(f"{name}: GET /{size} over mTLS on port {port}: {exc}") from exc
        if status != 200 or got != length:
            raise MtlsBenchError(
                f"{name}: GET /{size} over mTLS gave status {status} and {got} bytes, "
                f"expected 200 and {length}; its log is in .bench/logs/"
            )
        if ticket:
            raise MtlsBenchError(f"{name}: sent a TLS session ticket on port {port}")
    # weft ends the connection; nginx completes it and answers 400 ("No required SSL
    # certificate was sent").
    try:
        status, _, _ = _get_once(port, client_context(None), next(iter(sizes)))
    except OSError:
        return
    if status == 200:
        raise MtlsBenchError(f"{name}: a client without a certificate got status {status}")


def run_load(
    mode: str,
    port: int,
    path: str,
    length: int,
    duration: int,
    identity: Identity,
    raw_log: TextIO,
) -> dict[str, Any]:
    """One timed run of the load generator (`mode`: KEEPALIVE or HANDSHAKE) against
    127.0.0.1:`port`, GET /`path` of `length` bytes; its numbers in the shape of the driver's
    WRK_JSON, or MtlsBenchError if any request failed."""
    argv = [
        sys.executable, __file__, "load", "--port", str(port), "--path", path,
        "--expected", str(length), "--duration", str(duration),
        "--cert", str(identity.client_cert),
        "--processes", str(LOAD_PROCESSES), "--connections", str(LOAD_CONNECTIONS),
    ]  # fmt: skip
    if mode == HANDSHAKE:
        argv.append("--new-connections")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + LOAD_GRACE_S)
    except subprocess.TimeoutExpired as exc:
        limit = duration + LOAD_GRACE_S
        raise MtlsBenchError(f"the mTLS load did not finish within {limit:.0f} s") from exc
    raw_log.write(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}\n")
    raw_log.flush()
    if done.returncode != 0:
        raise MtlsBenchError(f"the mTLS load failed (status {done.returncode}):\n{done.stderr}")
    result = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    bad = {k: result[k] for k in ("connect", "read", "write", "status", "timeout") if result[k]}
    if bad:
        raise MtlsBenchError(
            f"mTLS load on port {port}: {result['requests']} requests, errors {bad} "
            f"(first: {result['first_error']}); the proxy's log is in .bench/logs/"
        )
    return result


# -- the load generator (this file run as a script) -------------------------------------------


def _parse(data: bytearray) -> tuple[int, int, bool]:
    """(status, body bytes so far, complete) of one response in `data`; the body length is
    its Content-Length (both proxies send one for these bodies). ValueError if malformed."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return 0, 0, False
    head = bytes(data[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            have = len(data) - end - 4
            return status, have, have >= int(value)
    raise ValueError(f"a response without Content-Length: {head[0]!r}")


class _Conn:
    """One client connection of a load process: connects (new-connection mode), handshakes,
    sends a GET, reads its response, and goes again."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.sock: ssl.SSLSocket | socket.socket | None = None
        self.buf = bytearray()
        self.started = 0.0
        self.state = "idle"

    # keep-alive mode: a blocking connect and handshake before the timed window
    def open_blocking(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.load.port), timeout=10.0)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.load.ctx.wrap_socket(raw)
        tls.setblocking(False)
        self.sock = tls
        self.load.sel.register(tls, selectors.EVENT_READ, self)

    # new-connection mode: a non-blocking connect, then the handshake in the loop
    def connect(self) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.started = time.monotonic()
        code = raw.connect_ex(("127.0.0.1", self.load.port))
        if code not in (0, errno.EINPROGRESS):
            raw.close()
            raise OSError(code, os.strerror(code))
        self.sock = raw
        self.state = "connecting"
        self.load.sel.register(raw, selectors.EVENT_WRITE, self)

    def send(self) -> None:
        assert isinstance(self.sock, ssl.SSLSocket)
        if self.state != "handshaken":  # keep-alive: the latency starts at the request
            self.started = time.monotonic()
        self.buf.clear()
        # A few dozen bytes into an empty socket buffer: a non-blocking send takes them all.
        self.sock.send(self.load.request)
        self.state = "reading"
        self.load.sel.modify(self.sock, selectors.EVENT_READ, self)

    def step(self) -> None:
        """Advance on a readiness event. OSError/ValueError on a failure."""
        if self.state == "connecting":
            assert self.sock is not None
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            self.load.sel.unregister(self.sock)
            self.sock = self.load.ctx.wrap_socket(self.sock, do_handshake_on_connect=False)
            self.load.sel.register(self.sock, selectors.EVENT_WRITE, self)
            self.state = "handshake"
        if self.state == "handshake":
            assert isinstance(self.sock, ssl.SSLSocket)
            try:
                self.sock.do_handshake()
            except ssl.SSLWantReadError:
                self.load.sel.modify(self.sock, selectors.EVENT_READ, self)
                return
            except ssl.SSLWantWriteError:
                self.load.sel.modify(self.sock, selectors.EVENT_WRITE, self)
                return
            self.state = "handshaken"
            self.send()
            return
        assert isinstance(self.sock, ssl.SSLSocket)
        while True:
            try:
                chunk = self.sock.recv(262144)
            except ssl.SSLWantReadError:
                return
            if not chunk:
                raise ConnectionError("the proxy closed the connection mid-response")
            self.buf += chunk
            status, length, done = _parse(self.buf)
            if done:
                self.load.record(self, status, length)
                return

    def close(self) -> None:
        if self.sock is not None:
            self.load.sel.unregister(self.sock)
            self.sock.close()
            self.sock = None


class _Load:
    """One load process's share of the connections and its counts."""

    def __init__(self, args: argparse.Namespace, connections: int) -> None:
        self.port = args.port
        self.expected = args.expected
        self.new_connections = args.new_connections
        self.request = request(args.path, close=args.new_connections)
        self.ctx = client_context(args.cert)
        self.sel = selectors.DefaultSelector()
        self.conns = [_Conn(self) for _ in range(connections)]
        self.latencies = array.array("d")
        self.bytes = 0
        self.errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
        self.first_error = ""
        self.timing = False

    def record(self, conn: _Conn, status: int, length: int) -> None:
        if self.timing:
            if status != 200 or length != self.expected:
                self.errors["status"] += 1
                self.first_error = self.first_error or f"status {status}, {length} bytes"
            else:
                self.latencies.append(time.monotonic() - conn.started)
                self.bytes += len(conn.buf)
        if self.new_connections:
            conn.close()
            conn.connect()
        else:
            conn.send()

    def fail(self, conn: _Conn, kind: str, exc: BaseException) -> None:
        self.errors[kind] += 1
        self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
        conn.close()
        if self.new_connections:
            conn.connect()
        else:
            conn.open_blocking()
            conn.send()

    def run(self, barrier: Any, duration: float) -> dict[str, Any]:
        if not self.new_connections:
            for conn in self.conns:
                conn.open_blocking()
        barrier.wait()
        self.timing = True
        start = time.monotonic()
        end = start + duration
        for conn in self.conns:
            if self.new_connections:
                conn.connect()
            else:
                conn.send()
        while (now := time.monotonic()) < end:
            for key, _ in self.sel.select(end - now):
                conn = key.data
                kind = "connect" if conn.state in ("connecting", "handshake") else "read"
                try:
                    conn.step()
                except (OSError, ValueError) as exc:
                    self.fail(conn, kind, exc)
        elapsed = time.monotonic() - start
        self.timing = False
        for conn in self.conns:
            conn.close()
        return {
            "latencies": self.latencies.tobytes(),
            "bytes": self.bytes,
            "errors": self.errors,
            "first_error": self.first_error,
            "elapsed": elapsed,
        }


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _process(args: argparse.Namespace, connections: int, barrier: Any, out: Any) -> None:
    # When the driver kills the load generator (a timeout, Ctrl-C), its processes go with it
    # instead of loading the proxy until their duration ends.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        out.put(_Load(args, connections).run(barrier, args.duration))
    except BaseException as exc:
        barrier.abort()
        out.put({"crash": f"{type(exc).__name__}: {exc}"})


def load_main(args: argparse.Namespace) -> int:
    """Run the load, print one JSON line with the numbers (the driver's WRK_JSON keys)."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(args.processes + 1, timeout=30.0)
    out = ctx.Queue()
    shares = [args.connections // args.processes] * args.processes
    shares[0] += args.connections - sum(shares)
    procs = [ctx.Process(target=_process, args=(args, n, barrier, out)) for n in shares]
    for proc in procs:
        proc.start()
    try:
        barrier.wait()
    except multiprocessing.BrokenBarrierError:
        pass  # a process failed to connect: its report says why
    results = [out.get(timeout=args.duration + 20.0) for _ in procs]
    for proc in procs:
        proc.join(10.0)
    crashes = [r["crash"] for r in results if "crash" in r]
    if crashes:
        print(f"load process failed: {crashes[0]}", file=sys.stderr)
        return 1
    latencies = array.array("d")
    for r in results:
        latencies.frombytes(r["latencies"])
    ordered = sorted(latencies)
    errors = {k: sum(r["errors"][k] for r in results) for k in results[0]["errors"]}

    def pct(p: float) -> int:
        return int(ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1e6) if ordered else 0

    print(
        json.dumps(
            {
                "requests": len(ordered),
                "duration_us": int(max(r["elapsed"] for r in results) * 1e6),
                "bytes": sum(r["bytes"] for r in results),
                **errors,
                "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
                "p50_us": pct(0.5),
                "p90_us": pct(0.9),
                "p99_us": pct(0.99),
                "mean_us": round(sum(ordered) / len(ordered) * 1e6, 1) if ordered else 0.0,
                "max_us": int(ordered[-1] * 1e6) if ordered else 0,
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_mtls.py", description="scripts/bench's mTLS load generator"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="a timed HTTP/1.1-over-mTLS load on 127.0.0.1")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--path", default="1k", help="the path, without its leading /")
    load.add_argument("--expected", type=int, default=1024, help="the body length expected")
    load.add_argument("--duration", type=float, default=5.0, help="seconds")
    load.add_argument("--cert", required=True, help="the client's chain and key, PEM")
    load.add_argument("--processes", type=int, default=LOAD_PROCESSES)
    load.add_argument("--connections", type=int, default=LOAD_CONNECTIONS)
    load.add_argument(
        "--new-connections",
        action="store_true",
        help="one request per connection (a full handshake each) instead of keep-alive",
    )
    args = parser.parse_args(argv)
    if args.connections < args.processes:
        parser.error("--connections must be at least --processes")
    return load_main(args)


if __name__ == "__main__":
    sys.exit(main())
