"""Anthropic Messages API (`POST /v1/messages`).

The stream is typed SSE (`event:` + `data:`): `message_start` carries the input and
cache token counts, `content_block_start` / `content_block_delta` /
`content_block_stop` carry the output (`text_delta`, `input_json_delta` for tool
input, `thinking_delta`), `message_delta` the stop reason and the *cumulative* output
token count (set, never added), then `message_stop`; `ping` may come at any time and
`error` ends a stream. Only `message_start` and `message_delta` are parsed on the hot
path. Usage is always reported: there is no switch to turn on.

Token counts map onto the neutral `Usage` as: prompt = input + cache writes + cache
reads (Anthropic's `input_tokens` excludes both), cached = cache reads.
Clients authenticate with `x-api-key` (or `Authorization: Bearer`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from extproc.providers._common import (
    AmbiguousEvent,
    JSONWireFormat,
    Slot,
    SSEDecoder,
    check_type,
    content_slots,
    dicts,
    event_kind,
    figure,
    index_of,
    loads,
    normalize_finish,
    object_slot,
    opens_with_type,
    optional_bool,
    optional_int,
    parse_json_object,
    request_model,
    string_slot,
)
from extproc.providers._fields import anthropic_extras
from extproc.providers.base import RequestError, RequestInfo, StreamEvent, ToolCallStart
from extproc.sse import Frame
from extproc.usage import Usage

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Anthropic's error types by HTTP status (its SDKs map status -> exception class).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_KNOWN_TYPES = frozenset(ERROR_TYPES.values())
# Delta types -> (field, kind).
_DELTA_FIELDS = {
    "text_delta": ("text", "content"),
    "input_json_delta": ("partial_json", "tool_arguments"),
    "thinking_delta": ("thinking", "reasoning"),
}


class AnthropicMessages(JSONWireFormat):
    """The Anthropic Messages wire format (`message_start` and `message_delta` always
    carry usage: the inherited `ensure_usage` has nothing to switch on)."""

    name = "anthropic_messages"
    key_header = "x-api-key"
    path_suffix = "/v1/messages"

    @classmethod
    def parse_request(cls, body: bytes, path: str = "") -> RequestInfo:
        obj = parse_json_object(body, "a JSON object with 'model', 'max_tokens' and 'messages'")
        model = request_model(obj)
        messages = obj.get("messages")
        if messages is None:
            raise RequestError("messages: Field required", "missing_required_parameter", "messages")
        if not isinstance(messages, list):
            raise RequestError("messages: Input should be a valid list", "invalid_type", "messages")
        system = obj.get("system")
        if system is not None and not isinstance(system, str | list):
            raise RequestError(
                "system: Input should be a valid string or a list of text blocks",
                "invalid_type",
                "system",
            )
        return cls._request_info(
            obj,
            model=model,
            stream=optional_bool(obj, "stream"),
            max_output_tokens=optional_int(obj.get("max_tokens")),
        )

    @staticmethod
    def error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
        """`{"type":"error","error":{"type","message"}}`, Anthropic's error shape."""
        kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})

    @staticmethod
    def stream_decoder(*, hide_usage: bool, max_frame_bytes: int) -> AnthropicStream:
        return AnthropicStream(max_frame_bytes)

    @staticmethod
    def _prompt_slots(body: dict[str, Any]) -> Iterator[Slot]:
        return _request_slots(body)

    @staticmethod
    def _completion_slots(obj: Any) -> Iterator[Slot]:
        return _blocks_slots(obj.get("content")) if isinstance(obj, dict) else iter(())

    @staticmethod
    def _usage(usage: dict[str, Any]) -> Usage:
        counts = _Counts()
        counts.update(usage)
        return counts.usage()

    @staticmethod
    def _finish(obj: dict[str, Any]) -> str | None:
        return normalize_finish(obj.get("stop_reason"), _FINISH)


