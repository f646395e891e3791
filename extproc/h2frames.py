"""HTTP/2 frame constants and builders for `extproc.h2grpc` (RFC 9113, gRPC over HTTP/2).

Only what a gRPC server sends is built here; our header blocks use the static table and
literals "without indexing", so the encoder keeps no state and every block is constant
bytes but for the status and message.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
MAX_HEADER_BLOCK = 64 << 10  # what one request's header block may take, encoded or not

_HEAD = struct.Struct(">BHBBL")


class ProtocolError(Exception):
    """The connection cannot go on: GOAWAY with `code` (1 PROTOCOL_ERROR by default)."""

    def __init__(self, why: str, code: int = 1) -> None:
        super().__init__(why)
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def local_settings(max_streams: int, window: int, max_frame: int) -> bytes:
    """MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE; no server push is
    possible from a server, so ENABLE_PUSH is not sent."""
    return struct.pack(">HLHLHL", 3, max_streams, 4, window, 5, max_frame)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    return b"\x00" + _length(name) + name + _length(value) + value


def _length(data: bytes) -> bytes:
    n = len(data)
    if n < 127:
        return bytes((n,))
    out, n = [127], n - 127
    while n >= 128:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _percent(text: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2, "Responses")."""
    raw = text.encode()
    return b"".join(bytes((c,)) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in raw)


# :status 200 (static table), content-type: application/grpc (name from the static table)
RESPONSE_HEADERS = b"\x88\x0f\x10\x10application/grpc"
_OK_TRAILERS = _literal(b"grpc-status", b"0")


def grpc_trailers(code: int, message: str = "", *, with_headers: bool = False) -> bytes:
    """The trailers' header block; `with_headers` for a trailers-only answer."""
    block = _OK_TRAILERS if code == 0 else _literal(b"grpc-status", str(code).encode())
    if message:
        block += _literal(b"grpc-message", _percent(message))
    return RESPONSE_HEADERS + block if with_headers else block


class Trailers:
    """A stream's trailers, queued behind DATA that waits for the peer's window."""

    __slots__ = ("block",)

    def __init__(self, block: bytes) -> None:
        self.block = block


def unpad(payload: bytes) -> bytes:
    """The content of a PADDED frame (RFC 9113 6.1)."""
    if not payload:
        raise ProtocolError("padded frame without its pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ProtocolError("padding longer than the frame")
    return payload[1 : len(payload) - pad]
