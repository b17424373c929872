"""A grpcio server and client for the gRPC e2e tests, each run as its own process.

grpcio starts threads and holds a global event engine; a process that forks after creating a
channel or server breaks, and weft's tests fork (weft itself, upstreams). So the pytest process
never imports grpc: it starts this script, ``python tests/support/grpc_peer.py server ...`` or
``... call ...``, and reads what it prints.

The service, ``weft.test.Echo``, uses raw bytes both ways (no protobuf):

==============  ===========================================================================
Unary           echoes the request; initial metadata ``x-server`` (the server's name) and
                ``x-echo`` (the request's ``x-echo``); trailing metadata ``x-trailer: done``
ServerStream    the request is a count N: N messages ``"<i>"``, then OK
ClientStream    all request messages joined with ``"+"``
Bidi            each request message echoed back as it arrives (the client waits for each
                echo before it sends the next: only a proxy that streams both ways at once
                lets this call finish)
Fail            FAILED_PRECONDITION with a non-ASCII message and trailing metadata
Slow            sleeps the request's milliseconds (at most 10 s) unless cancelled; counts the
                calls whose context saw the cancellation (``Stats``)
Stats           JSON: calls per method, and ``cancelled``
==============  ===========================================================================

With ``--sick`` every method but Stats answers UNAVAILABLE: unary calls as Trailers-Only
(abort before any message), ServerStream after one message (grpc-status in the trailers).

``server`` prints ``LISTENING <port>`` once serving and runs until SIGTERM. ``call`` makes
``--count`` calls of one method through ``--target`` (TLS with ``--ca`` and
``--name-override``, or plaintext without ``--ca``) and prints one JSON list: per call, its
code name, details, initial and trailing metadata, and the response messages (text).
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "weft.test.Echo"
FAIL_MESSAGE = "café ☕ 100% broken\nline two"


def serve(name: str, port: int, sick: bool) -> None:
    calls: Counter[str] = Counter()
    cancelled = Counter[str]()
    lock = threading.Lock()

    def count(method: str) -> None:
        with lock:
            calls[method] += 1

    def sick_abort(context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{name} is sick")

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        count("Unary")
        if sick:
            sick_abort(context)
        echo = dict(context.invocation_metadata()).get("x-echo", "")
        context.send_initial_metadata((("x-server", name), ("x-echo", echo)))
        context.set_trailing_metadata((("x-trailer", "done"),))
        return request

    def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count("ServerStream")
        context.send_initial_metadata((("x-server", name),))
        if sick:
            yield b"0"
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(f"{name} is sick")
            return
        for i in range(int(request or b"0")):
            yield str(i).encode()
        context.set_trailing_metadata((("x-trailer", "done"),))

    def client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        count("ClientStream")
        if sick:
            sick_abort(context)
        got = b"+".join(requests)
        context.set_trailing_metadata((("x-trailer", "done"),))
        return got

    def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        count("Bidi")
        if sick:
            sick_abort(context)
        context.send_initial_metadata((("x-server", name),))
        for r in requests:
            yield b"echo:" + r
        context.set_trailing_metadata((("x-trailer", "done"),))

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        count("Fail")
        context.set_trailing_metadata((("x-reason", "on-purpose"), ("x-detail-bin", b"\x00\xff")))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, FAIL_MESSAGE)
        return b""  # not reached: abort raises

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        count("Slow")
        seen = threading.Event()
        context.add_callback(seen.set)  # runs when the call ends, cancelled or not
        until = time.monotonic() + min(int(request or b"0"), 10_000) / 1000
        while time.monotonic() < until:
            if not context.is_active():
                with lock:
                    cancelled["Slow"] += 1
                return b""
            time.sleep(0.01)
        return b"slept"

    def stats(request: bytes, context: grpc.ServicerContext) -> bytes:
        with lock:
            return json.dumps({"calls": dict(calls), "cancelled": dict(cancelled)}).encode()

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Stats": grpc.unary_unary_rpc_method_handler(stats),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"LISTENING {bound}", flush=True)
    stop.wait()
    server.stop(grace=0.5).wait(5)


def _metadata(md: Any) -> dict[str, str]:
    out = {}
    for k, v in md or ():
        out[k] = v.hex() if isinstance(v, bytes) else v
    return out


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.ca is None:
        return grpc.insecure_channel(args.target)
    with open(args.ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = [("grpc.ssl_target_name_override", args.name_override)] if args.name_override else []
    return grpc.secure_channel(args.target, creds, options=options)


def _one_call(channel: grpc.Channel, args: argparse.Namespace) -> dict[str, Any]:
    path = f"/{SERVICE}/{args.method}"
    timeout = args.timeout
    metadata = (("x-echo", "hello"),)
    payload = args.payload.encode()
    result: dict[str, Any] = {"code": "OK", "details": "", "initial": {}, "trailing": {}}
    started = time.monotonic()
    try:
        if args.method in ("Unary", "Fail", "Slow", "Stats"):
            rpc = channel.unary_unary(path)
            response, call = rpc.with_call(payload, timeout=timeout, metadata=metadata)
            result["responses"] = [response.decode()]
        elif args.method == "ServerStream":
            call = channel.unary_stream(path)(payload, timeout=timeout, metadata=metadata)
            result["responses"] = []
            for r in call:
                result["responses"].append(r.decode())
        elif args.method == "ClientStream":
            parts = [p.encode() for p in args.payload.split(",")]
            rpc = channel.stream_unary(path)
            response, call = rpc.with_call(iter(parts), timeout=timeout, metadata=metadata)
            result["responses"] = [response.decode()]
        elif args.method == "Bidi":
            # Lock-step: the next message goes only once the previous one's echo came back.
            outbox: queue.Queue[bytes | None] = queue.Queue()

            def requests() -> Iterator[bytes]:
                while (m := outbox.get(timeout=10)) is not None:
                    yield m

            parts = [p.encode() for p in args.payload.split(",")]
            call = channel.stream_stream(path)(requests(), timeout=timeout, metadata=metadata)
            result["responses"] = []
            outbox.put(parts[0])
            for i, r in enumerate(call):
                result["responses"].append(r.decode())
                outbox.put(parts[i + 1] if i + 1 < len(parts) else None)
        else:
            raise SystemExit(f"unknown method {args.method}")
        result["initial"] = _metadata(call.initial_metadata())
        result["trailing"] = _metadata(call.trailing_metadata())
        result["code"] = call.code().name
        result["details"] = call.details() or ""
    except grpc.RpcError as e:
        result["code"] = e.code().name  # type: ignore[attr-defined]
        result["details"] = e.details() or ""  # type: ignore[attr-defined]
        result["initial"] = _metadata(e.initial_metadata())  # type: ignore[attr-defined]
        result["trailing"] = _metadata(e.trailing_metadata())  # type: ignore[attr-defined]
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def call(args: argparse.Namespace) -> None:
    with _channel(args) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        results = []
        for _ in range(args.count):
            results.append(_one_call(channel, args))
            if args.pause:
                time.sleep(args.pause)
    print(json.dumps(results), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--name", default="up")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--sick", action="store_true")
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--ca")
    c.add_argument("--name-override")
    c.add_argument("--method", required=True)
    c.add_argument("--payload", default="")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--pause", type=float, default=0.0)
    c.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    if args.cmd == "server":
        serve(args.name, args.port, args.sick)
    else:
        call(args)


if __name__ == "__main__":
    sys.exit(main())
