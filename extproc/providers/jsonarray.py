"""Incremental splitter for one JSON array streamed over many chunks (sans-I/O).

Gemini's `:streamGenerateContent` without `alt=sse` answers with a single JSON array
whose elements (one `GenerateContentResponse` each) arrive over time, pretty-printed
and separated by `,` plus whitespace. The splitter hands out each element as soon as
its last byte arrives, without buffering the array: it keeps only the unfinished
element, remembers where it stopped scanning (so bytes dribbled in one at a time cost
O(n), not O(n^2)), and jumps between structural characters with regular expressions
instead of looking at every byte in Python.

Every input byte ends up in exactly one piece, in order: elements, and the bytes
between them (`[`, `,`, `]`, whitespace) as filler pieces handed out as soon as they
are seen. Forwarding the pieces' raw bytes therefore reproduces the stream exactly,
and nothing but an unfinished element is ever held back.

A top-level object instead of an array (a plain `:generateContent` answer, or an error
object) is handed out as one element.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from extproc.providers.base import StreamError
from extproc.sse import FrameTooLarge

# A whole string (one regex step, however long), or a bracket, or a lone quote: the
# start of a string whose end has not arrived yet.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|["{}\[\]]', re.DOTALL)
_IN_STRING = re.compile(rb'["\\]')
_SCALAR_END = re.compile(rb"[,\]\s]")
_WHITESPACE = frozenset(b" \t\r\n")


class State:
    """Where the array stands after a piece: what would make it valid JSON again."""

    START = 0  # nothing seen (or only whitespace)
    FIRST = 1  # after `[`: a value or `]` may follow
    NEXT = 2  # after `,`: a value must follow
    VALUE = 3  # inside an element (never a piece boundary)
    AFTER = 4  # after an element: `,` or `]` must follow
    END = 5  # after `]` (or after a top-level object): only whitespace may follow


class MalformedJSONStream(StreamError):
    """The bytes cannot be the JSON array (or object) the format promises."""

    kind = "malformed_stream"


@dataclass(slots=True)
class Piece:
    raw: bytes
    element: bool  # a whole array element (else filler between elements)
    state: int  # State after this piece


class JSONArraySplitter:
    """Feed chunks, get pieces; `finish()` checks the stream ended where it may."""

    __slots__ = ("_buf", "_depth", "_in_string", "_max", "_scan", "_single", "state")

    def __init__(self, max_element_bytes: int = 1 << 20) -> None:
        self._max = max_element_bytes
        self._buf = bytearray()  # unfinished element (from its first byte)
        self._scan = 0  # _buf[:_scan] is scanned already
        self._depth = 0
        self._in_string = False
        self._single = False  # top-level object, no array around it
        self.state = State.START

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Piece]:
        if not chunk:
            return []
        buf = self._buf
        buf += chunk
        pieces: list[Piece] = []
        start = 0  # first byte of buf not yet in a piece
        pos = self._scan
        end = len(buf)
        while pos < end:
            if self.state == State.VALUE:
                pos, done = self._scan_value(buf, pos, end)
                if not done:
                    break
                self.state = State.END if self._single else State.AFTER
                pieces.append(Piece(bytes(buf[start:pos]), True, self.state))
                start = pos
                continue
            # Between elements: consume filler up to the next element (or the end).
            state = self.state
            while pos < end:
                byte = buf[pos]
                if byte in _WHITESPACE:
                    pos += 1
                    continue
                if state == State.START:
                    if byte == 0x5B:  # [
                        state = State.FIRST
                        pos += 1
                        continue
                    if byte == 0x7B:  # {: a lone object
                        self._single = True
                        break
                    raise MalformedJSONStream(f"expected a JSON array, got {bytes([byte])!r}")
                if state in (State.FIRST, State.NEXT):
                    if byte == 0x5D:  # ]
                        if state == State.NEXT:
                            raise MalformedJSONStream("trailing comma before ']'")
                        state = State.END
                        pos += 1
                        continue
                    if byte == 0x2C:  # ,
                        raise MalformedJSONStream("',' where an array element should start")
                    break  # an element starts here
                if state == State.AFTER:
                    if byte == 0x2C:
                        state = State.NEXT
                    elif byte == 0x5D:
                        state = State.END
                    else:
                        raise MalformedJSONStream(
                            f"expected ',' or ']' after an element, got {bytes([byte])!r}"
                        )
                    pos += 1
                    continue
                raise MalformedJSONStream("data after the end of the JSON array")
            if pos > start:
                pieces.append(Piece(bytes(buf[start:pos]), False, state))
                start = pos
            self.state = state
            if pos < end:  # an element starts at pos
                self.state = State.VALUE
                self._depth = 0
                self._in_string = False
        if start:
            del buf[:start]
            pos -= start
        self._scan = pos
        if len(buf) > self._max:
            raise FrameTooLarge(f"JSON array element exceeds {self._max} bytes without ending")
        return pieces

    def _scan_value(self, buf: bytearray, pos: int, end: int) -> tuple[int, bool]:
        """Scan an element from `pos`; (where it ended or where to resume, ended?)."""
        depth = self._depth
        in_string = self._in_string
        if depth == 0 and not in_string and pos < end:
            first = buf[pos]
            if first not in b'{["':  # a scalar element: up to the next delimiter
                match = _SCALAR_END.search(buf, pos)
                if match is None:
                    return end, False
                return match.start(), True
        while True:
            if in_string:  # resumed inside a string: look for its end, minding escapes
                match = _IN_STRING.search(buf, pos)
                if match is None:
                    pos = end
                    break
                at = match.start()
                if buf[at] == 0x5C:  # backslash: skip the escaped byte
                    if at + 1 >= end:
                        pos = at  # resume at the backslash once more bytes arrive
                        break
                    pos = at + 2
                    continue
                in_string = False
                pos = at + 1
                if depth == 0:  # a string element
                    self._in_string = False
                    return pos, True
                continue
            for match in _TOKEN.finditer(buf, pos):
                at = match.start()
                byte = buf[at]
                if byte == 0x22:  # "
                    if match.end() - at == 1:  # its end is still to come
                        in_string = True
                        pos = at + 1
                        break
                    if depth == 0:  # a string element
                        self._in_string = False
                        return match.end(), True
                elif byte == 0x7B or byte == 0x5B:
                    depth += 1
                else:
                    depth -= 1
                    if depth <= 0:
                        self._depth = 0
                        self._in_string = False
                        return at + 1, True
            else:
                pos = end
                break
        self._depth = depth
        self._in_string = in_string
        return pos, False

    def finish(self) -> list[Piece]:
        """End of stream. An unfinished element, or an array that was never closed (the
        provider cut it), raises, so the caller can close the array with an error."""
        if self._buf:
            size = len(self._buf)
            raise MalformedJSONStream(f"the stream ended inside an array element ({size} bytes)")
        if self.state != State.END:
            raise MalformedJSONStream("the stream ended before the JSON array was closed")
        return []
