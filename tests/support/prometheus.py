"""The metrics side of end-to-end tests: the admin listener as a client sees it, the exposition
parsed into numbers, promtool, and a real Prometheus server.

* `admin_get` is one request to the admin listener, on a fresh connection.
* `parse` turns Prometheus text into samples (prometheus_client's own parser, so a line it
  cannot read fails the test); `total` sums the samples of a name that carry given labels.
* `promtool` / `prometheus` are the binaries of Debian's ``prometheus`` package, which
  scripts/test unpacks (``apt-get download`` + ``dpkg -x``, so its service never starts) and
  names in ``$WEFT_PROMETHEUS_BIN_DIR``. A test that needs one fails when it is missing under
  CI (``CI=true``), and is skipped otherwise.
* `PrometheusServer` runs ``prometheus`` on 127.0.0.1 with a temporary config and storage
  directory, scraping one target every `SCRAPE_INTERVAL`; it is stopped (SIGTERM, then
  SIGKILL) on exit, and every wait on it is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .procs import free_port, wait_for

ENV_BIN_DIR = "WEFT_PROMETHEUS_BIN_DIR"
SCRAPE_INTERVAL = "1s"
# Prometheus 2.42 starts (TSDB, rule manager, web) in well under a second on this machine;
# ten is the point where something is wrong.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


# -- the admin listener ---------------------------------------------------------------------------


@dataclass
class AdminResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def admin_get(port: int, path: str, *, token: str | None = None, host: str = "127.0.0.1",
              timeout: float = 10.0) -> AdminResponse:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Connection": "close"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return AdminResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                             resp.read())
    finally:
        conn.close()


def admin_answers(port: int, path: str = "/healthz", **kwargs: Any) -> AdminResponse | None:
    """The response, or None while nothing answers (for `wait_for`)."""
    try:
        return admin_get(port, path, timeout=2.0, **kwargs)
    except OSError:
        return None


# -- the exposition -------------------------------------------------------------------------------

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(value for n, lab, value in samples
               if n == name and all(lab.get(k) == v for k, v in labels.items()))


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    """Sums of `name` grouped by the value of `label` (among samples matching `labels`)."""
    out: dict[str, float] = {}
    for n, lab, value in samples:
        if n == name and all(lab.get(k) == v for k, v in labels.items()):
            out[lab.get(label, "")] = out.get(lab.get(label, ""), 0.0) + value
    return out


# -- Debian's prometheus binaries -----------------------------------------------------------------


def binary(name: str) -> Path:
    """The path of `name` (promtool, prometheus) from ``$WEFT_PROMETHEUS_BIN_DIR``; fails
    under CI, skips elsewhere, when it is not there."""
    directory = os.environ.get(ENV_BIN_DIR)
    path = Path(directory) / name if directory else None
    if path is not None and os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if found:
        return Path(found)
    why = (f"{name} not found (${ENV_BIN_DIR}={directory!r}); scripts/test unpacks Debian's "
           "prometheus package and sets it")
    if os.environ.get("CI") == "true":
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` on `text` (its stdin)."""
    return subprocess.run([str(binary("promtool")), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=30)


class PrometheusServer:
    """A Prometheus server scraping ``127.0.0.1:<target_port>`` (job "weft")."""

    def __init__(self, workdir: Path, target_port: int, *, token: str | None = None,
                 metrics_path: str = "/metrics") -> None:
        self.dir = workdir / "prometheus"
        self.dir.mkdir()
        self.port = free_port()
        job: dict[str, Any] = {
            "job_name": "weft",
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "metrics_path": metrics_path,
            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
        }
        if token is not None:
            job["authorization"] = {"type": "Bearer", "credentials": token}
        # JSON is YAML: no YAML library needed.
        (self.dir / "prometheus.yml").write_text(json.dumps({"scrape_configs": [job]}))
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrometheusServer:
        argv = [
            str(binary("prometheus")),
            f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         cwd=self.dir, start_new_session=True)
        try:
            wait_for(self._ready, START_TIMEOUT, "prometheus to be ready")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.log()}")
        try:
            return self._get("/-/ready")[0] == 200
        except OSError:
            return False

    def _get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5.0)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def api(self, path: str, **params: str) -> Any:
        status, body = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        data = json.loads(body)
        assert status == 200 and data.get("status") == "success", (status, data)
        return data["data"]

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        return list(self.api("query", query=expr)["result"])

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None


def send(port: int, method: str, path: str, body: bytes | None = None) -> int:
    """One request to weft on a fresh connection (SO_REUSEPORT spreads those over the
    workers); returns the status once the whole response was read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def scrape(admin_port: int, path: str = "/metrics", token: str | None = None) -> Samples:
    resp = admin_get(admin_port, path, token=token)
    assert resp.status == 200, (resp.status, resp.text)
    return parse(resp.text)


def wait_total(admin_port: int, expected: float, token: str | None = None) -> Samples:
    """The aggregate once it counts `expected` requests (bounded). A worker counts an exchange
    right after its last byte went out, so a client can be a moment ahead of it."""
    last: list[float] = []

    def counted() -> Samples | None:
        samples = scrape(admin_port, token=token)
        last[:] = [total(samples, "weft_requests_total")]
        return samples if last[0] == expected else None

    try:
        return wait_for(counted, 5.0, f"the aggregate to count {expected} requests")
    except AssertionError as e:
        raise AssertionError(f"{e}; it counts {last}") from None
