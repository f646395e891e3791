"""The `application/vnd.amazon.eventstream` binary framing (sans-I/O), as AWS streaming
APIs (Bedrock ConverseStream) send it.

One message on the wire:

    total length    uint32 BE   the whole message, these 4 bytes and the CRC included
    headers length  uint32 BE
    prelude CRC     uint32 BE   CRC32 of the 8 bytes above
    headers         name length (1 byte), name, value type (1 byte), value
    payload         total - headers - 16 bytes
    message CRC     uint32 BE   CRC32 of everything before it

The splitter keeps only the unfinished message, checks both CRCs (a corrupt stream
raises `CorruptEventStream`, never crashes the caller or waits forever on a bogus
length) and refuses messages over its size limit before buffering them.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from extproc.providers.base import StreamError
from extproc.sse import FrameTooLarge

PRELUDE = 12
OVERHEAD = 16  # prelude + message CRC
MAX_HEADERS = 128 * 1024  # the protocol's own limit
_U32 = struct.Struct(">I")
_PRELUDE = struct.Struct(">II")

# Header value types.
TRUE, FALSE, BYTE, SHORT, INT, LONG, BYTES, STRING, TIMESTAMP, UUID = range(10)
_FIXED = {BYTE: ">b", SHORT: ">h", INT: ">i", LONG: ">q", TIMESTAMP: ">q"}


class CorruptEventStream(StreamError):
    """A CRC did not match or a length is impossible: framing is lost for good."""

    kind = "malformed_stream"


@dataclass(slots=True)
class Message:
    raw: bytes  # the whole message as it travelled
    headers: dict[str, Any]
    headers_end: int  # raw[PRELUDE:headers_end] is the encoded header block

    @property
    def payload(self) -> bytes:
        return self.raw[self.headers_end : -4]

    @property
    def header_block(self) -> bytes:
        return self.raw[PRELUDE : self.headers_end]


def encode_headers(headers: Iterable[tuple[str, Any]]) -> bytes:
    """Header block; str -> string, bytes -> bytes, bool, int -> int32, UUID -> uuid."""
    out = bytearray()
    for name, value in headers:
        key = name.encode("utf-8")
        out += bytes([len(key)]) + key
        if isinstance(value, bool):
            out.append(TRUE if value else FALSE)
        elif isinstance(value, str):
            data = value.encode("utf-8")
            out += bytes([STRING]) + struct.pack(">H", len(data)) + data
        elif isinstance(value, bytes | bytearray):
            out += bytes([BYTES]) + struct.pack(">H", len(value)) + bytes(value)
        elif isinstance(value, int):
            out += bytes([INT]) + struct.pack(">i", value)
        elif isinstance(value, uuid.UUID):
            out += bytes([UUID]) + value.bytes
        else:
            raise TypeError(f"cannot encode header {name!r} of type {type(value).__name__}")
    return bytes(out)


def encode_message(header_block: bytes, payload: bytes) -> bytes:
    """One message from an encoded header block and a payload, both CRCs computed."""
    total = OVERHEAD + len(header_block) + len(payload)
    prelude = _PRELUDE.pack(total, len(header_block))
    prelude += _U32.pack(zlib.crc32(prelude))
    body = prelude + header_block + payload
    return body + _U32.pack(zlib.crc32(body))


def message(headers: Iterable[tuple[str, Any]], payload: bytes) -> bytes:
    return encode_message(encode_headers(headers), payload)


def decode_headers(block: bytes | memoryview) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    pos = 0
    end = len(block)
    try:
        while pos < end:
            size = block[pos]
            name = bytes(block[pos + 1 : pos + 1 + size]).decode("utf-8")
            pos += 1 + size
            kind = block[pos]
            pos += 1
            value: Any
            if kind in (TRUE, FALSE):
                value = kind == TRUE
            elif kind in _FIXED:
                fmt = struct.Struct(_FIXED[kind])
                (value,) = fmt.unpack_from(block, pos)
                pos += fmt.size
            elif kind in (BYTES, STRING):
                (length,) = struct.unpack_from(">H", block, pos)
                data = bytes(block[pos + 2 : pos + 2 + length])
                if len(data) != length:
                    raise CorruptEventStream("event stream header value runs past its block")
                value = data.decode("utf-8") if kind == STRING else data
                pos += 2 + length
            elif kind == UUID:
                value = uuid.UUID(bytes=bytes(block[pos : pos + 16]))
                pos += 16
            else:
                raise CorruptEventStream(f"unknown event stream header type {kind}")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, CorruptEventStream):
            raise
        raise CorruptEventStream(f"malformed event stream headers: {exc}") from None
    if pos != end:
        raise CorruptEventStream("event stream headers overrun their declared length")
    return headers


class EventStreamSplitter:
    """Feed chunks, get whole, CRC-checked messages."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_message_bytes: int = 16 << 20) -> None:
        self._max = max_message_bytes
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Message]:
        buf = self._buf
        buf += chunk
        out: list[Message] = []
        pos = 0
        end = len(buf)
        while end - pos >= PRELUDE:
            total, headers_length = _PRELUDE.unpack_from(buf, pos)
            (crc,) = _U32.unpack_from(buf, pos + 8)
            if zlib.crc32(buf[pos : pos + 8]) != crc:
                raise CorruptEventStream(
                    f"event stream prelude CRC mismatch at byte offset {pos} of this chunk"
                )
            if total < OVERHEAD or headers_length > min(total - OVERHEAD, MAX_HEADERS):
                raise CorruptEventStream(
                    f"impossible event stream lengths (total {total}, headers {headers_length})"
                )
            if total > self._max:
                raise FrameTooLarge(f"event stream message of {total} bytes exceeds {self._max}")
            if end - pos < total:
                break
            raw = bytes(buf[pos : pos + total])
            view = memoryview(raw)
            (crc,) = _U32.unpack_from(raw, total - 4)
            if zlib.crc32(view[:-4]) != crc:
                raise CorruptEventStream("event stream message CRC mismatch")
            headers_end = PRELUDE + headers_length
            headers = decode_headers(view[PRELUDE:headers_end])
            out.append(Message(raw, headers, headers_end))
            pos += total
        if pos:
            del buf[:pos]
        return out

    def finish(self) -> None:
        """End of stream: an unfinished message means the provider cut the stream."""
        if self._buf:
            size = len(self._buf)
            self._buf.clear()
            raise CorruptEventStream(f"the stream ended inside an event stream message ({size} B)")
