"""What a grpc.aio server pays to *read* one ext_proc message, the observer's whole
gRPC cost (it answers nothing): a client process streams ProcessingRequests with one
SSE frame each to a server process that only reads them, and the server reports its
CPU per message. Ways of reading, each its own server run:

  read      `context.read()` with the ProcessingRequest deserializer (what the observer does)
  iterator  `async for request in request_iterator`
  raw       `context.read()` with no deserializer, `response_body` picked from the bytes
  write     `read` plus one answer per message (the synchronous filter's loop, for scale)
  sync-read, sync-write   the same on grpcio's threaded server (one thread per stream,
            the request iterator): is the non-asyncio server a cheaper floor? (it is not)

The server runs on the sidecar's default loop, uvloop (`--loop asyncio`: the standard one).
Run: `python bench/grpc_read_bench.py [--streams 20] [--messages 4000] [--gap-ms 5]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    HttpBody,
    ProcessingRequest,
    ProcessingResponse,
)

from extproc import eventloop

REPO = Path(__file__).resolve().parent.parent

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
MODES = ("read", "iterator", "raw", "write", "sync-read", "sync-write")
FRAME = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" word"},'
    b'"finish_reason":null}]}\n\n'
)
ANSWER = ProcessingResponse(response_body=BodyResponse())


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def response_body(buf: bytes) -> tuple[bytes, bool] | None:
    """`response_body.body` and `.end_of_stream` of a serialized ProcessingRequest whose
    first field is `response_body` (field 5), else None."""
    if not buf or buf[0] != 0x2A:
        return None
    size, i = _varint(buf, 1)
    end, body, eos = i + size, b"", False
    while i < end:
        tag = buf[i]
        if tag == 0x0A:
            size, i = _varint(buf, i + 1)
            body, i = buf[i : i + size], i + size
        elif tag == 0x10:
            value, i = _varint(buf, i + 1)
            eos = value != 0
        else:
            return None
    return body, eos


def _handler(handler, raw: bool = False) -> grpc.GenericRpcHandler:
    rpc = grpc.stream_stream_rpc_method_handler(
        handler,
        request_deserializer=None if raw else ProcessingRequest.FromString,
        response_serializer=ProcessingResponse.SerializeToString,
    )

    class Generic(grpc.GenericRpcHandler):
        def service(self, details):
            return rpc if details.method == METHOD else None

    return Generic()


def _report(mode: str, seen: int, start: resource.struct_rusage) -> None:
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    print(json.dumps({"mode": mode, "messages": seen, "us_per_msg": cpu / seen * 1e6}))


def serve_sync(mode: str, port_file: Path, total: int) -> None:
    """grpcio's threaded server: a thread per stream reads the request iterator."""
    seen = 0
    lock = threading.Lock()
    done = threading.Event()

    def handler(request_iterator, context):
        nonlocal seen
        count = 0
        for request in request_iterator:
            request.response_body.body  # noqa: B018
            count += 1
            if mode == "sync-write":
                yield ANSWER
        with lock:
            seen += count
            if seen >= total:
                done.set()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    server.add_generic_rpc_handlers((_handler(handler),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    start = resource.getrusage(resource.RUSAGE_SELF)
    port_file.write_text(str(port))
    done.wait()
    _report(mode, seen, start)
    server.stop(1.0)


async def serve(mode: str, port_file: Path, total: int) -> None:
    seen = 0
    done = asyncio.Event()

    async def handler(request_iterator, context) -> None:
        nonlocal seen
        if mode == "iterator":
            async for request in request_iterator:
                request.response_body.body  # noqa: B018 - what the observer reads
                seen += 1
        else:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                if mode == "raw":
                    response_body(request)
                else:
                    request.response_body.body  # noqa: B018
                if mode == "write":
                    await context.write(ANSWER)
                seen += 1
        if seen >= total:
            done.set()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(handler, raw=mode == "raw"),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    start = resource.getrusage(resource.RUSAGE_SELF)
    port_file.write_text(str(port))
    await done.wait()
    _report(mode, seen, start)
    await server.stop(1.0)


async def drive(port: int, streams: int, messages: int, gap_s: float, answers: bool) -> None:
    request = ProcessingRequest(
        response_body=HttpBody(body=FRAME), observability_mode=True
    ).SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(METHOD)

        async def one() -> None:
            stream = call()
            for _ in range(messages // streams):
                await stream.write(request)
                if answers:
                    await stream.read()
                if gap_s:
                    await asyncio.sleep(gap_s)
            await stream.done_writing()
            await stream.code()

        await asyncio.gather(*(one() for _ in range(streams)))


def run(mode: str, args: argparse.Namespace) -> dict:
    port_file = Path(f"/tmp/grpc-read-bench-{os.getpid()}-{mode}")
    port_file.unlink(missing_ok=True)
    total = args.messages // args.streams * args.streams
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--port-file", str(port_file),
         "--messages", str(total), "--loop", args.loop],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    while not port_file.exists() or not port_file.read_text():
        time.sleep(0.05)
    port = int(port_file.read_text())
    answers = mode in ("write", "sync-write")
    asyncio.run(drive(port, args.streams, args.messages, args.gap_ms / 1000, answers))
    out, _ = server.communicate(timeout=60)
    port_file.unlink(missing_ok=True)
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--serve", choices=MODES)
    parser.add_argument("--port-file", type=Path)
    args = parser.parse_args()
    if args.serve in ("sync-read", "sync-write"):
        serve_sync(args.serve, args.port_file, args.messages)
        return 0
    if args.serve:
        eventloop.run(serve(args.serve, args.port_file, args.messages), args.loop)
        return 0
    results: dict[str, list[float]] = {mode: [] for mode in args.modes.split(",")}
    for _ in range(args.rounds):  # interleaved: a busy machine hits every mode alike
        for mode in results:
            results[mode].append(run(mode, args)["us_per_msg"])
    for mode, figures in results.items():
        shown = ", ".join(f"{f:.1f}" for f in figures)
        print(f"{mode:9s} server CPU per message: best {min(figures):.1f} us ({shown})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
