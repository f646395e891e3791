"""Incremental Server-Sent-Events framer (sans-I/O).

Envoy hands us response chunks, not frames: a fast provider is coalesced (many frames
per chunk), a slow one is split anywhere, even inside a CRLF. The framer keeps only the
unfinished frame, remembers how far it has already searched, and so costs O(n) however
the bytes are dribbled in. Every input byte ends up in exactly one `Frame.raw`, which is
what lets the gateway forward untouched frames byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from extproc.errors import StreamError

_LINE_END = re.compile(rb"[\r\n]")
_LINE_SPLIT = re.compile(rb"\r\n|\r|\n")


@dataclass(slots=True)
class Frame:
    """One SSE event block as it travelled: its exact bytes and its parsed fields."""

    raw: bytes
    data: bytes | None = None
    event: bytes | None = None
    id: bytes | None = None
    retry: int | None = None


class FrameTooLarge(StreamError):
    """An unfinished frame outgrew the limit: the stream must be ended, not buffered."""

    kind = "frame_too_large"


class SSEFramer:
    """Feed chunks, get complete frames; `finish()` returns the unterminated tail."""

    __slots__ = ("_has_cr", "_line_start", "_max", "_scan", "buf")

    def __init__(self, max_frame_bytes: int = 1 << 20) -> None:
        self._max = max_frame_bytes
        # The unfinished frame (empty: nothing buffered; the decoders' per-chunk checks
        # read it rather than `buffered`, a call).
        self.buf = bytearray()
        self._line_start = 0  # start of the current (unfinished) line in buf
        self._scan = 0  # buf[:_scan] holds no unhandled line ending
        self._has_cr = False  # once a CR is seen, line endings need the general search

    @property
    def buffered(self) -> int:
        return len(self.buf)

    def feed(self, chunk: bytes) -> list[Frame]:
        if not chunk:
            return []
        buf = self.buf
        buf += chunk
        if not self._has_cr and b"\r" in chunk:
            self._has_cr = True
        frames: list[Frame] = []
        frame_start = 0
        line_start = self._line_start
        pos = self._scan
        end = len(buf)
        while not self._has_cr and pos < end:  # LF only: jump from blank line to blank line
            if pos == line_start and buf[pos] == 0x0A:  # a blank line right here
                term_end = pos + 1
            else:
                # The first LF LF ends a frame: an earlier blank line would be at a line
                # start before it, and the only line start before `pos` is `line_start`.
                i = buf.find(b"\n\n", pos)
                if i < 0:
                    last = buf.rfind(b"\n", pos)
                    if last >= 0:
                        line_start = last + 1
                    pos = end
                    break
                term_end = i + 2
            frames.append(_make_frame(bytes(buf[frame_start:term_end])))
            frame_start = line_start = pos = term_end
        while pos < end:
            if self._has_cr:
                match = _LINE_END.search(buf, pos)
                if match is None:
                    pos = end
                    break
                i = match.start()
                if buf[i] == 0x0D:  # CR: maybe the first half of CRLF
                    if i + 1 == end:
                        pos = i  # decide when the next byte (or the end) arrives
                        break
                    term_end = i + 2 if buf[i + 1] == 0x0A else i + 1
                else:
                    term_end = i + 1
            else:
                i = buf.find(b"\n", pos)
                if i < 0:
                    pos = end
                    break
                term_end = i + 1
            if i == line_start:  # empty line: the frame is complete
                frames.append(_make_frame(bytes(buf[frame_start:term_end])))
                frame_start = term_end
            line_start = term_end
            pos = term_end
        if frame_start:
            del buf[:frame_start]
            line_start -= frame_start
            pos -= frame_start
            if not buf:
                self._has_cr = False
        self._line_start = line_start
        self._scan = pos
        if len(buf) > self._max:
            raise FrameTooLarge(f"SSE frame exceeds {self._max} bytes without ending")
        return frames

    def finish(self) -> Frame | None:
        """End of stream: the unterminated tail (fields parsed as far as they go)."""
        if not self.buf:
            return None
        raw = bytes(self.buf)
        self.buf.clear()
        self._line_start = self._scan = 0
        self._has_cr = False
        return _parse_frame(raw)


def _make_frame(raw: bytes) -> Frame:
    # Fast path for what OpenAI-style providers send: one `data:` line, LF endings.
    if raw[:5] == b"data:" and raw.find(b"\n") == len(raw) - 2 and b"\r" not in raw:
        return Frame(raw, raw[6:-2] if raw[5:6] == b" " else raw[5:-2])
    # And for typed streams (Anthropic): `event: <type>` then one `data: ` line.
    if raw[:7] == b"event: ":
        eol = raw.find(b"\n")
        if (
            raw.startswith(b"data: ", eol + 1)
            and raw.find(b"\n", eol + 1) == len(raw) - 2
            and b"\r" not in raw
        ):
            return Frame(raw, raw[eol + 7 : -2], raw[7:eol])
    return _parse_frame(raw)


def _parse_frame(raw: bytes) -> Frame:
    frame = Frame(raw)
    data: list[bytes] = []
    for line in _LINE_SPLIT.split(raw):
        if not line or line[:1] == b":":
            continue
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            frame.event = value
        elif name == b"id":
            if b"\0" not in value:
                frame.id = value
        elif name == b"retry" and value.isdigit():
            frame.retry = int(value)
    if data:
        frame.data = b"\n".join(data)
    return frame
