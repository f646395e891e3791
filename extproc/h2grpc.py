"""A lean gRPC server over HTTP/2 in one asyncio Protocol: the sidecar's own transport.

Why not grpc.aio: through Envoy, grpc.aio's machinery (one batch, one completion queue
event, one wake-up of the loop per message, its Cython and core layers) is most of the
CPU a do-nothing ext_proc server spends per message (docs/performance.md, issue 14).
This server does what Envoy's ext_proc and health-check streams need and nothing else:
HTTP/2 framing, flow control both ways, HPACK (the `hpack` library; repeated blocks from
a cache, `extproc.h2headers`), length-prefixed gRPC messages, trailers. Per message:
one slice of the socket's bytes, one protobuf parse, a future's result for the stream's
reader; answers of one loop turn leave in one write.

Semantics follow grpc.aio where the servicer sees them: `read()` returns `EOF` at the
client's half-close, `write()` sends one message, a RST_STREAM from Envoy cancels the
handler's task, the handler's return sends `grpc-status: 0`, an exception `13`.
A malformed connection (bad preface, a frame over the size we allow, a header block
over the limit, a stream id that goes backwards) is answered with GOAWAY and closed: it
never stalls a worker or grows without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

from extproc.h2flow import Sender
from extproc.h2frames import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_HEADER_BLOCK,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ProtocolError,
    frame,
    grpc_trailers,
    local_settings,
    unpad,
)
from extproc.h2headers import Head, HeaderDecoder
from extproc.h2stream import Abort, Method, Stream, StreamEnded

log = logging.getLogger("extproc.h2grpc")

MAX_MESSAGE = 64 << 20  # grpc.max_receive_message_length, as grpc.aio was set
STREAM_WINDOW = 1 << 24  # what each stream may send before our WINDOW_UPDATE
CONNECTION_WINDOW = 1 << 30
MAX_FRAME = 1 << 20  # the largest frame we accept (advertised)
MAX_STREAMS = 10000
LINGER = 1.0  # seconds a failed connection stays half-open for its GOAWAY to arrive
_HEAD = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_WINDOW = struct.Struct(">L")
_PREFIX = struct.Struct(">BL")  # gRPC message: compressed flag, length

# gRPC status codes the server sends.
OK, UNKNOWN, RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAVAILABLE, INTERNAL = 0, 2, 8, 12, 14, 13


class Connection(Sender, asyncio.Protocol):
    """One HTTP/2 connection from Envoy (it multiplexes every ext_proc stream of one of
    its workers over it)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []  # the start of a frame still short by `need` bytes
        self.need = 0
        self.preface = False
        self.decoder = HeaderDecoder(MAX_HEADER_BLOCK)
        self.streams: dict[int, Stream] = {}
        self.last_id = 0
        self.peer_window = 65535  # SETTINGS_INITIAL_WINDOW_SIZE of the peer
        self.peer_frame = 16384
        self.send_window = 65535  # the connection's, for what we send
        self.recv_unacked = 0
        self.out: list[bytes] = []
        self.flush_due = False
        self.blocked: dict[int, Stream] = {}  # streams with DATA waiting for window
        self.headers_for = 0  # a header block in progress (CONTINUATION) for this stream
        self.header_parts: list[bytes] = []  # its fragments so far, and their bytes
        self.header_size = 0
        self.header_flags = 0
        self.closing = False
        self.queued = 0  # bytes (+ per-message overhead) waiting in the streams' inboxes
        self.write_paused = self.read_paused = False
        self.written = self.loop.create_future()  # what `Stream.write` returns: done
        self.written.set_result(None)

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        settings = local_settings(MAX_STREAMS, STREAM_WINDOW, MAX_FRAME)
        grow = _WINDOW.pack(CONNECTION_WINDOW - 65535)
        self._emit_soon(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, grow))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        for stream in list(self.streams.values()):
            stream.reset()
        self.streams.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.need:  # a frame still short: pieces are kept, joined once it is whole, so
            self.pending.append(data)  # a peer dribbling bytes costs O(n), not O(n^2)
            self.need -= len(data)
            if self.need > 0:
                return
            data, self.need = b"".join(self.pending), 0
            self.pending = []
        buf = data
        try:
            if not self.preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(buf):
                        raise ProtocolError("not an HTTP/2 client preface")
                    self.pending, self.need = [buf], len(PREFACE) - len(buf)
                    return
                if not buf.startswith(PREFACE):
                    raise ProtocolError("not an HTTP/2 client preface")
                self.preface = True
                buf = buf[len(PREFACE) :]
            at, end = 0, len(buf)
            view = memoryview(buf)  # DATA is read in place: a body is copied once, if at all
            while end - at >= 9:
                high, low, kind, flags, stream_id = _HEAD.unpack_from(buf, at)
                length = high << 16 | low
                if length > MAX_FRAME:
                    raise ProtocolError(f"frame of {length} bytes over {MAX_FRAME}", 6)
                if end - at - 9 < length:
                    self.need = 9 + length - (end - at)
                    break
                if kind == DATA:  # the frame of every message: one call, no dispatch
                    if self.headers_for:
                        raise ProtocolError("a header block was interrupted")
                    self._data(flags, stream_id & 0x7FFFFFFF, view[at + 9 : at + 9 + length])
                else:
                    self._frame(kind, flags, stream_id & 0x7FFFFFFF, buf[at + 9 : at + 9 + length])
                at += 9 + length
            else:
                if at < end:
                    self.need = 9 - (end - at)
            if self.need:
                self.pending = [buf[at:] if at else buf]
        except ProtocolError as exc:
            self._fail(exc)
            return
        if self.recv_unacked >= CONNECTION_WINDOW // 2:
            self._emit_soon(frame(WINDOW_UPDATE, 0, 0, _WINDOW.pack(self.recv_unacked)))
            self.recv_unacked = 0

    def eof_received(self) -> bool:
        return False

    # --------------------------------------------------------------- the frames

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        """Every frame but DATA (`_data`)."""
        if self.headers_for and kind != CONTINUATION:
            raise ProtocolError("a header block was interrupted")
        if kind == HEADERS:
            if stream_id == 0:
                raise ProtocolError("HEADERS on stream 0")
            if flags & PADDED:
                payload = unpad(payload)
            if flags & PRIORITY_FLAG:
                if len(payload) < 5:
                    raise ProtocolError("HEADERS too short for its priority", 6)
                payload = payload[5:]
            self.header_flags = flags
            self._header_fragment(stream_id, payload, flags & END_HEADERS)
        elif kind == CONTINUATION:
            if stream_id != self.headers_for or not stream_id:
                raise ProtocolError("CONTINUATION without its HEADERS")
            self._header_fragment(stream_id, payload, flags & END_HEADERS)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == PING:
            if len(payload) != 8:
                raise ProtocolError("PING of a wrong size", 6)
            if not flags & ACK:
                self._emit_soon(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                self._close_stream(stream)
                stream.reset()
        elif kind == GOAWAY:
            self.closing_requested()
        # PRIORITY, PUSH_PROMISE (never sent to a server), unknown types: ignored

    def _data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        """`payload` is a view of the socket's bytes, valid during this call only: what
        is kept past it is copied (a view kept would hold the whole read)."""
        self.recv_unacked += len(payload)  # counted for a closed stream too
        stream = self.streams.get(stream_id)
        if stream is None or stream.half_closed:
            return  # a stream that ended or was reset: its bytes are dropped
        stream.recv_unacked += len(payload)  # padding counts against its window too
        if flags & PADDED:
            payload = unpad(payload)
        data = payload
        if stream.need:  # a message split over frames: pieces joined once, when whole
            stream.need -= len(payload)
            if stream.need > 0:
                stream.partial.append(bytes(payload))
                self._data_short(stream, flags)
                return
            stream.partial.append(payload)
            data, stream.need = memoryview(b"".join(stream.partial)), 0
            stream.partial = []
        at, end = 0, len(data)
        parse, deliver = stream.method.parse, stream.deliver
        while end - at >= 5:
            compressed, length = _PREFIX.unpack_from(data, at)
            if length > MAX_MESSAGE:
                self._refuse(stream, RESOURCE_EXHAUSTED, "message larger than 64 MiB")
                return
            if compressed:  # refused at once, before its bytes are buffered
                self._refuse(stream, INTERNAL, "compressed messages are not accepted")
                return
            if end - at - 5 < length:
                break
            try:
                message = parse(data[at + 5 : at + 5 + length])
            except Exception:
                self._refuse(stream, INTERNAL, "the message does not parse")
                return
            at += 5 + length
            deliver(message, length)
        if at < end:
            stream.partial = [bytes(data[at:])]
            stream.need = 5 + length - (end - at) if end - at >= 5 else 5 - (end - at)
        if stream.recv_unacked >= STREAM_WINDOW // 2 and not flags & END_STREAM:
            self._emit_soon(frame(WINDOW_UPDATE, 0, stream_id, _WINDOW.pack(stream.recv_unacked)))
            stream.recv_unacked = 0
        if flags & END_STREAM:
            self._end_input(stream)

    def _data_short(self, stream: Stream, flags: int) -> None:
        """A frame that did not finish its message: window and half-close still count."""
        if stream.recv_unacked >= STREAM_WINDOW // 2 and not flags & END_STREAM:
            self._emit_soon(frame(WINDOW_UPDATE, 0, stream.id, _WINDOW.pack(stream.recv_unacked)))
            stream.recv_unacked = 0
        if flags & END_STREAM:
            self._end_input(stream)

    def _end_input(self, stream: Stream) -> None:
        if stream.need:
            self._refuse(stream, INTERNAL, "the stream ended inside a message")
        else:
            stream.end_input()

    def _header_fragment(self, stream_id: int, fragment: bytes, last: int) -> None:
        """Fragments are kept and joined once, at END_HEADERS: a block sent a byte per
        CONTINUATION costs O(n), not O(n^2)."""
        size = self.header_size + len(fragment)
        if size > MAX_HEADER_BLOCK:
            raise ProtocolError("header block over the limit", 11)
        if not last:
            self.headers_for, self.header_size = stream_id, size
            self.header_parts.append(fragment)
            return
        if self.header_parts:
            self.header_parts.append(fragment)
            block = b"".join(self.header_parts)
            self.header_parts = []
        else:
            block = fragment
        self.headers_for = self.header_size = 0
        try:
            head = self.decoder.decode(block)
        except Exception as exc:  # hpack's errors: the connection's table is lost
            raise ProtocolError(f"header block does not decode: {exc}", 9) from exc
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client
            if self.header_flags & END_STREAM and not stream.half_closed:
                self._end_input(stream)
            return
        if stream_id <= self.last_id or not stream_id & 1:
            if stream_id <= self.last_id:
                return  # trailers of a stream we already ended: nothing to do
            raise ProtocolError("a client stream id must be odd")
        self.last_id = stream_id
        self._open(stream_id, head)

    def _open(self, stream_id: int, head: Head) -> None:
        method = self.server.methods.get(head.path)
        ended = bool(self.header_flags & END_STREAM)
        if method is None or self.closing or self.server.stopping:
            code, why = (UNIMPLEMENTED, "unknown method") if method is None else (
                UNAVAILABLE, "the server is shutting down")  # fmt: skip
            self._emit_soon(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, grpc_trailers(
                code, why, with_headers=True)))  # fmt: skip
            if not ended:
                self._emit_soon(frame(RST_STREAM, 0, stream_id, _WINDOW.pack(0)))
            return
        if len(self.streams) >= MAX_STREAMS:
            self._emit_soon(frame(RST_STREAM, 0, stream_id, _WINDOW.pack(7)))  # REFUSED_STREAM
            return
        stream = Stream(self, stream_id, method, head.metadata)
        self.streams[stream_id] = stream
        if ended:
            stream.half_closed = True
        stream.task = self.loop.create_task(self._run(stream))

    async def _run(self, stream: Stream) -> None:
        code, why = OK, ""
        try:
            await stream.method.handler(stream)
        except asyncio.CancelledError:
            if not stream.done:  # cancelled by the server's shutdown, not by Envoy
                code, why = UNAVAILABLE, "the server is shutting down"
        except StreamEnded:
            pass
        except Abort as exc:
            code, why = exc.code, str(exc)
        except Exception:
            log.exception("gRPC handler failed on stream %d", stream.id)
            code, why = UNKNOWN, "internal error"
        self._finish(stream, code, why)

    def _refuse(self, stream: Stream, code: int, why: str) -> None:
        log.warning("gRPC stream %d refused: %s", stream.id, why)
        self._close_stream(stream)
        stream.reset()
        self._emit_soon(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, grpc_trailers(
            code, why, with_headers=not stream.headers_sent)))  # fmt: skip
        self._emit_soon(frame(RST_STREAM, 0, stream.id, _WINDOW.pack(0)))

    def _fail(self, exc: ProtocolError) -> None:
        """GOAWAY written now, behind what was queued (a flush after close would drop it);
        the peer's further input is dropped (`closing`)."""
        log.warning("HTTP/2 connection from Envoy closed: %s", exc)
        self.out.append(frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_id, exc.code)))
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"".join(self.out))
            if transport.can_write_eof():  # a close with unread input would be a TCP
                transport.write_eof()  # reset, and the peer could lose the GOAWAY: linger,
                self.loop.call_later(LINGER, transport.close)  # dropping what it still sends
            else:
                transport.close()
        self.out.clear()
        self.connection_lost(None)

    def closing_requested(self) -> None:
        """The peer's GOAWAY: open streams finish; the peer closes the connection."""

    def go_away(self) -> None:
        """Shutdown: no new stream on this connection; those open finish."""
        self._emit_soon(frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_id, 0)))
        if not self.streams and self.transport is not None:
            self.transport.close()


class Server:
    """Listens, dispatches by method, and shuts down like grpc.aio's `stop(grace)`."""

    def __init__(self, methods: dict[str, Method]) -> None:
        self.methods = {name.encode(): method for name, method in methods.items()}
        self.connections: set[Connection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self.stopping = False

    async def listen(self, address: str) -> None:
        """`host:port` or `unix:/path` (as grpc's `add_insecure_port`)."""
        loop = asyncio.get_running_loop()
        if address.startswith("unix:"):
            path = address[len("unix:") :].removeprefix("//")
            with contextlib.suppress(FileNotFoundError):
                import os

                os.unlink(path)
            server = await loop.create_unix_server(lambda: Connection(self), path)
        else:
            host, _, port = address.rpartition(":")
            host = host.strip("[]") or None
            server = await loop.create_server(
                lambda: Connection(self), host, int(port), reuse_address=True
            )
        self.servers.append(server)

    async def stop(self, grace: float) -> None:
        self.stopping = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.go_away()
        handlers = [
            s.task for c in self.connections for s in c.streams.values() if s.task is not None
        ]
        pending = [t for t in handlers if not t.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn._flush()
                conn.transport.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
