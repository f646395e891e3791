"""A real `extproc.h2grpc.Server` on a free loopback port with a small test servicer, and
the clients that drive it: grpcio (the oracle for legal behaviour), raw frames."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import grpc
import hpack
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2

from extproc.h2frames import PREFACE, SETTINGS, frame
from extproc.h2grpc import Server
from extproc.h2stream import EOF, Method, Stream
from extproc.readiness import Health
from tests.conftest import free_port

BV = wrappers_pb2.BytesValue
HEALTH = "/grpc.health.v1.Health/Check"
BIG_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
               ("grpc.max_send_message_length", 64 << 20)]  # fmt: skip


class Calls:
    """The test methods: what each handler saw, for the tests to assert on."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finally_ran = asyncio.Event()
        self.cancelled = 0
        self.gate = asyncio.Event()
        self.sunk = 0

    async def echo(self, ctx: Stream) -> None:
        """Bidi: every message back, in order."""
        while (message := await ctx.read()) is not EOF:
            await ctx.write(message)

    async def big(self, ctx: Stream) -> None:
        """One answer of the size the request asks (a decimal count of bytes)."""
        request = await ctx.read()
        await ctx.write(BV(value=pattern(int(request.value))))

    async def meta(self, ctx: Stream) -> None:
        """The invocation metadata the handler sees, one `name: value` line each."""
        await ctx.read()
        lines = [f"{name}: {value}" for name, value in ctx.invocation_metadata()]
        await ctx.write(BV(value="\n".join(lines).encode("latin-1")))

    async def boom(self, ctx: Stream) -> None:
        await ctx.read()
        raise RuntimeError("a handler's bug")

    async def sink(self, ctx: Stream) -> None:
        """Reads nothing until `gate` opens, then counts every message to the end."""
        await self.gate.wait()
        while await ctx.read() is not EOF:
            self.sunk += 1

    async def hang(self, ctx: Stream) -> None:
        """Reads one message, then waits for ever: only a cancel ends it."""
        try:
            self.started.set()
            await ctx.read()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.finally_ran.set()


def pattern(n: int) -> bytes:
    """n bytes no two windows of which look alike: order errors show."""
    return (bytes(range(251)) * (n // 251 + 1))[:n]


@asynccontextmanager
async def running_server() -> AsyncIterator[tuple[int, Calls, Server]]:
    calls, health = Calls(), Health()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    server = Server({
        HEALTH: Method(health_pb2.HealthCheckRequest.FromString, health.Check),
        "/t.T/Echo": Method(BV.FromString, calls.echo),
        "/t.T/Big": Method(BV.FromString, calls.big),
        "/t.T/Boom": Method(BV.FromString, calls.boom),
        "/t.T/Meta": Method(BV.FromString, calls.meta),
        "/t.T/Hang": Method(BV.FromString, calls.hang),
        "/t.T/Sink": Method(BV.FromString, calls.sink),
    })  # fmt: skip
    port = free_port()
    await server.listen(f"127.0.0.1:{port}")
    try:
        yield port, calls, server
    finally:
        await server.stop(0.5)


async def health_check(port: int, service: str = "") -> int:
    """A fresh grpcio channel's Health/Check: the server still serves."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(
            HEALTH,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        answer = await check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        return answer.status


def message(payload: bytes, compressed: int = 0) -> bytes:
    """One length-prefixed gRPC message."""
    return struct.pack(">BL", compressed, len(payload)) + payload


def request_headers(path: str) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", "test"), ("content-type", "application/grpc"),
            ("te", "trailers")]  # fmt: skip


class Raw:
    """Raw frames on a socket: what no well-behaved client sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(cls, port: int, *, preface: bool = True) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        if preface:
            await raw.send(PREFACE + frame(SETTINGS, 0, 0, b""))
        return raw

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def block(self, path: str) -> bytes:
        return self.encoder.encode(request_headers(path))

    async def read_frame(self) -> tuple[int, int, int, bytes] | None:
        """The next frame, or None at the server's close."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), 60)
            length = int.from_bytes(head[:3], "big")
            payload = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload

    async def until(self, kind: int, stream_id: int | None = None) -> tuple[int, int, bytes]:
        """Frames up to the first of `kind` (on `stream_id`): its flags, stream, payload."""
        while (got := await self.read_frame()) is not None:
            if got[0] == kind and (stream_id is None or got[2] == stream_id):
                return got[1], got[2], got[3]
        raise AssertionError(f"the connection closed before a frame of type {kind}")

    async def closed(self) -> bool:
        """True once the server closed the connection (everything before is read)."""
        while await self.read_frame() is not None:
            pass
        return True

    def headers(self, block: bytes) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.decoder.decode(block, raw=True)}

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError):
            await self.writer.wait_closed()
