"""A do-nothing ext_proc server: the floor the sidecar is measured against.

Same gRPC stack as the sidecar (grpc.aio, `context.read()`/`context.write()` per
message), same processing modes (those are Envoy's side: headers SEND, request body
BUFFERED, response body STREAMED), and every message answered with the matching empty
response. It counts messages by kind and serves the counts as JSON over plain HTTP,
so the benchmark can divide this process's CPU time by the messages it handled.

Run: `python -m bench.noop_extproc --listen 127.0.0.1:50051 --stats 127.0.0.1:9464`
(`--loop uvloop` for the `noop-uvloop` setup; the floor of the targets is the standard
library's loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    HeadersResponse,
    ProcessingResponse,
    TrailersResponse,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.h2stream import EOF

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
# One prebuilt answer per phase: "continue, change nothing".
ANSWERS = {
    "request_headers": ProcessingResponse(request_headers=HeadersResponse()),
    "request_body": ProcessingResponse(request_body=BodyResponse()),
    "response_headers": ProcessingResponse(response_headers=HeadersResponse()),
    "response_body": ProcessingResponse(response_body=BodyResponse()),
    "request_trailers": ProcessingResponse(request_trailers=TrailersResponse()),
    "response_trailers": ProcessingResponse(response_trailers=TrailersResponse()),
}


class NoopProcessor:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(ANSWERS, 0)
        self.streams = 0

    async def run(self, context, eof: object) -> None:
        self.streams += 1
        counts = self.counts
        read, write = context.read, context.write
        while True:
            request = await read()
            if request is eof:
                break
            kind = request.WhichOneof("request")
            counts[kind] += 1
            await write(ANSWERS[kind])

    async def Process(self, context) -> None:
        """A stream of the sidecar's transport (`extproc.h2grpc`)."""
        await self.run(context, EOF)

    def stats(self) -> bytes:
        return orjson.dumps(
            {"messages": sum(self.counts.values()), "streams": self.streams, "by_kind": self.counts}
        )


class GrpcioServicer(ext_proc_grpc.ExternalProcessorServicer):
    def __init__(self, processor: NoopProcessor) -> None:
        self.processor = processor

    async def Process(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await self.processor.run(context, grpc.aio.EOF)


async def _stats_server(processor: NoopProcessor, host: str, port: int) -> asyncio.Server:
    """GET anything -> the counts as JSON (one request per connection)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            body = processor.stats()
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, port)


async def serve_h2(listen: str, stats: str) -> None:
    """The same answers over the sidecar's own transport (`extproc.h2grpc`)."""
    from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

    from extproc.h2grpc import Method, Server

    processor = NoopProcessor()

    async def check(stream) -> None:
        await stream.read()
        await stream.write(
            health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        )

    server = Server({
        f"/{SERVICE_NAME}/Process": Method(ProcessingRequest.FromString, processor.Process),
        "/grpc.health.v1.Health/Check": Method(health_pb2.HealthCheckRequest.FromString, check),
    })  # fmt: skip
    await server.listen(listen)
    host, _, port = stats.rpartition(":")
    stats_server = await _stats_server(processor, host or "127.0.0.1", int(port))
    print(f"noop ext_proc (h2grpc) on {listen}, stats on http://{stats}/", flush=True)
    await _until_signal(processor, stats_server, server)


async def serve(listen: str, stats: str) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_concurrent_streams", 10000),
            ("grpc.so_reuseport", 0),
        ]
    )
    processor = NoopProcessor()
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(GrpcioServicer(processor), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"noop_extproc: cannot listen on {listen}")
    host, _, port = stats.rpartition(":")
    stats_server = await _stats_server(processor, host or "127.0.0.1", int(port))
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(f"noop ext_proc on {listen}, stats on http://{stats}/", flush=True)
    await _until_signal(processor, stats_server, server)


async def _until_signal(processor: NoopProcessor, stats_server: asyncio.Server, server) -> None:
    """Serve until SIGTERM/SIGINT, then stop and print the counts."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    stats_server.close()
    await server.stop(grace=2)
    print(f"noop ext_proc handled {processor.stats().decode()}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.noop_extproc", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:50051", help="gRPC host:port")
    parser.add_argument("--stats", default="127.0.0.1:9464", help="host:port for the counts")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--transport", choices=("grpcio", "h2grpc"), default="grpcio")
    args = parser.parse_args()
    main_coro = (serve_h2 if args.transport == "h2grpc" else serve)(args.listen, args.stats)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(main_coro)
    else:
        asyncio.run(main_coro)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
