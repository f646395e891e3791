"""extproc.h2grpc's reading in place: DATA is parsed from views of the socket's bytes,
so what a stream keeps past a read (the start of a message split over frames) must be
its own bytes; and header blocks in many CONTINUATION pieces are joined once."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest

from extproc.h2frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PADDED,
    WINDOW_UPDATE,
    frame,
)
from extproc.h2grpc import Server
from tests.h2_helpers import BV, Calls, Raw, message, pattern, running_server

ECHO = "/t.T/Echo"
HANG = "/t.T/Hang"


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Calls, Server]]:
    async with running_server() as (port, calls, server):
        yield port, calls, server


async def _echoed(raw: Raw, sid: int) -> list[bytes]:
    """The values the Echo call answered, once its trailers came."""
    data = b""
    while (got := await raw.read_frame()) is not None:
        kind, flags, stream_id, payload = got
        if stream_id == sid and kind == DATA:
            data += payload
        if stream_id == sid and kind == HEADERS and flags & END_STREAM:
            assert raw.headers(payload) == {"grpc-status": "0"}
            values, at = [], 0
            while at < len(data):
                length = int.from_bytes(data[at + 1 : at + 5], "big")
                values.append(BV.FromString(data[at + 5 : at + 5 + length]).value)
                at += 5 + length
            return values
    raise AssertionError("the connection closed before the call ended")


def _padded(payload: bytes, pad: int) -> bytes:
    return bytes([pad]) + payload + b"\x00" * pad


async def test_messages_split_at_every_offset_arrive_whole(served) -> None:
    """Two messages over two or three DATA frames (padded or not), cut at every offset
    of the first: each answered with its exact bytes."""
    raw = await Raw.connect(served[0])
    await raw.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 30)))  # for the answers
    first = message(BV(value=pattern(300)).SerializeToString())
    second = message(BV(value=b"after").SerializeToString())
    wire = first + second
    sid = 1
    for cut in range(1, len(first) + 6):
        pieces = [wire[:cut], wire[cut : cut + 7], wire[cut + 7 :]]
        frames = frame(HEADERS, END_HEADERS, sid, raw.block(ECHO))
        for i, piece in enumerate(pieces):
            flags = END_STREAM if i == len(pieces) - 1 else 0
            if cut % 2:
                frames += frame(DATA, flags | PADDED, sid, _padded(piece, cut % 5))
            else:
                frames += frame(DATA, flags, sid, piece)
        await raw.send(frames)
        assert await _echoed(raw, sid) == [pattern(300), b"after"], cut
        sid += 2
    await raw.close()


async def test_what_a_stream_keeps_of_a_split_message_is_bytes_not_a_view(served) -> None:
    """A whole message and the start of another in one frame: the handler got the
    first; the stream holds the rest as bytes of its own, not a view that would keep
    the whole read alive."""
    port, calls, server = served
    raw = await Raw.connect(port)
    whole = message(BV(value=b"first").SerializeToString())
    start = message(BV(value=b"x" * 5000).SerializeToString())[:1000]
    await raw.send(
        frame(HEADERS, END_HEADERS, 1, raw.block(HANG)) + frame(DATA, 0, 1, whole + start)
    )
    await asyncio.wait_for(calls.started.wait(), 60)
    (conn,) = server.connections
    assert await _pieces(conn, 1) == [bytes] and conn.streams[1].partial[0] == start
    await raw.send(frame(DATA, 0, 1, b"y" * 2000))  # still short of the message
    assert await _pieces(conn, 2) == [bytes, bytes]
    await raw.close()


async def _pieces(conn, n: int) -> list[type]:
    """The types of what stream 1 holds of its message, once it holds `n` pieces."""
    for _ in range(1000):
        if 1 in conn.streams and len(conn.streams[1].partial) >= n:
            break
        await asyncio.sleep(0.01)
    return [type(piece) for piece in conn.streams[1].partial]


async def test_a_header_block_a_byte_per_continuation_frame(served) -> None:
    raw = await Raw.connect(served[0])
    block = raw.block(ECHO)
    wire = frame(HEADERS, 0, 1, block[:1])
    wire += b"".join(frame(CONTINUATION, 0, 1, block[i : i + 1]) for i in range(1, len(block)))
    wire += frame(CONTINUATION, END_HEADERS, 1, b"")
    wire += frame(DATA, END_STREAM, 1, message(BV(value=b"ok").SerializeToString()))
    await raw.send(wire)
    assert await _echoed(raw, 1) == [b"ok"]
    await raw.close()
