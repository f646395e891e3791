"""The sidecar's own gRPC server (extproc.h2grpc) against the real grpcio client, the
oracle for legal behaviour: unary and bidi calls, large messages, errors, cancels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.h2_helpers import BIG_OPTIONS, BV, Calls, health_check, pattern, running_server


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Calls]]:
    async with running_server() as (port, calls, _server):
        yield port, calls


def _bidi(channel: grpc.aio.Channel, path: str = "/t.T/Echo") -> grpc.aio.StreamStreamMultiCallable:
    return channel.stream_stream(
        path, request_serializer=BV.SerializeToString, response_deserializer=BV.FromString
    )


def _unary(channel: grpc.aio.Channel, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        path, request_serializer=BV.SerializeToString, response_deserializer=BV.FromString
    )


async def test_health_check_serving_and_not_found_for_an_unknown_service(
    served: tuple[int, Calls],
) -> None:
    port, _calls = served
    assert await health_check(port) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_check(port, "no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "unknown service"


async def test_bidi_stream_of_many_messages_answered_in_order(served: tuple[int, Calls]) -> None:
    port, _calls = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = _bidi(channel)()
        for i in range(2000):
            await call.write(BV(value=b"%d" % i))
            if i % 100 == 99:  # answers read as the stream goes, not only at the end
                assert (await call.read()).value == b"%d" % (i - 99)
                for j in range(i - 98, i + 1):
                    assert (await call.read()).value == b"%d" % j
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("size", [20 << 10, 3 << 20, 20 << 20])
async def test_large_messages_both_ways(served: tuple[int, Calls], size: int) -> None:
    """Over one frame (16 KiB), over the peer's first window, over our 16 MiB stream
    window: whole, byte for byte, both ways."""
    port, _calls = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=BIG_OPTIONS) as ch:
        body = pattern(size)
        answers = [m async for m in _bidi(ch)(iter([BV(value=body), BV(value=b"x")]))]
        assert [len(a.value) for a in answers] == [size, 1]
        assert answers[0].value == body
        big = await _unary(ch, "/t.T/Big")(BV(value=str(size).encode()))
        assert big.value == body


async def test_unknown_method_is_unimplemented(served: tuple[int, Calls]) -> None:
    port, _calls = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _unary(channel, "/t.T/Nope")(BV(value=b"x"))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        call = _bidi(channel, "/t.T/Nope")()  # and on a stream, answered before a message
        assert await call.code() == grpc.StatusCode.UNIMPLEMENTED
    assert await health_check(port) == health_pb2.HealthCheckResponse.SERVING


async def test_a_handler_exception_is_a_non_ok_status_without_its_text(
    served: tuple[int, Calls],
) -> None:
    port, _calls = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _unary(channel, "/t.T/Boom")(BV(value=b"x"))
        assert caught.value.code() == grpc.StatusCode.UNKNOWN
        assert "a handler's bug" not in caught.value.details()
        assert await _unary(channel, "/t.T/Echo")(BV(value=b"after")) == BV(value=b"after")


async def test_client_cancel_mid_stream_cancels_the_handler(served: tuple[int, Calls]) -> None:
    port, calls = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = _bidi(channel, "/t.T/Hang")()
        await call.write(BV(value=b"x"))
        await calls.started.wait()
        call.cancel()
        await asyncio.wait_for(calls.finally_ran.wait(), 30)
        assert calls.cancelled == 1
        assert await _unary(channel, "/t.T/Echo")(BV(value=b"y")) == BV(value=b"y")


async def test_concurrent_streams_on_one_channel(served: tuple[int, Calls]) -> None:
    port, _calls = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=BIG_OPTIONS) as ch:

        async def one(i: int) -> list[bytes]:
            call = _bidi(ch)()
            got = []
            for j in range(20):
                await call.write(BV(value=b"%d-%d" % (i, j) + pattern(i * 997)))
                got.append((await call.read()).value)
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            return got

        results = await asyncio.gather(*(one(i) for i in range(100)))
        for i, got in enumerate(results):
            assert got == [b"%d-%d" % (i, j) + pattern(i * 997) for j in range(20)]
