"""Anthropic Messages answers for an OpenAI chat client: the response half of
`chat_to_anthropic`. The stream is decoded (framed, metered) by the gateway's own
`providers.anthropic.AnthropicStream`; `openai_out` writes the chunks.

A text, thinking or tool-input delta in the shape Anthropic sends is read by byte
search (`delta_string`): its JSON string goes into the client's chunk as it came
when orjson would write it the same, with no parse and no objects; anything else
(other spacing, escapes orjson writes otherwise, a guard's masked texts) takes the
decoder's parse. Both give the same bytes (tests/test_translate_fast_path.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from extproc.providers._common import dicts, loads
from extproc.providers.anthropic import AnthropicMessages, AnthropicStream, is_text_delta
from extproc.providers.base import StreamError, StreamEvent
from extproc.sse import FrameTooLarge
from extproc.translate.base import TranslatedError, openai_error
from extproc.translate.openai_out import DecoderToOpenAI, completion, tool_call

_DELTA_HEAD = b'{"type":"content_block_delta","index":'
_DELTA_FRAME = b"event: content_block_delta\ndata: "
# The delta's type -> (the bytes between the index and its string, the TextDelta kind).
_DELTA_KINDS = (
    (b',"delta":{"type":"text_delta","text":"', "content"),
    (b',"delta":{"type":"thinking_delta","thinking":"', "reasoning"),
    (b',"delta":{"type":"input_json_delta","partial_json":"', "tool_arguments"),
)
# Bytes orjson would not write as they are inside a string: then it is re-encoded.
_NOT_VERBATIM = re.compile(rb'["\\\x00-\x1f]')


def delta_string(data: bytes) -> tuple[str, int, bytes] | None:
    """(kind, channel, the JSON string as `orjson.dumps` writes it) of a
    `content_block_delta` in exactly Anthropic's compact shape; None for any other
    shape, which the decoder's parse reads (to the same bytes, or to nothing when the
    frame is not valid JSON)."""
    if not data.startswith(_DELTA_HEAD) or not data.endswith(b'"}}'):
        return None
    comma = data.find(b",", 38)
    digits = data[38:comma]
    if not digits.isdigit() or (len(digits) > 1 and digits[0] == 0x30):
        return None  # not a JSON non-negative integer (a leading zero is invalid JSON)
    found = _kind_at(data, comma)
    if found is None:
        return None
    kind, body = found
    if len(body) < 2:  # the closing quote was the opening one: not JSON
        return None
    if _NOT_VERBATIM.search(body, 1, len(body) - 1) is not None:
        try:  # escapes (or a stray quote): one string parsed, dumped as orjson would
            text = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return kind, int(digits), orjson.dumps(text)
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError:  # invalid JSON: the parse reads no text either
            return None
    return kind, int(digits), body


def _kind_at(data: bytes, comma: int) -> tuple[str, bytes] | None:
    """The delta's kind and its JSON string (with the quotes), after the index."""
    for prefix, kind in _DELTA_KINDS:
        if data.startswith(prefix, comma):
            return kind, data[comma + len(prefix) - 1 : -2]
    return None


class AnthropicToOpenAI(DecoderToOpenAI):
    """An Anthropic Messages answer (stream or whole) for an OpenAI chat client."""

    __slots__ = ()
    fast = True  # read deltas by byte search (False: always the decoder's parse)

    def __init__(self, *, created: int, include_usage: bool, max_frame_bytes: int) -> None:
        super().__init__(
            AnthropicStream(max_frame_bytes), created=created, include_usage=include_usage
        )

    def feed_whole(self, chunk: bytes) -> tuple[bytes, bytes] | None:
        """A chunk of whole LF-framed frames (a fast upstream's, coalesced): each
        delta in Anthropic's shape is metered and written with no frame or event
        object; any other frame goes through the decoder and `emit` on its own (the
        framer is empty between frames, so it sees exactly that frame)."""
        decoder = self.decoder
        if (
            self._broken
            or not self.fast
            or decoder.buffered
            or chunk[-2:] != b"\n\n"
            or chunk[:1] == b"\n"
            or b"\r" in chunk
            or b"\n\n\n" in chunk
        ):
            return None
        out: list[bytes] = []
        writer = self.writer
        skip = len(_DELTA_FRAME)
        for piece in chunk[:-2].split(b"\n\n"):
            if piece.startswith(_DELTA_FRAME) and writer.started and not self._done:
                data = piece[skip:]
                found = delta_string(data) if b"\n" not in data else None
                if found is not None:
                    if is_text_delta(data):  # metered as AnthropicStream._event does
                        decoder.content_events += 1
                    out.append(writer.escaped(*found))
                    continue
            try:
                events = decoder.feed(piece + b"\n\n")
            except (StreamError, FrameTooLarge) as exc:
                return b"".join(out), self._broke(exc)
            out.append(self.emit(events))
        return b"".join(out), b""

    def _event(self, event: StreamEvent, out: list[bytes]) -> None:
        name = event.name
        if name == "content_block_delta":
            data = event.data
            if self.fast and self._texts is None and self.writer.started and data is not None:
                found = delta_string(data)
                if found is not None:
                    out.append(self.writer.escaped(*found))
                    return
            self._deltas(event, out)
        elif name == "content_block_start":
            self._deltas(event, out)
        elif name == "message_start":
            obj = loads(event.data)
            message = obj.get("message") if isinstance(obj, dict) else None
            message = message if isinstance(message, dict) else {}
            model = str(message.get("model", ""))
            out.append(self.writer.start(_chat_id(message.get("id")), model))
        elif name == "message_delta":
            if self.decoder.finish_reason is not None:
                out.append(self._start_if_needed())
                out.append(self.writer.finish(self.decoder.finish_reason))
        elif name == "message_stop":
            out.append(self._complete())
        elif name == "error":
            obj = loads(event.data)
            error = obj.get("error") if isinstance(obj, dict) else None
            error = error if isinstance(error, dict) else {}
            message = error.get("message")
            kind = error.get("type")
            out.append(
                self._fail(
                    message if isinstance(message, str) else "The upstream stream failed.",
                    kind if isinstance(kind, str) else "api_error",
                )
            )

    def whole(self, body: bytes) -> bytes:
        """A Messages object as a `chat.completion` (text blocks joined, tool_use
        blocks as tool calls, thinking as `reasoning_content`)."""
        obj = loads(body)
        if not isinstance(obj, dict):
            obj = {}
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in dicts(obj.get("content")):
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                thoughts.append(block["thinking"])
            elif kind == "tool_use":
                calls.append(
                    tool_call(str(block.get("id")), str(block.get("name")), block.get("input", {}))
                )
        usage = obj.get("usage")
        return completion(
            ident=_chat_id(obj.get("id")),
            created=self._created,
            model=str(obj.get("model", "")),
            texts=texts,
            thoughts=thoughts,
            tool_calls=calls,
            finish=AnthropicMessages.completion_finish_reason(body),
            usage=AnthropicMessages._usage(usage if isinstance(usage, dict) else {}),
        )

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> TranslatedError:
        """`{"type":"error","error":{"type","message"}}` -> OpenAI's error, the
        Anthropic error type as `code` (529 overloaded -> 503, 429 with Retry-After)."""
        obj = loads(body)
        error = obj.get("error") if isinstance(obj, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        kind = error.get("type") if isinstance(error, dict) else None
        return openai_error(status, headers, message, kind)


def _chat_id(ident: Any) -> str:
    return f"chatcmpl-{ident}" if isinstance(ident, str) and ident else "chatcmpl-gateway"
