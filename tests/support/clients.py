"""Client-side helpers for end-to-end tests: curl, concurrent requests, RSS sampling.

Everything is bounded: curl runs with ``--max-time``, threads are joined with a deadline.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .rawhttp import RawResponse, parse_response

T = TypeVar("T")

CURL = "/usr/bin/curl"


@dataclass
class CurlResult:
    returncode: int
    stderr: str
    responses: list[RawResponse]  # every head curl received (1xx included), the last is final
    body: bytes

    @property
    def status(self) -> int:
        return self.responses[-1].status if self.responses else 0

    def header(self, name: str) -> str | None:
        return self.responses[-1].header(name) if self.responses else None


def curl(url: str, *args: str, timeout: float = 10.0) -> CurlResult:
    """Run curl on ``url`` with extra ``args``; heads and the (decoded) body are returned apart."""
    with tempfile.TemporaryDirectory(prefix="weft-curl-") as d:
        heads = Path(d) / "heads"
        body = Path(d) / "body"
        proc = subprocess.run(
            [CURL, "-sS", "--max-time", str(timeout), "-D", str(heads), "-o", str(body),
             *args, url],
            capture_output=True, text=True, timeout=timeout + 5, stdin=subprocess.DEVNULL,
        )
        raw = heads.read_bytes() if heads.exists() else b""
        responses = []
        while raw.strip():
            resp, used = parse_response(raw, head_request=True)
            responses.append(resp)
            raw = raw[used:]
        return CurlResult(proc.returncode, proc.stderr, responses,
                          body.read_bytes() if body.exists() else b"")


def run_concurrently(calls: list[Callable[[], T]], timeout: float = 30.0,
                     stagger: float = 0.0) -> list[T]:
    """Run each call in its own thread; return results in order. Raises the first exception,
    or TimeoutError if they are not all done within ``timeout`` seconds."""
    pool = ThreadPoolExecutor(max_workers=len(calls))
    try:
        futures: list[Future[T]] = []
        for call in calls:
            futures.append(pool.submit(call))
            if stagger:
                time.sleep(stagger)
        deadline = time.monotonic() + timeout
        return [f.result(timeout=max(0.0, deadline - time.monotonic())) for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class RssSampler:
    """Samples a value (weft's summed RSS) every ``interval`` seconds in a thread."""

    read: Callable[[], int]
    interval: float = 0.02
    samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.read())
            self._stop.wait(self.interval)

    @property
    def peak(self) -> int:
        return max(self.samples) if self.samples else 0


MiB = 1024 * 1024
