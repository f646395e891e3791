"""How a body travels: split at given offsets, gzip-flushed piece by piece, paced,
or cut mid-body with a reset or a clean close (the `x-mock-*` wire knobs)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import itertools
import logging
import socket
import struct
import termios
import time
import zlib
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from extproc.dev.mock.knobs import WireKnobs
from extproc.dev.mock.recording import Exchange

log = logging.getLogger("extproc.dev.mock")
# What the handler did, for the middleware's one log line (same task, same context).
NOTE: contextvars.ContextVar[str] = contextvars.ContextVar("mock_note", default="")
# Pause between the writes of an `x-mock-split` body so each travels on its own.
SPLIT_PAUSE_S = 0.005
# How long a cut waits for the kernel to send what was written before the reset.
CUT_FLUSH_TIMEOUT_S = 1.0


def split_at(body: bytes, offsets: Sequence[int]) -> list[bytes]:
    """Cut `body` at the given byte offsets (out-of-range and duplicate ones ignored)."""
    cuts = [0, *sorted({o for o in offsets if 0 < o < len(body)}), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(cuts)]


def gzip_pieces(pieces: Sequence[bytes]) -> list[bytes]:
    """One gzip stream, sync-flushed after every piece so each still decodes on arrival."""
    co = zlib.compressobj(6, zlib.DEFLATED, 31)
    if not pieces:
        return [co.flush(zlib.Z_FINISH)]
    out = []
    for i, piece in enumerate(pieces):
        mode = zlib.Z_FINISH if i == len(pieces) - 1 else zlib.Z_SYNC_FLUSH
        out.append(co.compress(piece) + co.flush(mode))
    return out


def _kernel_unsent(sock: Any) -> int:
    """Bytes the kernel still holds for this socket (Linux SIOCOUTQ); 0 if unknown."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except (OSError, AttributeError, ValueError):
        return 0
    return struct.unpack("i", buf)[0]


async def send(
    request: web.Request,
    response: web.StreamResponse,
    pieces: Sequence[bytes],
    pause: float,
    wire: WireKnobs,
    exchange: Exchange,
) -> web.StreamResponse:
    """Write `pieces` one write each; honour the cut knob; tolerate a vanished
    client, and note in `exchange` how far the body got (`bytes_written` counts
    body bytes handed to the transport, compressed if gzip)."""
    written = 0
    try:
        await response.prepare(request)
        for i, piece in enumerate(pieces):
            if i and pause:
                await asyncio.sleep(pause)
            if wire.cut_after is not None and written + len(piece) >= wire.cut_after:
                part = piece[: wire.cut_after - written]
                if part:
                    await response.write(part)
                    exchange.bytes_written += len(part)
                await cut(request, wire.cut_mode)
                return response
            if piece:
                await response.write(piece)
                written += len(piece)
                exchange.bytes_written = written
        if wire.cut_after is not None:
            await cut(request, wire.cut_mode)
            return response
        await response.write_eof()
        exchange.completed = True
    except ConnectionError:
        exchange.client_went_away = True
        log.info("client went away during %s after %d bytes", request.path, written)
    except asyncio.CancelledError:
        exchange.client_went_away = True  # aiohttp cancels handlers of lost peers
        raise
    return response


async def cut(request: web.Request, mode: str) -> None:
    """Drop the connection mid-body, after the bytes already written have left."""
    NOTE.set(f"{NOTE.get()} cut({mode})")
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    deadline = time.monotonic() + CUT_FLUSH_TIMEOUT_S
    while (
        transport.get_write_buffer_size() or (sock is not None and _kernel_unsent(sock))
    ) and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    if mode == "reset" and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()
