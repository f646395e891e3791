"""One gRPC call of `extproc.h2grpc`: what a handler reads and writes.

The part of grpc.aio's `ServicerContext` the sidecar uses (`read`, `write`,
`invocation_metadata`), with its meaning: `read()` returns `EOF` once the client
half-closed, a reset cancels the handler's task.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from extproc.h2flow import MAX_QUEUED

if TYPE_CHECKING:
    from extproc.h2grpc import Connection


class StreamEnded(Exception):
    """Raised by `read()`/`write()` once Envoy reset the stream or the connection went."""


class Abort(Exception):
    """Raised by a handler to end its call with a gRPC status other than OK."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Eof:
    __slots__ = ()

    def __repr__(self) -> str:
        return "EOF"


EOF = _Eof()

_OVERHEAD = 256  # what a queued message costs beyond its bytes (a protobuf object)


def _ready(loop: asyncio.AbstractEventLoop, value: Any) -> asyncio.Future:
    future = loop.create_future()
    future.set_result(value)
    return future


# A method: how to parse its messages and the handler that runs once per stream.
Handler = Callable[["Stream"], Awaitable[None]]


class Method:
    """`parse` gets each message as a view of the socket's bytes, valid during the call
    only (upb's `FromString` copies what it keeps)."""

    __slots__ = ("handler", "parse")

    def __init__(self, parse: Callable[[memoryview], Any], handler: Handler) -> None:
        self.parse = parse
        self.handler = handler


class Stream:
    """One gRPC call: what the handler reads and writes (grpc.aio's `context`, the
    part the sidecar uses)."""

    __slots__ = ("_conn", "_inbox", "_waiter", "backlog", "done", "half_closed",
                 "headers_sent", "id", "metadata", "method", "need", "partial", "queued",
                 "recv_unacked", "send_window", "task")  # fmt: skip

    def __init__(self, conn: Connection, stream_id: int, method: Method, metadata: tuple) -> None:
        self._conn = conn
        self.id = stream_id
        self.method = method
        self.metadata = metadata
        self._inbox: deque[tuple[Any, int]] = deque()  # (message, what it counts)
        self.queued = 0  # what the inbox counts against the connection's MAX_QUEUED
        self._waiter: asyncio.Future | None = None
        self.partial: list[bytes] = []  # the start of a message split over DATA frames
        self.need = 0  # the bytes it still lacks
        self.send_window = conn.peer_window
        self.backlog: deque[bytes] = deque()  # DATA waiting for the peer's window
        self.headers_sent = False
        self.half_closed = False  # the client sent END_STREAM
        self.done = False  # trailers queued or the stream reset: nothing more is sent
        self.task: asyncio.Task | None = None
        self.recv_unacked = 0

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def read(self) -> asyncio.Future:
        """The next message, `EOF` after the client's half-close: a future to await (a
        plain method, not a coroutine: one object and one frame less per message)."""
        if self._inbox:
            message, size = self._inbox.popleft()
            self.queued -= size
            conn = self._conn
            conn.queued -= size
            if conn.read_paused:
                conn.reading()
            return _ready(conn.loop, message)
        if self.half_closed:
            return _ready(self._conn.loop, EOF)
        if self.done:
            raise StreamEnded("stream reset")
        waiter = self._waiter = self._conn.loop.create_future()
        return waiter

    def write(self, message: Any) -> Awaitable[None]:
        """Queues one message; never waits (what the peer's windows hold back waits in the
        stream's backlog, and a peer that does not read stops our reading)."""
        if self.done:
            raise StreamEnded("stream reset")
        conn = self._conn
        conn.send_message(self, message.SerializeToString())
        return conn.written

    # ---------------------------------------------------------- from the connection

    def deliver(self, message: Any, length: int) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(message)
                return
        size = length + _OVERHEAD  # a parsed message costs more than its bytes
        self._inbox.append((message, size))
        self.queued += size
        conn = self._conn
        conn.queued += size
        if conn.queued > MAX_QUEUED:
            conn.reading()

    def forget_input(self) -> int:
        """The stream is gone: its unread messages are dropped; what they counted."""
        queued, self.queued = self.queued, 0
        self._inbox.clear()
        return queued

    def end_input(self) -> None:
        self.half_closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(EOF)

    def reset(self) -> None:
        """Envoy reset the stream (or the connection is gone): the handler is cancelled,
        as grpc.aio cancels it."""
        self.done = True
        self.backlog.clear()
        self.partial = []
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_exception(StreamEnded("stream reset"))
        if self.task is not None and not self.task.done():
            self.task.cancel()
