"""A lean gRPC server over HTTP/2 in one asyncio Protocol: the sidecar's own transport.

Why not grpc.aio: through Envoy, grpc.aio's machinery (one batch, one completion queue
event, one wake-up of the loop per message, its Cython and core layers) is most of the
CPU a do-nothing ext_proc server spends per message (docs/performance.md, issue 14).
This server does what Envoy's ext_proc and health-check streams need and nothing else:
HTTP/2 framing, flow control both ways, HPACK (the `hpack` library), length-prefixed
gRPC messages, trailers. Per message: one slice of the socket's bytes, one protobuf
parse, a future's result for the stream's reader; answers of one loop turn leave in one
write.

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
from collections import deque

import hpack

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
    RESPONSE_HEADERS,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ProtocolError,
    Trailers,
    frame,
    grpc_trailers,
    local_settings,
    unpad,
)
from extproc.h2stream import Abort, Method, Stream, StreamEnded

log = logging.getLogger("extproc.h2grpc")

MAX_MESSAGE = 64 << 20  # grpc.max_receive_message_length, as grpc.aio was set
STREAM_WINDOW = 1 << 24  # what each stream may send before our WINDOW_UPDATE
CONNECTION_WINDOW = 1 << 30
MAX_FRAME = 1 << 20  # the largest frame we accept (advertised)
MAX_STREAMS = 10000
_HEAD = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_WINDOW = struct.Struct(">L")
_PREFIX = struct.Struct(">BL")  # gRPC message: compressed flag, length

# gRPC status codes the server sends.
OK, UNKNOWN, RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAVAILABLE, INTERNAL = 0, 2, 8, 12, 14, 13


class Connection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy (it multiplexes every ext_proc stream of one of
    its workers over it)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # the start of a frame still arriving
        self.need = 0  # how many bytes `buf` must hold before it is parsed again
        self.preface = False
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self.streams: dict[int, Stream] = {}
        self.last_id = 0
        self.peer_window = 65535  # SETTINGS_INITIAL_WINDOW_SIZE of the peer
        self.peer_frame = 16384
        self.send_window = 65535  # the connection's, for what we send
        self.recv_unacked = 0
        self.out: list[bytes] = []
        self.flush_due = False
        self.blocked: deque[Stream] = deque()  # streams with a backlog
        self.headers_for = 0  # a header block in progress (CONTINUATION) for this stream
        self.header_block = b""
        self.header_flags = 0
        self.closing = False

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        settings = local_settings(MAX_STREAMS, STREAM_WINDOW, MAX_FRAME)
        grow = _WINDOW.pack(CONNECTION_WINDOW - 65535)
        self._emit(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, grow))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        for stream in list(self.streams.values()):
            stream.reset()
        self.streams.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        buf = self.buf
        if buf:  # a frame was arriving: add to it, parse only once it is whole
            buf += data
            if len(buf) < self.need:
                return  # O(1) per read however finely a large frame is dribbled
            data = bytes(buf)
            buf.clear()
        try:
            at, end = 0, len(data)
            if not self.preface:
                if end < len(PREFACE):
                    if not PREFACE.startswith(data):
                        raise ProtocolError("not an HTTP/2 client preface")
                    buf += data
                    self.need = len(PREFACE)
                    return
                if not data.startswith(PREFACE):
                    raise ProtocolError("not an HTTP/2 client preface")
                self.preface = True
                at = len(PREFACE)
            need = 9
            while end - at >= 9:
                high, low, kind, flags, stream_id = _HEAD.unpack_from(data, at)
                length = high << 16 | low
                if length > MAX_FRAME:
                    raise ProtocolError(f"frame of {length} bytes over {MAX_FRAME}", 6)
                if end - at - 9 < length:
                    need = 9 + length
                    break
                payload = data[at + 9 : at + 9 + length]
                at += 9 + length
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
            if at < end and not self.closing:
                buf += data[at:]
                self.need = need
        except ProtocolError as exc:
            self._fail(exc)
        if self.recv_unacked >= CONNECTION_WINDOW // 2:
            self._emit(frame(WINDOW_UPDATE, 0, 0, _WINDOW.pack(self.recv_unacked)))
            self.recv_unacked = 0

    def eof_received(self) -> bool:
        return False

    # --------------------------------------------------------------- the frames

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.headers_for and kind != CONTINUATION:
            raise ProtocolError("a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            if stream_id == 0:
                raise ProtocolError("HEADERS on stream 0")
            if flags & PADDED:
                payload = unpad(payload)
            if flags & PRIORITY_FLAG:
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
            if not flags & ACK:
                self._emit(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                stream.reset()
        elif kind == GOAWAY:
            self.closing_requested()
        # PRIORITY, PUSH_PROMISE (never sent to a server), unknown types: ignored

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self.recv_unacked += len(payload)  # counted for a closed stream too
        stream = self.streams.get(stream_id)
        if stream is None or stream.half_closed:
            return  # a stream that ended or was reset: its bytes are dropped
        if flags & PADDED:
            payload = unpad(payload)
        stream.recv_unacked += len(payload)
        partial = stream.partial
        if partial:  # a message was arriving: add to it, parse only once it is whole
            partial += payload
            data = b""
            if len(partial) >= stream.need:
                data = bytes(partial)
                partial.clear()
        else:
            data = payload
        at, end = 0, len(data)
        parse, deliver = stream.method.parse, stream.deliver
        need = 5
        while end - at >= 5:
            compressed, length = _PREFIX.unpack_from(data, at)
            if length > MAX_MESSAGE:  # refused before any of it is kept
                self._refuse(stream, RESOURCE_EXHAUSTED, "message larger than 64 MiB")
                return
            if end - at - 5 < length:
                need = 5 + length
                break
            if compressed:
                self._refuse(stream, INTERNAL, "compressed messages are not accepted")
                return
            try:
                message = parse(data[at + 5 : at + 5 + length])
            except Exception:
                self._refuse(stream, INTERNAL, "the message does not parse")
                return
            at += 5 + length
            deliver(message)
        if at < end:
            partial += data[at:]
            stream.need = need
        if stream.recv_unacked >= STREAM_WINDOW // 2 and not flags & END_STREAM:
            self._emit(frame(WINDOW_UPDATE, 0, stream_id, _WINDOW.pack(stream.recv_unacked)))
            stream.recv_unacked = 0
        if flags & END_STREAM:
            stream.end_input()

    def _header_fragment(self, stream_id: int, fragment: bytes, last: int) -> None:
        block = self.header_block + fragment if self.header_block else fragment
        if len(block) > MAX_HEADER_BLOCK:
            raise ProtocolError("header block over the limit", 11)
        if not last:
            self.headers_for, self.header_block = stream_id, block
            return
        self.headers_for, self.header_block = 0, b""
        try:
            headers = self.decoder.decode(block, raw=True)
        except Exception as exc:  # hpack's errors: the connection's table is lost
            raise ProtocolError(f"header block does not decode: {exc}", 9) from exc
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client
            if self.header_flags & END_STREAM:
                stream.end_input()
            return
        if stream_id <= self.last_id or not stream_id & 1:
            if stream_id <= self.last_id:
                return  # trailers of a stream we already ended: nothing to do
            raise ProtocolError("a client stream id must be odd")
        self.last_id = stream_id
        self._open(stream_id, headers)

    def _open(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        path = b""
        metadata = []
        for name, value in headers:
            if name == b":path":
                path = value
            elif not name.startswith(b":") and name not in (b"content-type", b"te"):
                metadata.append((name.decode("latin-1"), value.decode("latin-1")))
        method = self.server.methods.get(path)
        ended = bool(self.header_flags & END_STREAM)
        if method is None or self.closing or self.server.stopping:
            code, why = (UNIMPLEMENTED, "unknown method") if method is None else (
                UNAVAILABLE, "the server is shutting down")  # fmt: skip
            self._emit(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, grpc_trailers(
                code, why, with_headers=True)))  # fmt: skip
            if not ended:
                self._emit(frame(RST_STREAM, 0, stream_id, _WINDOW.pack(0)))
            return
        if len(self.streams) >= MAX_STREAMS:
            self._emit(frame(RST_STREAM, 0, stream_id, _WINDOW.pack(7)))  # REFUSED_STREAM
            return
        stream = Stream(self, stream_id, method, tuple(metadata))
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

    # ------------------------------------------------------------------ sending

    def send_message(self, stream: Stream, payload: bytes) -> None:
        if not stream.headers_sent:
            stream.headers_sent = True
            self._emit_soon(frame(HEADERS, END_HEADERS, stream.id, RESPONSE_HEADERS))
        data = _PREFIX.pack(0, len(payload)) + payload
        size = len(data)
        if (
            not stream.backlog
            and size <= self.peer_frame
            and size <= stream.send_window
            and size <= self.send_window
        ):
            stream.send_window -= size
            self.send_window -= size
            self._emit_soon(frame(DATA, 0, stream.id, data))
            return
        if not stream.backlog:
            self.blocked.append(stream)
        stream.backlog.append(data)
        self._drain()

    def _finish(self, stream: Stream, code: int, why: str) -> None:
        """The handler returned: trailers (after any DATA still waiting for window)."""
        if stream.done or self.closing:
            self.streams.pop(stream.id, None)
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
        self.streams.pop(stream.id, None)
        if self.server.stopping and not self.streams:
            self._emit_soon(b"")  # the flush closes a drained connection

    def _drain(self) -> None:
        """Send what the peer's windows now allow, stream by stream in order; a stream
        whose own window is spent waits without holding up the others."""
        waiting: deque[Stream] = deque()
        blocked = self.blocked
        while blocked:
            stream = blocked.popleft()
            backlog = stream.backlog
            while backlog:
                item = backlog[0]
                if isinstance(item, Trailers):  # not flow-controlled
                    backlog.popleft()
                    self._end(stream, item.block)
                    break
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
                waiting.append(stream)
        self.blocked = waiting

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE of a wrong size", 6)
        grow = _WINDOW.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += grow
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            stream.send_window += grow
        if self.blocked:
            self._drain()

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError("SETTINGS of a wrong size", 6)
        for at in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, at)
            if key == 4:  # INITIAL_WINDOW_SIZE: applies to open streams as a delta
                if value > 0x7FFFFFFF:
                    raise ProtocolError("initial window over 2^31-1", 3)
                delta, self.peer_window = value - self.peer_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == 5:  # MAX_FRAME_SIZE
                if not 16384 <= value <= 16777215:
                    raise ProtocolError("max frame size out of range")
                self.peer_frame = value
        self._emit(frame(SETTINGS, ACK, 0, b""))
        if self.blocked:
            self._drain()

    def _refuse(self, stream: Stream, code: int, why: str) -> None:
        log.warning("gRPC stream %d refused: %s", stream.id, why)
        self.streams.pop(stream.id, None)
        stream.reset()
        self._emit(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, grpc_trailers(
            code, why, with_headers=not stream.headers_sent)))  # fmt: skip
        self._emit(frame(RST_STREAM, 0, stream.id, _WINDOW.pack(0)))

    def _fail(self, exc: ProtocolError) -> None:
        log.warning("HTTP/2 connection from Envoy closed: %s", exc)
        self._emit(frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_id, exc.code)))
        self.closing = True
        if self.transport is not None:
            self.transport.close()
        self.connection_lost(None)

    def closing_requested(self) -> None:
        """The peer's GOAWAY: open streams finish; the peer closes the connection."""

    def go_away(self) -> None:
        """Shutdown: no new stream on this connection; those open finish."""
        self._emit(frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_id, 0)))
        if not self.streams and self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ writing

    def _emit(self, data: bytes) -> None:
        self._emit_soon(data)

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
