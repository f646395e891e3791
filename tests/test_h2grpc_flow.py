"""extproc.h2grpc driven by the `h2` library as a raw client, for what grpcio will not
do: tiny and changing windows, padding, PRIORITY, PING, unknown frames, messages split
over frames or packed in one. `h2` checks the server's side: it raises on a DATA frame
over the window it advertised."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tests.h2_helpers import (
    BV,
    Calls,
    health_check,
    message,
    pattern,
    request_headers,
    running_server,
)


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Calls]]:
    async with running_server() as (port, calls, _server):
        yield port, calls


class Client:
    """An `h2` connection on asyncio streams; DATA is acknowledged only when told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.data: dict[int, bytearray] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.trailers: dict[int, dict[str, str]] = {}  # all headers, once the stream ended
        self.events: list[h2.events.Event] = []
        self.ack = True

    @classmethod
    async def connect(cls, port: int, settings: dict[int, int] | None = None) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        client.conn.local_settings = h2.settings.Settings(
            client=True, initial_values=settings or {}
        )
        client.conn.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def settings(self, values: dict[int, int]) -> None:
        """SETTINGS, and wait for the server's ACK of it (frames before it are read)."""
        acks = lambda: sum(isinstance(e, h2.events.SettingsAcknowledged) for e in self.events)  # noqa: E731
        before = acks()
        self.conn.update_settings(values)
        await self.flush()
        await self.pump(lambda: acks() > before)

    def start(self, path: str) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, request_headers(path))
        self.data[sid] = bytearray()
        return sid

    async def pump(self, until: Callable[[], object]) -> None:
        """Read and handle frames until `until()` holds."""
        while not until():
            chunk = await asyncio.wait_for(self.reader.read(65536), 60)
            assert chunk, "the server closed the connection"
            for event in self.conn.receive_data(chunk):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.data[event.stream_id] += event.data
                    if self.ack:
                        self.conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    self.headers.setdefault(event.stream_id, {}).update(event.headers)
                elif isinstance(event, h2.events.StreamEnded):  # trailers, or trailers-only
                    self.trailers[event.stream_id] = self.headers.get(event.stream_id, {})
            await self.flush()

    def messages(self, sid: int) -> list[bytes]:
        data, out = bytes(self.data[sid]), []
        while data:
            n = int.from_bytes(data[1:5], "big")
            out.append(BV.FromString(data[5 : 5 + n]).value)
            data = data[5 + n :]
        return out

    async def close(self) -> None:
        self.writer.close()


async def test_tiny_peer_window_large_answer_arrives_whole_and_in_order(served) -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE 100: the server sends 100 bytes, waits for our
    WINDOW_UPDATE, sends the next (h2 would raise on a frame over the window)."""
    port, _calls = served
    client = await Client.connect(port, {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    sid = client.start("/t.T/Big")
    client.conn.send_data(sid, message(BV(value=b"200000").SerializeToString()), end_stream=True)
    await client.flush()
    await client.pump(lambda: sid in client.trailers)
    assert client.messages(sid) == [pattern(200000)]
    assert client.trailers[sid]["grpc-status"] == "0"
    sizes = [len(e.data) for e in client.events if isinstance(e, h2.events.DataReceived)]
    assert max(sizes) <= 100 and len(sizes) > 2000
    await client.close()
    assert await health_check(port) == 1


async def test_window_changes_on_open_streams_apply_as_deltas_even_below_zero(served) -> None:
    """Window 1000, answer of 5000 bytes: 1000 arrive; SETTINGS to 0 makes the open
    stream's window -1000 (RFC 9113 6.9.2); +1000 on the stream leaves it at 0 (nothing
    sent); SETTINGS back to 1000 lets 1000 more through; +∞ ends it."""
    port, _calls = served
    window = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
    client = await Client.connect(port, {window: 1000})
    client.ack = False
    sid = client.start("/t.T/Big")
    client.conn.send_data(sid, message(BV(value=b"5000").SerializeToString()), end_stream=True)
    await client.flush()
    await client.pump(lambda: len(client.data[sid]) == 1000)
    await client.settings({window: 0})
    client.conn.increment_flow_control_window(1000, sid)
    await client.settings({window: 0})  # a second SETTINGS: its ACK orders the test
    assert len(client.data[sid]) == 1000  # the window was -1000 + 1000 = 0
    await client.settings({window: 1000})
    await client.pump(lambda: len(client.data[sid]) == 2000)
    client.conn.increment_flow_control_window(1 << 20, sid)
    client.conn.increment_flow_control_window(1 << 20)
    await client.flush()
    client.ack = True
    await client.pump(lambda: sid in client.trailers)
    assert client.messages(sid) == [pattern(5000)]
    await client.close()


async def test_padded_data_and_priority_headers(served) -> None:
    port, _calls = served
    client = await Client.connect(port)
    sid = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, request_headers("/t.T/Echo"), priority_weight=200)
    client.data[sid] = bytearray()
    body = message(BV(value=b"padded").SerializeToString())
    client.conn.send_data(sid, body[:3], pad_length=255)
    client.conn.send_data(sid, body[3:], pad_length=7, end_stream=True)
    await client.flush()
    await client.pump(lambda: sid in client.trailers)
    assert client.messages(sid) == [b"padded"]
    await client.close()


async def test_several_messages_in_one_frame_and_one_message_over_many(served) -> None:
    port, _calls = served
    client = await Client.connect(port)
    sid = client.start("/t.T/Echo")
    packed = b"".join(message(BV(value=b"m%d" % i).SerializeToString()) for i in range(50))
    client.conn.send_data(sid, packed)
    long = message(BV(value=pattern(3000)).SerializeToString())
    for i in range(len(long)):  # one byte a frame, prefix included
        client.conn.send_data(sid, long[i : i + 1])
    client.conn.send_data(sid, b"", end_stream=True)
    await client.flush()
    await client.pump(lambda: sid in client.trailers)
    assert client.messages(sid) == [b"m%d" % i for i in range(50)] + [pattern(3000)]
    assert client.trailers[sid]["grpc-status"] == "0"
    await client.close()


async def test_ping_is_acknowledged_with_its_payload(served) -> None:
    port, _calls = served
    client = await Client.connect(port)
    client.conn.ping(b"8 bytes!")
    await client.flush()
    pongs = lambda: [e for e in client.events if isinstance(e, h2.events.PingAckReceived)]  # noqa: E731
    await client.pump(lambda: pongs())
    assert pongs()[0].ping_data == b"8 bytes!"
    await client.close()


async def test_a_stream_ended_inside_a_message_is_an_error(served) -> None:
    port, _calls = served
    client = await Client.connect(port)
    sid = client.start("/t.T/Echo")
    whole, cut = (message(BV(value=v).SerializeToString()) for v in (b"whole", b"cut short"))
    client.conn.send_data(sid, whole + cut[:7], end_stream=True)
    await client.flush()
    await client.pump(lambda: sid in client.trailers)
    assert client.trailers[sid]["grpc-status"] == "13"
    assert client.trailers[sid]["grpc-message"] == "the stream ended inside a message"
    await client.close()
