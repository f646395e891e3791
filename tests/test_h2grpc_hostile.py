"""extproc.h2grpc against hostile input, raw bytes on a socket: every case ends in a
GOAWAY and close, a refused stream, or a bound; and the server serves a fresh grpcio
call afterwards."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable

import pytest
from grpc_health.v1 import health_pb2

from extproc.h2flow import MAX_QUEUED
from extproc.h2frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from extproc.h2grpc import MAX_STREAMS, Server
from tests.h2_helpers import BV, Calls, Raw, health_check, message, running_server

SERVING = health_pb2.HealthCheckResponse.SERVING
ECHO = "/t.T/Echo"


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Calls, Server]]:
    async with running_server() as (port, calls, server):
        yield port, calls, server
        assert await health_check(port) == SERVING  # after every hostile case


def _bv(value: bytes) -> bytes:
    return message(BV(value=value).SerializeToString())


async def _answer(raw: Raw, sid: int) -> tuple[bytes, dict[str, str]]:
    """The stream's DATA and its last header block (trailers, or trailers-only)."""
    data, headers = b"", {}
    while (got := await raw.read_frame()) is not None:
        kind, flags, stream_id, payload = got
        if stream_id != sid:
            continue
        if kind == DATA:
            data += payload
        elif kind == HEADERS:
            headers = raw.headers(payload)
            if flags & END_STREAM:
                return data, headers
        elif kind == RST_STREAM:
            return data, headers
    raise AssertionError("the connection closed before the stream ended")


async def _goaway(raw: Raw) -> int:
    """The GOAWAY's error code, once the server also closed the connection."""
    _flags, _sid, payload = await raw.until(GOAWAY)
    assert await raw.closed()
    return struct.unpack(">LL", payload)[1]


async def test_a_bad_preface_is_goaway_protocol_error_and_close(served) -> None:
    raw = await Raw.connect(served[0], preface=False)
    await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await _goaway(raw) == 1


async def test_a_frame_over_the_advertised_max_is_frame_size_error(served) -> None:
    raw = await Raw.connect(served[0])
    await raw.send(struct.pack(">L", (1 << 20) + 1)[1:] + bytes((DATA, 0)) + struct.pack(">L", 1))
    assert await _goaway(raw) == 6


@pytest.mark.parametrize("bad", [frame(SETTINGS, 0, 0, b"12345"), frame(PING, 0, 0, b"1234"),
                                 frame(WINDOW_UPDATE, 0, 0, b"12")])  # fmt: skip
async def test_control_frames_of_a_wrong_size_are_frame_size_error(served, bad: bytes) -> None:
    raw = await Raw.connect(served[0])
    await raw.send(bad)
    assert await _goaway(raw) == 6


@pytest.mark.parametrize(
    ("setting", "code"), [((4, 1 << 31), 3), ((5, 16383), 1), ((5, 1 << 24), 1)]
)
async def test_settings_out_of_range(served, setting: tuple[int, int], code: int) -> None:
    """An initial window over 2^31-1 (FLOW_CONTROL_ERROR), a max frame size outside
    16 KiB .. 16 MiB-1 (PROTOCOL_ERROR)."""
    raw = await Raw.connect(served[0])
    await raw.send(frame(SETTINGS, 0, 0, struct.pack(">HL", *setting)))
    assert await _goaway(raw) == code


async def test_a_continuation_flood_past_the_header_block_limit(served) -> None:
    raw = await Raw.connect(served[0])
    flood = frame(HEADERS, 0, 1, b"\x00" * 16384)
    flood += b"".join(frame(CONTINUATION, 0, 1, b"\x00" * 16384) for _ in range(8))
    await raw.send(flood)
    assert await _goaway(raw) == 11  # ENHANCE_YOUR_CALM