class _Counts:
    """Anthropic's token fields as last reported (each one set, never added)."""

    __slots__ = ("bad", "cache_read", "cache_write", "input", "output")

    def __init__(self) -> None:
        self.input = self.cache_write = self.cache_read = self.output = 0
        self.bad = False  # a figure that is no count came: not trusted, estimated

    def update(self, usage: dict[str, Any]) -> None:
        # message_delta repeats input/cache fields on newer API versions, sometimes as
        # null: only numbers overwrite.
        for key in _USAGE_FIELDS:
            value = usage.get(key)
            if value is None:
                continue
            count = figure(value)
            if count is None:
                self.bad = True
            else:
                setattr(self, _USAGE_FIELDS[key], count)

    def usage(self) -> Usage:
        result = Usage()
        if self.bad:
            return result
        prompt = self.input + self.cache_write + self.cache_read
        result.set_reported(
            prompt,
            self.output,
            prompt + self.output,
            cached=self.cache_read,
            cache_write=self.cache_write,
        )
        return result


_USAGE_FIELDS = {
    "input_tokens": "input",
    "cache_creation_input_tokens": "cache_write",
    "cache_read_input_tokens": "cache_read",
    "output_tokens": "output",
}


# How many `"type"` keys a frame of each kind holds (its own, and its delta's or
# block's); other kinds hold one.
_TYPE_KEYS = {b"content_block_delta": 2, b"content_block_start": 2, b"error": 2}


def is_text_delta(data: bytes) -> bool:
    """A `content_block_delta` carries text (not a signature, not an empty delta). Only
    the exact shapes of those are no text: an empty string of another key (`"x":""`),
    or a second `type`, left a text the SDKs show unguarded."""
    if b"signature_delta" not in data and not data.rstrip().endswith(b':""}}'):
        return True
    return _NO_TEXT.fullmatch(data) is None


_NO_TEXT = re.compile(
    rb'\{"type":"content_block_delta","index":\d+,"delta":\{"type":"(?:(?:text_delta","text'
    rb'|thinking_delta","thinking|input_json_delta","partial_json)":""'
    rb'|signature_delta","signature":"[^"\\]*")\}\}\s*'
)


