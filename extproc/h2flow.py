"""The sending half of `extproc.h2grpc.Connection`: flow control toward the peer, stream
ends, one write per loop turn, and the back-pressure that bounds what a peer can make us
hold (reading pauses while the peer does not read, or the handlers lag behind).

A mixin, so the connection's hot path stays plain attribute access on one object.
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

from extproc.h2frames import (
    ACK,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    RESPONSE_HEADERS,
    RST_STREAM,
    SETTINGS,
    ProtocolError,
    Trailers,
    frame,
    grpc_trailers,
)

if TYPE_CHECKING:
    from extproc.h2grpc import Server
    from extproc.h2stream import Stream

_WINDOW = struct.Struct(">L")
_PREFIX = struct.Struct(">BL")
_DATA_MESSAGE = struct.Struct(">BHBBLBL")  # a DATA frame's head, then the message's prefix
MAX_QUEUED = 64 << 20  # input parsed, not yet read by handlers: past it, reading pauses


class Sender:
    """Flow control both ways' sending side; `Connection` supplies the state."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None
    server: Server
    streams: dict[int, Stream]
    blocked: dict[int, Stream]
    out: list[bytes]
    flush_due: bool
    peer_window: int
    peer_frame: int
    send_window: int
    queued: int
    write_paused: bool
    read_paused: bool
    closing: bool
    written: asyncio.Future

    def send_message(self, stream: Stream, payload: bytes) -> None:
        if not stream.headers_sent:
            stream.headers_sent = True
            self._emit_soon(frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS))
        n = len(payload)
        size = n + 5
        if (
            not stream.backlog
            and size <= self.peer_frame
            and size <= stream.send_window
            and size <= self.send_window
        ):  # the usual case: one frame, its head and the prefix packed at once
            stream.send_window -= size
            self.send_window -= size
            head = _DATA_MESSAGE.pack(size >> 16, size & 0xFFFF, DATA, 0, stream.id, 0, n)
            self._emit_soon(head + payload)
            return
        stream.backlog.append(_PREFIX.pack(0, n) + payload)
        self._push(stream)

    def _finish(self, stream: Stream, code: int, why: str) -> None:
        """The handler returned: trailers (after any DATA still waiting for window)."""
        if stream.done or self.closing:
            self._close_stream(stream)
            return
        trailers = grpc_trailers(code, why, with_headers=not stream.headers_sent)
        stream.headers_sent = True
        if stream.backlog:
            stream.backlog.append(Trailers(trailers))  # type: ignore[arg-type]
            return
        self._end(stream, trailers)

    def _end(self, stream: Stream, trailers: bytes) -> None:
        stream.done = True
        self._emit_soon(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, trailers))
        if not stream.half_closed:  # we answered before Envoy ended its side: stop it
            self._emit_soon(frame(RST_STREAM, 0, stream.id, _WINDOW.pack(0)))
        self._close_stream(stream)
        if self.server.stopping and not self.streams:
            self._emit_soon(b"")  # the flush closes a drained connection

    def _close_stream(self, stream: Stream) -> None:
        """Forget a stream: what its inbox held no longer counts against reading."""
        self.streams.pop(stream.id, None)
        self.blocked.pop(stream.id, None)
        if stream.queued:
            self.queued -= stream.forget_input()
            if self.read_paused:
                self.reading()

    def _push(self, stream: Stream) -> None:
        """Send what the windows allow of one stream's backlog; it stays in `blocked`
        while it has more. Work per call is what is sent, not the number of streams."""
        backlog = stream.backlog
        while backlog:
            item = backlog[0]
            if isinstance(item, Trailers):  # not flow-controlled
                backlog.popleft()
                self._end(stream, item.block)
                return
            size = min(len(item), self.peer_frame, stream.send_window, self.send_window)
            if size <= 0:
                break
            self._emit_soon(frame(DATA, 0, stream.id, item[:size]))
            stream.send_window -= size
            self.send_window -= size
            if size == len(item):
                backlog.popleft()
            else:
                backlog[0] = item[size:]
        if backlog:
            self.blocked[stream.id] = stream
        else:
            self.blocked.pop(stream.id, None)

    def _drain(self) -> None:
        """The connection's window grew: blocked streams send, in turn, until it is
        spent; one waiting for its own window is skipped."""
        for stream in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            if stream.send_window > 0:
                self.blocked.pop(stream.id, None)
                self._push(stream)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE of a wrong size", 6)
        grow = _WINDOW.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += grow
            if self.blocked:
                self._drain()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.send_window += grow
            if stream.backlog:
                self._push(stream)  # only this stream: its window is the one that grew

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError("SETTINGS of a wrong size", 6)
        window = self.peer_window
        for at in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, at)
            if key == 4:  # INITIAL_WINDOW_SIZE
                if value > 0x7FFFFFFF:
                    raise ProtocolError("initial window over 2^31-1", 3)
                window = value
            elif key == 5:  # MAX_FRAME_SIZE
                if not 16384 <= value <= 16777215:
                    raise ProtocolError("max frame size out of range")
                self.peer_frame = value
        delta, self.peer_window = window - self.peer_window, window
        if delta:  # applies to open streams as a delta, once per frame (RFC 9113 6.9.2)
            for stream in self.streams.values():
                stream.send_window += delta
        self._emit_soon(frame(SETTINGS, ACK, 0, b""))
        if delta > 0 and self.blocked:
            self._drain()

    # ------------------------------------------------------------- back-pressure

    def pause_writing(self) -> None:
        """The peer does not read: stop reading it, so it cannot make us queue answers,
        PING or SETTINGS acknowledgements without bound."""
        self.write_paused = True
        self.reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.reading()

    def reading(self) -> None:
        """Pause or resume reading the socket: paused while the peer does not read or
        the handlers' inboxes hold more than MAX_QUEUED (resumed at half)."""
        limit = MAX_QUEUED // 2 if self.read_paused else MAX_QUEUED
        stop = self.write_paused or self.queued > limit
        transport = self.transport
        if stop == self.read_paused or transport is None or transport.is_closing():
            return
        self.read_paused = stop
        if stop:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # ------------------------------------------------------------------ writing

    def _emit_soon(self, data: bytes) -> None:
        """Everything one loop turn sends leaves in one write (one syscall for many
        streams' answers)."""
        if data:
            self.out.append(data)
        if not self.flush_due:
            self.flush_due = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_due = False
        transport = self.transport
        if transport is None or transport.is_closing():
            self.out.clear()
            return
        if self.out:
            out = self.out
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.server.stopping and not self.streams:
            transport.close()