async def test_an_hpack_block_that_does_not_decode(served) -> None:
    raw = await Raw.connect(served[0])
    await raw.send(frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff"))
    assert await _goaway(raw) == 9  # COMPRESSION_ERROR


async def test_an_hpack_bomb_past_the_header_list_limit(served) -> None:
    """One 4 KB entry in the dynamic table, then 100 one-byte references to it: a 4 KB
    block that would expand to 400 KB."""
    raw = await Raw.connect(served[0])
    value = b"v" * 4000
    block = b"\x40\x03x-a\x7f" + _hpack_int(len(value) - 127) + value + b"\xbe" * 100
    await raw.send(frame(HEADERS, END_HEADERS, 1, block))
    assert await _goaway(raw) == 9


def _hpack_int(n: int) -> bytes:
    out = []
    while n >= 128:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


async def test_an_even_stream_id_is_a_protocol_error(served) -> None:
    raw = await Raw.connect(served[0])
    await raw.send(frame(HEADERS, END_HEADERS, 2, raw.block(ECHO)))
    assert await _goaway(raw) == 1


async def test_reused_and_decreasing_stream_ids_are_ignored_and_the_connection_serves(
    served,
) -> None:
    raw = await Raw.connect(served[0])
    await raw.send(
        frame(HEADERS, END_HEADERS, 5, raw.block(ECHO)) + frame(DATA, END_STREAM, 5, _bv(b"a"))
    )
    assert await _answer(raw, 5) == (_bv(b"a"), {"grpc-status": "0"})
    again = frame(HEADERS, END_HEADERS, 5, raw.block(ECHO)) + frame(DATA, END_STREAM, 5, _bv(b"b"))
    lower = frame(HEADERS, END_HEADERS, 3, raw.block(ECHO)) + frame(DATA, END_STREAM, 3, _bv(b"c"))
    await raw.send(again + lower + frame(PING, 0, 0, b"pingpong"))
    flags, _sid, payload = await raw.until(PING)  # nothing for 5 or 3 came first
    assert (flags, payload) == (1, b"pingpong")
    await raw.send(
        frame(HEADERS, END_HEADERS, 7, raw.block(ECHO)) + frame(DATA, END_STREAM, 7, _bv(b"d"))
    )
    assert await _answer(raw, 7) == (_bv(b"d"), {"grpc-status": "0"})
    await raw.close()


async def test_data_on_an_unknown_stream_still_counts_against_the_connection_window(served) -> None:
    """513 MiB on streams that do not exist (padded or not): the connection's window
    is replenished all the same, or a peer could starve the live streams."""
    raw = await Raw.connect(served[0])
    _flags, _sid, first = await raw.until(WINDOW_UPDATE, 0)  # the server's own, at start
    assert struct.unpack(">L", first)[0] == (1 << 30) - 65535
    plain = frame(DATA, 0, 99, bytes(1 << 20))
    padded = frame(DATA, PADDED, 101, b"\xff" + bytes((1 << 20) - 1))
    for i in range(513):
        await raw.send(plain if i % 2 else padded)
    _flags, _sid, grow = await raw.until(WINDOW_UPDATE, 0)
    assert struct.unpack(">L", grow)[0] >= 512 << 20
    await raw.close()


async def test_padding_counts_against_the_stream_window(served) -> None:
    """8 MiB of DATA that is all padding: the stream's WINDOW_UPDATE returns all 8 MiB
    (counting only the content would shrink the peer's window to nothing)."""
    raw = await Raw.connect(served[0])
    await raw.send(frame(HEADERS, END_HEADERS, 1, raw.block(ECHO)))
    pad_only = frame(DATA, PADDED, 1, b"\xff" + bytes(255))
    await raw.send(pad_only * ((8 << 20) // 256))
    _flags, _sid, grow = await raw.until(WINDOW_UPDATE, 1)
    assert struct.unpack(">L", grow)[0] == 8 << 20
    await raw.send(frame(DATA, END_STREAM, 1, _bv(b"after")))
    assert await _answer(raw, 1) == (_bv(b"after"), {"grpc-status": "0"})
    await raw.close()


async def test_the_compressed_flag_is_refused_at_once(served) -> None:
    raw = await Raw.connect(served[0])
    await raw.send(frame(HEADERS, END_HEADERS, 1, raw.block(ECHO)))
    await raw.send(frame(DATA, 0, 1, b"\x01" + struct.pack(">L", 1 << 20) + b"zz"))  # 2 of 1 MiB
    data, headers = await _answer(raw, 1)
    assert (data, headers["grpc-status"]) == (b"", "13")
    assert "compressed" in headers["grpc-message"]
    await raw.close()


async def test_a_declared_length_of_4_gib_is_refused_at_once(served) -> None:
    raw = await Raw.connect(served[0])
    await raw.send(
        frame(HEADERS, END_HEADERS, 1, raw.block(ECHO)) + frame(DATA, 0, 1, b"\x00\xff\xff\xff\xff")
    )
    data, headers = await _answer(raw, 1)
    assert (data, headers["grpc-status"]) == (b"", "8")  # RESOURCE_EXHAUSTED, nothing buffered
    await raw.close()


async def _eventually(predicate: Callable[[], object], what: str) -> None:
    """Wait until the server's state shows `predicate` (no timing asserted: 60 s guard)."""
    async with asyncio.timeout(60):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


async def test_a_peer_that_never_reads_makes_the_server_stop_reading(served) -> None:
    """PINGs sent, their ACKs never read: the server's write buffer passes its high-water
    mark, it stops reading, and what it holds stays bounded (the ACKs it has not written
    are at most one read's worth); once the peer reads, all flows again."""
    port, _calls, server = served
    raw = await Raw.connect(port)
    (conn,) = server.connections
    pings = frame(PING, 0, 0, b"12345678") * 4096

    sent = 0

    async def flood() -> None:
        nonlocal sent
        while True:
            raw.writer.write(pings)  # buffered whole on our side, even if cancelled
            sent += 4096
            await raw.writer.drain()

    sender = asyncio.create_task(flood())
    await _eventually(lambda: conn.read_paused, "reading paused")
    await asyncio.sleep(0.2)  # a loop turn or twenty more: nothing grows while paused
    held = conn.transport.get_write_buffer_size() + sum(map(len, conn.out))
    assert held < 1 << 20
    assert conn.read_paused
    sender.cancel()
    ack = frame(PING, 1, 0, b"12345678")
    start = len(frame(SETTINGS, 0, 0, bytes(18)) + frame(WINDOW_UPDATE, 0, 0, bytes(4)))
    start += len(frame(SETTINGS, 1, 0, b""))  # the server's SETTINGS, window, our ACK
    got = bytearray()
    while len(got) < start + sent * len(ack):  # reading again: every PING is answered
        chunk = await asyncio.wait_for(raw.reader.read(1 << 20), 60)
        assert chunk, "the server closed the connection"
        got += chunk
    assert got.count(ack) == sent
    await raw.close()


async def test_a_handler_that_lags_makes_the_server_stop_reading_not_grow(served) -> None:
    """80 MiB of messages to a handler that reads none yet: the server holds at most
    MAX_QUEUED (+ one read) of them, then stops reading; once the handler reads, the
    rest flows and every message arrives."""
    port, calls, server = served
    raw = await Raw.connect(port)
    (conn,) = server.connections
    await raw.send(frame(HEADERS, END_HEADERS, 1, raw.block("/t.T/Sink")))
    chunk = frame(DATA, 0, 1, _bv(bytes(1000)) * 64)
    chunks = (80 << 20) // len(chunk)
    sender = asyncio.create_task(raw.send(chunk * chunks + frame(DATA, END_STREAM, 1, b"")))
    await _eventually(lambda: conn.read_paused, "reading paused")
    assert MAX_QUEUED // 2 < conn.queued < MAX_QUEUED + (1 << 20)
    assert not sender.done()
    calls.gate.set()
    await sender
    data, headers = await _answer(raw, 1)
    assert (data, headers["grpc-status"], calls.sunk) == (b"", "0", chunks * 64)
    assert conn.queued == 0
    await raw.close()


async def test_streams_past_max_concurrent_are_refused(served) -> None:
    port, calls, _server = served
    raw = await Raw.connect(port)
    sids = [2 * i + 1 for i in range(MAX_STREAMS + 1)]
    await raw.send(b"".join(frame(HEADERS, END_HEADERS, s, raw.block("/t.T/Hang")) for s in sids))
    _flags, sid, payload = await raw.until(RST_STREAM)
    assert (sid, struct.unpack(">L", payload)[0]) == (sids[-1], 7)  # REFUSED_STREAM
    await raw.close()
    await _eventually(lambda: calls.cancelled == MAX_STREAMS, "every handler cancelled")


async def _hanging_call(served) -> tuple[Raw, Calls]:
    """A raw connection with one call on stream 1 whose handler has started and waits."""
    port, calls, _server = served
    raw = await Raw.connect(port)
    await raw.send(
        frame(HEADERS, END_HEADERS, 1, raw.block("/t.T/Hang")) + frame(DATA, 0, 1, _bv(b"x"))
    )
    await calls.started.wait()
    return raw, calls


async def test_a_connection_closed_mid_frame_cancels_its_handlers(served) -> None:
    raw, calls = await _hanging_call(served)
    await raw.send(frame(DATA, 0, 1, _bv(b"y" * 100))[:40])  # a frame cut short
    await raw.close()
    await asyncio.wait_for(calls.finally_ran.wait(), 60)
    assert calls.cancelled == 1


async def test_rst_stream_for_a_stream_in_flight_cancels_its_handler(served) -> None:
    raw, calls = await _hanging_call(served)
    await raw.send(frame(RST_STREAM, 0, 1, struct.pack(">L", 8)) + frame(DATA, 0, 1, _bv(b"late")))
    await asyncio.wait_for(calls.finally_ran.wait(), 60)
    assert calls.cancelled == 1
    await raw.send(frame(PING, 0, 0, b"stillup!"))
    assert (await raw.until(PING))[2] == b"stillup!"
    await raw.close()


async def test_a_whole_call_dribbled_one_byte_at_a_time(served) -> None:
    raw = await Raw.connect(served[0], preface=False)
    wire = PREFACE + frame(SETTINGS, 0, 0, b"")
    wire += frame(HEADERS, END_HEADERS, 1, raw.block(ECHO)) + frame(
        DATA, END_STREAM, 1, _bv(b"slow")
    )
    for i in range(len(wire)):
        await raw.send(wire[i : i + 1])
    assert await _answer(raw, 1) == (_bv(b"slow"), {"grpc-status": "0"})
    await raw.close()


async def test_unknown_frame_types_padded_headers_and_continuation(served) -> None:
    """Unknown frame types are ignored, on stream 0 or a stream's; HEADERS padded and
    with priority, its block continued over two CONTINUATION frames."""
    raw = await Raw.connect(served[0])
    block = raw.block(ECHO)
    first = b"\x03" + b"\x00\x00\x00\x00\x10" + block[:2] + b"pad"  # pad length, priority
    wire = frame(0xFA, 0xFF, 0, b"whatever") + frame(HEADERS, PADDED | PRIORITY_FLAG, 1, first)
    wire += frame(CONTINUATION, 0, 1, block[2:4]) + frame(CONTINUATION, END_HEADERS, 1, block[4:])
    wire += frame(0xFB, 0, 1, b"x" * 100) + frame(DATA, END_STREAM, 1, _bv(b"ok"))
    await raw.send(wire)
    assert await _answer(raw, 1) == (_bv(b"ok"), {"grpc-status": "0"})
    await raw.close()
