"""The HTTP/2 cases of scripts/bench: h2c (cleartext, prior knowledge) and h2 over TLS (ALPN),
driven by h2load, against the same proxies and upstream as the h1 cases of bench_driver.py.

What this module owns: the listeners each proxy gets for HTTP/2 (the nginx ``listen`` lines,
weft's TLS listener, the self-signed certificate both serve), the check that a proxy answers
h2 at all, and one h2load run parsed into the numbers bench_driver.py records for a wrk run.
The driver keeps everything else (processes, rounds, order reversal, CPU accounting, summary).

**Listeners.** nginx 1.22 cannot serve h1 and prior-knowledge h2c on one cleartext port, so its
one ``server`` block gets two more ``listen`` lines (``http2`` cleartext, and ``ssl http2``),
same ``location``, same pooled upstream. weft serves h2c on its h1 port (the dispatcher tells
the preface from an h1 request line), and gets a second listener with ``[listeners.tls]``
when h2-over-TLS is benchmarked. The certificate is made with the ``openssl`` command (the
bench's venv has no ``cryptography``), EC P-256, valid for two days; h2load does not verify it.

**h2load parameters**: ``-t 2 -c 64 -m 10 -D <duration>``:

* ``-c 64``, two threads: the same connections and client threads as the wrk cases, so the
  h1 and h2 rows differ by protocol only, and h2load (the heavier client per request) takes
  at most the cores wrk takes;
* ``-m 10``: ten concurrent streams per connection, 640 in flight. One stream per connection
  would be h1 over h2 framing and measure none of what multiplexing costs or saves; 10 keeps
  every weft stream under its ``max_concurrent_streams`` (128) and nginx's (128), and is the
  figure the issue asked for. More in flight only lengthens queues on a 2-core machine;
* ``-D``: a timed run, like wrk's ``-d``. A warm-up is a separate run (as for wrk) rather than
  h2load's ``--warm-up-time``, so that the proxy's CPU measured over the run belongs to the
  requests counted in it.

h2load prints no latency percentiles (only min/max/mean of "time for request"): the p50/p99
columns of h2 rows are empty, and the mean is recorded. Any request h2load counts as failed,
errored or timed out, any non-2xx status, or a body of the wrong size makes the run fail
(`H2BenchError`), never a row with a count in it.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

PROTOCOLS = ("h1", "h2c", "h2tls")
H2_PROTOCOLS = ("h2c", "h2tls")
H2LOAD_THREADS = 2
H2LOAD_CONNECTIONS = 64
H2LOAD_STREAMS = 10
H2LOAD_ARGS = f"-t{H2LOAD_THREADS} -c{H2LOAD_CONNECTIONS} -m{H2LOAD_STREAMS}"
H2LOAD_GRACE_S = 30.0  # h2load gets its duration plus this before it is killed

# Replaces @H2_LISTEN@ in scripts/bench_nginx/proxy.conf when an h2 case runs (else "").
NGINX_H2_LISTEN = """\
listen 127.0.0.1:{h2c_port} http2 backlog=4096;
        listen 127.0.0.1:{tls_port} ssl http2 backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};"""

# Appended to weft's bench config when h2 over TLS runs.
WEFT_TLS_LISTENER = """
[[listeners]]
address = "127.0.0.1"
port = {tls_port}