class AnthropicStream(SSEDecoder):
    """Decoder for one Messages event stream."""

    name = "anthropic_sse"
    has_end_marker = True
    __slots__ = ("_counts",)

    def __init__(self, max_frame_bytes: int) -> None:
        super().__init__(max_frame_bytes)
        self._counts = _Counts()

    def _event(self, frame: Frame) -> StreamEvent:
        raw = frame.raw
        data = frame.data
        if data is None:
            return StreamEvent(raw, raw)
        kind, name = event_kind(frame, data)
        if frame.event is None:  # the SDKs skip it; a client of its own may show it
            raise AmbiguousEvent("The provider sent an event without its type line.")
        if kind == b"message_start" or kind == b"message_delta":
            obj = loads(data)
            check_type(obj, kind)
            self._read(obj)
            return StreamEvent(raw, raw, data, name=name)
        # The SDKs dispatch on the data's `type`, not the `event:` line: where the data
        # does not plainly open with the line's type alone, the parse must agree.
        if (
            not opens_with_type(data, kind)  # type: ignore[arg-type]
            or data.count(b'"type"') != _TYPE_KEYS.get(kind, 1)  # type: ignore[arg-type]
            or b"\\u" in data  # a key spelt with escapes (`"t\\u0079pe"`)
        ):
            check_type(loads(data), kind)
        if kind == b"content_block_delta":
            return self._delta(raw, data, is_text_delta(data), name)
        if kind == b"content_block_start":
            # A block may open with text (the SDKs' message keeps it): guarded too.
            return StreamEvent(raw, raw, data, is_content=True, name=name)
        if kind == b"message_stop":
            self.done = True
            return StreamEvent(raw, raw, data, is_done=True, name=name)
        if kind == b"error":
            self.finish_reason = "error"
        return StreamEvent(raw, raw, data, name=name)

    def _read(self, obj: dict[str, Any]) -> None:
        message = obj.get("message")
        holder = message if isinstance(message, dict) else obj
        usage = holder.get("usage")
        if isinstance(usage, dict):
            self._counts.update(usage)
            self.usage = self._counts.usage()
        delta = obj.get("delta")
        if isinstance(delta, dict) and delta.get("stop_reason") is not None:
            self.finish_reason = normalize_finish(delta["stop_reason"], _FINISH)

    def _slots(self, event: StreamEvent, obj: Any) -> list[Slot]:
        if not isinstance(obj, dict):
            return []
        kind = obj.get("type")
        index = index_of(obj, "index", 0)
        if kind == "content_block_delta":
            delta = obj.get("delta")
            fields = _DELTA_FIELDS.get(delta.get("type")) if isinstance(delta, dict) else None
            if fields is None:
                return []
            slot = string_slot(delta, fields[0], channel=index, kind=fields[1])
            return [slot] if slot is not None else []
        if kind == "content_block_start":
            block = obj.get("content_block")
            if not isinstance(block, dict):
                return []
            if block.get("type") == "text":
                slot = string_slot(block, "text", channel=index)
            elif block.get("type") == "thinking":
                slot = string_slot(block, "thinking", channel=index, kind="reasoning")
            else:
                slot = None
            return [slot] if slot is not None else []
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, dict):
                return list(_blocks_slots(message.get("content")))
        return []

    def tool_calls(self, event: StreamEvent) -> list[ToolCallStart]:
        """A `content_block_start` of a `tool_use` block: its id and name."""
        if event.name != "content_block_start" or event.data is None:
            return []
        obj = self._parsed(event)[0]
        block = obj.get("content_block") if isinstance(obj, dict) else None
        if not isinstance(block, dict) or block.get("type") != "tool_use":
            return []
        ident, name = block.get("id"), block.get("name")
        if not isinstance(ident, str) or not isinstance(name, str):
            return []
        return [ToolCallStart(index_of(obj, "index", 0), ident, name)]

    def error_event(self, message: str, code: str, *, before: StreamEvent | None = None) -> bytes:
        """An `error` event: the Anthropic SDKs raise APIStatusError on it."""
        kind = code if code in _KNOWN_TYPES else "api_error"
        body = orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
        return self._frame(body, b"error")


def _blocks_slots(blocks: Any, *, final: bool = True) -> Iterator[Slot]:
    """Texts of response content blocks: text, tool_use input, thinking."""
    for position, block in enumerate(dicts(blocks)):
        kind = block.get("type")
        slot: Slot | None = None
        if kind == "text":
            slot = string_slot(block, "text", channel=position, final=final)
        elif kind in ("tool_use", "server_tool_use"):
            slot = object_slot(block, "input", channel=position, kind="tool_arguments", final=final)
        elif kind == "thinking":
            slot = string_slot(block, "thinking", channel=position, kind="reasoning", final=final)
        if slot is not None:
            yield slot


def _request_slots(obj: dict[str, Any]) -> Iterator[Slot]:
    """Prompt texts in order: `system` (string or text blocks), then each message's
    content (string, or text / tool_use input / tool_result / plain-text document
    blocks). Thinking blocks are left out: they are signed, a change would be refused."""
    yield from content_slots(obj, "system")
    for message in dicts(obj.get("messages")):
        content = message.get("content")
        if isinstance(content, str):
            yield Slot(message, "content")
            continue
        yield from _request_blocks(content)
    yield from anthropic_extras(obj)


def _request_blocks(blocks: Any) -> Iterator[Slot]:
    for block in dicts(blocks):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            yield Slot(block, "text")
        elif kind == "tool_use":
            slot = object_slot(block, "input", kind="tool_arguments")
            if slot is not None:
                yield slot
        elif kind == "tool_result":
            inner = block.get("content")
            if isinstance(inner, str):
                yield Slot(block, "content")
            else:
                yield from _request_blocks(inner)
        elif kind == "document":
            source = block.get("source")
            if (
                isinstance(source, dict)
                and source.get("type") == "text"
                and isinstance(source.get("data"), str)
            ):
                yield Slot(source, "data")
