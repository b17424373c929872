"""A real gRPC SPIFFE Workload API server for the tests: grpcio, in a subprocess.

The server (this file run as a script) serves the official ``SpiffeWorkloadAPI`` service
(``spiffe._proto.workload_pb2_grpc``) on a unix socket, and does what a SPIRE agent does that
weft depends on: it rejects a call without ``workload.spiffe.io: true`` with INVALID_ARGUMENT,
streams the whole X.509 and JWT-bundle state at once and again on every change, and answers
PERMISSION_DENIED "no identity issued" when it has nothing for the caller. It runs in a
process of its own so that grpcio (threads, global state) never lives in a process that forks
or that runs the client under test.

The test drives it with `WorkloadAPIServer` over the subprocess's stdin/stdout, one JSON
command a line and one JSON reply a line (each awaited for at most `REPLY_TIMEOUT`):

==================  ===============================================================
``x509``            set the SVIDs (`wapi_certs.Svid.as_json`) and federated bundles;
                    every open FetchX509SVID stream gets the new state (a rotation)
``jwt``             set the JWT bundles (trust domain -> JWKS) and the JWT-SVID to answer
``mode``            ``serve``, ``deny`` (PERMISSION_DENIED "no identity issued"),
                    ``invalid`` (INVALID_ARGUMENT), ``unavailable``
``break``           end every open stream now with a status (default UNAVAILABLE)
``restart``         stop the gRPC server at once (connections cut) and start a new one
                    on the same socket
``stop``/``start``  no agent at all (socket removed) / an agent again
``log``             the calls received: method, whether the header was right, time
==================  ===============================================================
"""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

REPLY_TIMEOUT = 10.0  # seconds for one command's reply (a restart waits for grpcio's stop)
START_TIMEOUT = 20.0  # seconds for the subprocess to import grpcio and listen