[listeners.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
"""


class H2BenchError(Exception):
    """A failure of an h2 case the user should read (the driver reports it like its own)."""


def parse_protocols(text: str, known: Sequence[str] = PROTOCOLS) -> list[str]:
    """``h1,h2c,h2tls`` -> the list, in `known`'s order (the driver adds the mtls cases);
    ValueError for an unknown name."""
    names = {p.strip() for p in text.split(",") if p.strip()}
    unknown = names - set(known)
    if unknown or not names:
        raise ValueError(f"--protocols takes names from {', '.join(known)}: {text!r}")
    return [p for p in known if p in names]


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed EC certificate for 127.0.0.1 and its key, written in `directory`."""
    cert, key = directory / "bench-cert.pem", directory / "bench-key.pem"
    argv = [
        "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise H2BenchError(f"openssl could not make the bench certificate:\n{done.stderr}")
    key.chmod(0o644)  # nginx reads it as root before dropping to nobody; weft as this user
    return cert, key


def check_baseline(tree: Path, rev: str) -> None:
    """Refuse a --baseline revision that has no HTTP/2 server."""
    if not (tree / "weft" / "http" / "h2_server.py").exists():
        raise H2BenchError(
            f"--baseline {rev} has no HTTP/2 server (weft/http/h2_server.py): drop h2c and "
            "h2tls from --protocols, or pick a later revision"
        )


def url(protocol: str, ports: dict[str, int], path: str) -> str:
    scheme = "https" if protocol == "h2tls" else "http"
    return f"{scheme}://127.0.0.1:{ports[protocol]}/{path}"


# "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout"
_REQUESTS = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, "
    r"(?P<timeout>\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_DATA = re.compile(r"traffic: .* total, .* headers .*, .*\((\d+)\) data")
_TIME = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)")
_PROTOCOL = re.compile(r"^Application protocol: (\S+)$", re.MULTILINE)


def _us(text: str) -> float:
    """h2load's durations ("339us", "51.26ms", "1.2s") in microseconds."""
    for unit, scale in (("us", 1.0), ("ms", 1e3), ("s", 1e6)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(text)


def parse(out: str) -> dict[str, Any]:
    """The numbers of one h2load run (h2load 1.52's summary), in the shape of the driver's
    WRK_JSON; H2BenchError if a line is missing."""
    req, status = _REQUESTS.search(out), _STATUS.search(out)
    finished, data, timing = _FINISHED.search(out), _DATA.search(out), _TIME.search(out)
    if req is None or status is None or finished is None or data is None or timing is None:
        raise H2BenchError(f"h2load's summary lacks a line this parses:\n{out}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    codes = [int(c) for c in status.groups()]
    return {
        "requests": int(req["succeeded"]),
        "duration_us": int(seconds * 1e6),
        "bytes": int(data.group(1)),
        "total": int(req["total"]),
        "done": int(req["done"]),
        "failed": int(req["failed"]),
        "errored": int(req["errored"]),
        "timeout": int(req["timeout"]),
        "non_2xx": sum(codes[1:]),
        "protocol": protocol.group(1) if (protocol := _PROTOCOL.search(out)) else None,
        "p50_us": None,
        "p90_us": None,
        "p99_us": None,
        "mean_us": _us(timing.group(3)),
        "max_us": _us(timing.group(2)),
    }


def _run(argv: list[str], timeout: float, raw_log: TextIO) -> dict[str, Any]:
    """h2load `argv`, checked: every request succeeded, over HTTP/2 (h2load falls back to
    HTTP/1.1 when TLS's ALPN picks it, which would be an h1 run under an h2 name)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise H2BenchError(f"h2load did not finish within {timeout:.0f} s") from exc
    raw_log.write(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}\n")
    raw_log.flush()
    if done.returncode != 0:
        raise H2BenchError(f"h2load failed (status {done.returncode}):\n{done.stdout}{done.stderr}")
    result = parse(done.stdout)
    expected = "h2" if argv[-1].startswith("https:") else "h2c"
    if result["protocol"] != expected:
        raise H2BenchError(
            f"h2load did not speak {expected} with {argv[-1]} (it reports "
            f"{result['protocol'] or 'no connection made'}):\n{done.stdout}"
        )
    bad = {k: result[k] for k in ("failed", "errored", "timeout", "non_2xx") if result[k]}
    if bad or result["requests"] != result["done"]:
        raise H2BenchError(
            f"h2load: {result['done']} requests done, {result['requests']} succeeded, {bad} "
            f"({' '.join(argv)}); the proxy's log is in .bench/logs/"
        )
    return result


def run_h2load(target_url: str, duration: int, raw_log: TextIO) -> dict[str, Any]:
    """One timed h2load run (see the module docstring for the parameters); its numbers, or
    H2BenchError if any request failed."""
    argv = ["h2load", *H2LOAD_ARGS.split(), f"-D{duration}", target_url]
    return _run(argv, duration + H2LOAD_GRACE_S, raw_log)


def verify(name: str, target_url: str, length: int, raw_log: TextIO) -> None:
    """A few requests over h2 come back 200 with bodies of `length` bytes."""
    n = 4
    try:
        result = _run(["h2load", "-n", str(n), "-c", "1", target_url], H2LOAD_GRACE_S, raw_log)
    except H2BenchError as exc:
        raise H2BenchError(f"{name}: {target_url} over h2: {exc}") from exc
    if result["requests"] != n or result["bytes"] != n * length:
        raise H2BenchError(
            f"{name}: {n} requests of {target_url} over h2 gave {result['requests']} "
            f"responses and {result['bytes']} body bytes, expected {n} and {n * length}"
        )
