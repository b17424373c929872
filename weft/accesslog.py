"""The access log: one JSON object per line for every request, written off the request path.

Each finished exchange appends one line to an in-memory list; a background task writes the list
out every `FLUSH_INTERVAL` or as soon as it holds `FLUSH_BYTES`. A write per request would cost a
system call on the hot path (measured: a third of the per-request time at 1 KiB bodies with
line-buffered stdout); a fifth of a second is as fresh as a tail needs. The last lines are
flushed when the worker stops.

Fields: time (RFC 3339, UTC, milliseconds), request_id, client, principal, method, target,
version, status, bytes_in, bytes_out, duration_ms, route, endpoint, upstream_ms, attempts (tries
sent, 1 without [routes.retry]), error (reason word or null), grpc_status (or null).

``principal`` is the SPIFFE ID the request came with (``request.ctx["principal"]``: the client's
verified X.509-SVID, or the subject of a JWT-SVID that ``[routes.jwt_svid]`` accepted), in its
canonical ``spiffe://`` form; null without one. An ID is at most 2048 bytes of a restricted
character set (`weft.spiffe_id`): bounded, and JSON needs no escape for it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO

import trio

from weft.http.messages import Request, Response

FLUSH_INTERVAL = 0.2  # seconds
FLUSH_BYTES = 64 * 1024


class AccessLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._lines: list[str] = []
        self._size = 0
        self._wakeup = trio.Event()

    def open(self) -> None:
        if self.path == "-":
            self._file = sys.stdout
        else:
            self._file = open(self.path, "a", encoding="utf-8")

    def record(
        self,
        request: Request | None,
        response: Response,
        error: str | None,
        client: tuple[str, int],
        duration: float,
    ) -> None:
        ctx = request.ctx if request is not None else {}
        route = request.route.name if request is not None and request.route is not None else None
        up = ctx.get("upstream_time")
        principal = ctx.get("principal")
        body_in = getattr(request.body, "received", 0) if request is not None else 0
        line = json.dumps(
            {
                "time": _rfc3339(time.time()),
                "request_id": request.id if request is not None else None,
                "client": f"{client[0]}:{client[1]}",
                "principal": str(principal) if principal is not None else None,
                "method": request.method if request is not None else None,
                "target": request.target if request is not None else None,
                "version": request.http_version if request is not None else None,
                "status": response.status,
                "bytes_in": body_in,
                "bytes_out": response.bytes_out,
                "duration_ms": round(duration * 1000, 3),
                "route": route,
                "endpoint": ctx.get("endpoint"),
                "upstream_ms": round(up * 1000, 3) if up is not None else None,
                # tries sent by [routes.retry] (1 without it, None before routing)
                "attempts": ctx.get("attempts", 1) if route is not None else None,
                "error": error,
                # the gRPC status weft answered with itself (weft.grpc.local_reply), else None;
                # "status" stays the HTTP status weft meant (503, 429, 504)
                "grpc_status": ctx.get("grpc_status"),
            },
            separators=(",", ":"),
        )
        self._lines.append(line)
        self._size += len(line) + 1
        if self._size >= FLUSH_BYTES:
            self._wakeup.set()

    def flush(self) -> None:
        if not self._lines or self._file is None:
            return
        lines, self._lines, self._size = self._lines, [], 0
        try:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk must not take the proxy down
            print(f"weft: access log write failed: {e}", file=sys.stderr)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                with trio.move_on_after(FLUSH_INTERVAL):
                    await self._wakeup.wait()
                self._wakeup = trio.Event()
                self.flush()
        finally:
            self.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None


def _rfc3339(t: float) -> str:
    secs = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{int((t - secs) * 1000):03d}Z"