class WorkloadAPIServer:
    """The test's handle on the server subprocess. Use as a context manager (sync) or call
    `close`; the socket lives in a short temp dir (unix socket paths hold 107 bytes)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="wapi-", dir="/tmp"))
        self.socket = self.dir / "agent.sock"
        self.uri = f"unix://{self.socket}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.socket)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            port = self._reply(START_TIMEOUT)["tcp_port"]  # "listening"
            self.tcp_uri = f"tcp://127.0.0.1:{port}"  # the same agent on loopback TCP
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkloadAPIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the subprocess (TERM, then KILL after 5 s) and remove the temp dir."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"the Workload API test server did not answer in {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Workload API test server exited ({self.proc.wait(5)})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"test server: {reply['error']}")
        return reply

    def command_sync(self, name: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": name, **args}) + "\n")
        self.proc.stdin.flush()
        return self._reply(REPLY_TIMEOUT)

    async def command(self, name: str, **args: Any) -> dict[str, Any]:
        """`command_sync` in a thread, so that the client under test keeps running."""
        return await trio.to_thread.run_sync(lambda: self.command_sync(name, **args))


# -- the server (the subprocess) ---------------------------------------------------------------


def _serve(socket_path: str) -> None:  # pragma: no cover - runs in the subprocess
    import threading
    from concurrent import futures

    import grpc
    from spiffe._proto import workload_pb2 as pb
    from spiffe._proto import workload_pb2_grpc as pb_grpc

    lock = threading.Condition()
    state: dict[str, Any] = {
        "x509": None,
        "jwt_bundles": {},
        "jwt_svid": None,
        "mode": "serve",
        "version": 0,  # bumped by every change: streams send again
        "breaks": 0,  # bumped by "break": streams end with `break_code`
        "break_code": "UNAVAILABLE",
        "log": [],
    }

    def refuse(context: grpc.ServicerContext, method: str) -> None:
        md = dict(context.invocation_metadata())
        ok = md.get("workload.spiffe.io") == "true"
        with lock:
            state["log"].append({"method": method, "header": ok, "at": time.monotonic()})
            mode = state["mode"]
        if not ok:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing")
        if mode == "deny":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        if mode == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "told to refuse")
        if mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "agent is starting")

    def stream(context: grpc.ServicerContext, method: str, make: Any) -> Any:
        refuse(context, method)
        with lock:
            breaks = state["breaks"]
            version = -1
        while context.is_active():
            with lock:
                if state["breaks"] != breaks:
                    code = getattr(grpc.StatusCode, state["break_code"])
                    break
                if state["mode"] != "serve":
                    code = None
                    break
                if state["version"] != version:
                    version = state["version"]
                    message = make()
                else:
                    lock.wait(0.05)
                    continue
            if message is None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            yield message
        else:
            return
        if code is None:
            refuse(context, method)  # the mode changed: answer as a new call would be
        context.abort(code, "stream broken by the test")

    def x509_message() -> Any:
        x = state["x509"]
        if x is None:
            return None
        m = pb.X509SVIDResponse()
        for s in x["svids"]:
            m.svids.add(
                spiffe_id=s["spiffe_id"],
                x509_svid=base64.b64decode(s["x509_svid"]),
                x509_svid_key=base64.b64decode(s["x509_svid_key"]),
                bundle=base64.b64decode(s["bundle"]),
                hint=s.get("hint", ""),
            )
        for td, der in x.get("federated", {}).items():
            m.federated_bundles[td] = base64.b64decode(der)
        return m

    def jwt_message() -> Any:
        m = pb.JWTBundlesResponse()
        for td, jwks in state["jwt_bundles"].items():
            m.bundles[td] = jwks.encode()
        return m if m.bundles else None

    class Servicer(pb_grpc.SpiffeWorkloadAPIServicer):
        def FetchX509SVID(self, request: Any, context: Any) -> Any:
            yield from stream(context, "FetchX509SVID", x509_message)

        def FetchJWTBundles(self, request: Any, context: Any) -> Any:
            yield from stream(context, "FetchJWTBundles", jwt_message)

        def FetchJWTSVID(self, request: Any, context: Any) -> Any:
            refuse(context, "FetchJWTSVID")
            with lock:
                svid = state["jwt_svid"]
            if svid is None or not request.audience:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            with lock:
                state["log"][-1]["audience"] = list(request.audience)
            return pb.JWTSVIDResponse(svids=[pb.JWTSVID(**svid)])

    server: Any = None
    tcp_port = 0  # chosen by the first start, kept by restarts

    def start() -> None:
        nonlocal server, tcp_port
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_SpiffeWorkloadAPIServicer_to_server(Servicer(), server)
        server.add_insecure_port(f"unix:{socket_path}")
        tcp_port = server.add_insecure_port(f"127.0.0.1:{tcp_port}")
        server.start()

    def stop() -> None:
        nonlocal server
        if server is not None:
            server.stop(grace=None).wait(5)
            server = None
        if os.path.exists(socket_path):
            os.unlink(socket_path)

    def changed() -> None:
        state["version"] += 1
        lock.notify_all()

    start()
    print(json.dumps({"ok": "listening", "tcp_port": tcp_port}), flush=True)
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            name = cmd.pop("cmd")
            reply: dict[str, Any] = {"ok": name}
            with lock:
                if name == "x509":
                    state["x509"] = cmd if cmd.get("svids") else None
                    changed()
                elif name == "jwt":
                    state["jwt_bundles"] = cmd.get("bundles", {})
                    state["jwt_svid"] = cmd.get("svid")
                    changed()
                elif name == "mode":
                    state["mode"] = cmd["mode"]
                    changed()
                elif name == "break":
                    state["break_code"] = cmd.get("code", "UNAVAILABLE")
                    state["breaks"] += 1
                    lock.notify_all()
                elif name == "log":
                    reply["log"] = state["log"]
            if name == "restart":
                stop()
                start()
            elif name == "stop":
                stop()
            elif name == "start":
                start()
            elif name not in ("x509", "jwt", "mode", "break", "log"):
                reply = {"error": f"unknown command {name!r}"}
        except Exception as e:
            reply = {"error": repr(e)}
        print(json.dumps(reply), flush=True)
    stop()


if __name__ == "__main__":  # pragma: no cover
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _serve(sys.argv[1])
