"""OpenAI Responses API (`POST /v1/responses`), and Azure's copy of it.

The stream is typed SSE: every frame has an `event:` line naming its type
(`response.created`, `response.output_text.delta`, ..., `response.completed`) and a
`data:` JSON whose `type` repeats it. Usage arrives once, inside the terminal
`response.completed` / `response.incomplete` / `response.failed` event, so those are
the only frames parsed on the hot path; deltas are recognised by their event name.

Generated text appears twice: as deltas, then whole again in the `*.done` events and
in the final response object. Both are offered to guards (the repeats as `final`
texts), so a mask applied to the deltas cannot leak through the summary events.
Usage is always reported: there is no switch to turn on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from extproc.providers._common import (
    JSONWireFormat,
    Slot,
    SSEDecoder,
    channel,
    check_type,
    content_slots,
    dicts,
    event_kind,
    index_of,
    loads,
    opens_with_type,
    optional_bool,
    optional_int,
    parse_json_object,
    request_model,
    string_slot,
)
from extproc.providers._fields import responses_extras
from extproc.providers.base import RequestError, RequestInfo, StreamEvent
from extproc.providers.openai_chat import RESPONSES_USAGE_KEYS, usage_from
from extproc.sse import Frame
from extproc.usage import Usage

_SEQ = b'"sequence_number":'
_RESPONSE_TYPE = b'"type":"response.'  # an event's type (nested objects have others)
_EMPTY_DELTA = b'"delta":""'

# Delta events: (kind, field with the text, key of the inner index).
_DELTAS: dict[bytes, tuple[str, str, str | None]] = {
    b"response.output_text.delta": ("content", "delta", "content_index"),
    b"response.refusal.delta": ("content", "delta", "content_index"),
    b"response.function_call_arguments.delta": ("tool_arguments", "delta", None),
    b"response.custom_tool_call_input.delta": ("tool_arguments", "delta", None),
    b"response.reasoning_summary_text.delta": ("reasoning", "delta", "summary_index"),
    b"response.reasoning_text.delta": ("reasoning", "delta", "content_index"),
}
# Events that repeat a whole text: (kind, field, key of the inner index).
_DONES: dict[str, tuple[str, str, str | None]] = {
    "response.output_text.done": ("content", "text", "content_index"),
    "response.refusal.done": ("content", "refusal", "content_index"),
    "response.function_call_arguments.done": ("tool_arguments", "arguments", None),
    "response.custom_tool_call_input.done": ("tool_arguments", "input", None),
    "response.reasoning_summary_text.done": ("reasoning", "text", "summary_index"),
    "response.reasoning_text.done": ("reasoning", "text", "content_index"),
}
_TERMINAL = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


class OpenAIResponses(JSONWireFormat):
    """The OpenAI Responses API wire format (usage is always reported: the inherited
    `ensure_usage` has nothing to switch on)."""

    name = "openai_responses"
    path_suffix = "/responses"

    @classmethod
    def parse_request(cls, body: bytes, path: str = "") -> RequestInfo:
        obj = parse_json_object(body, "a JSON object with 'model' and 'input'")
        model = request_model(obj)
        value = obj.get("input")
        if value is not None and not isinstance(value, str | list):
            raise RequestError(
                "Invalid type for 'input': expected a string or an array of input items.",
                "invalid_type",
                "input",
            )
        instructions = obj.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise RequestError(
                "Invalid type for 'instructions': expected a string.",
                "invalid_type",
                "instructions",
            )
        return cls._request_info(  # usage is always reported: nothing to hide
            obj,
            model=model,
            stream=optional_bool(obj, "stream"),
            max_output_tokens=optional_int(obj.get("max_output_tokens")),
        )

    @staticmethod
    def stream_decoder(*, hide_usage: bool, max_frame_bytes: int) -> OpenAIResponsesStream:
        return OpenAIResponsesStream(max_frame_bytes)

    @staticmethod
    def _prompt_slots(body: dict[str, Any]) -> Iterator[Slot]:
        return _request_slots(body)

    @staticmethod
    def _completion_slots(obj: Any) -> Iterator[Slot]:
        return _response_slots(obj)

    @staticmethod
    def _usage(usage: dict[str, Any]) -> Usage:
        return _usage_from(usage)

    @staticmethod
    def _finish(obj: dict[str, Any]) -> str | None:
        return _finish_of(obj)


class AzureOpenAIResponses(OpenAIResponses):
    """Azure OpenAI's Responses API (`/openai/v1/responses`): `api-key` auth."""

    name = "azure_responses"
    key_header = "api-key"


class OpenAIResponsesStream(SSEDecoder):
    """Decoder for one Responses API event stream."""

    name = "openai_responses_sse"
    has_end_marker = True
    __slots__ = ("_sequence",)

    def __init__(self, max_frame_bytes: int) -> None:
        super().__init__(max_frame_bytes)
        self._sequence = -1

    def _event(self, frame: Frame) -> StreamEvent:
        raw = frame.raw
        data = frame.data
        if data is None:
            return StreamEvent(raw, raw)
        kind, name = event_kind(frame, data)
        # The SDK dispatches on the data's `type`, not the `event:` line: where the data
        # does not plainly open with that type, once, the parse must agree (a repeated
        # `type` would turn a `response.in_progress` into a text delta, unguarded).
        if (
            kind is None
            or not opens_with_type(data, kind)
            or data.count(_RESPONSE_TYPE) != kind.startswith(b"response.")
            or data.count(b'"type"') != data.count(b'"type":"')
            or b"\\u" in data  # a key or a type spelt with escapes
        ):
            check_type(loads(data), kind)
        at = data.find(_SEQ)
        if at >= 0:
            digits = data[at + len(_SEQ) : at + len(_SEQ) + 20].lstrip()
            end = 0
            while end < len(digits) and 48 <= digits[end] <= 57:
                end += 1
            if end:
                self._sequence = int(digits[:end])
        if kind in _DELTAS:
            # Empty only as one plain `"delta":""` (another one nested, or spelt with
            # escapes, would hide the text the SDK reads from the guards).
            empty = _EMPTY_DELTA in data and data.count(b'"delta"') == 1 and b"\\u" not in data
            return self._delta(raw, data, not empty, name)
        if kind in _TERMINAL:
            obj = loads(data)
            response = obj.get("response") if isinstance(obj, dict) else None
            if isinstance(response, dict):
                if isinstance(response.get("usage"), dict):
                    self.usage = _usage_from(response["usage"])
                self.finish_reason = _finish_of(response)
            # The whole output again: guards must see it, or what they masked in the
            # deltas would reach the client here.
            self.done = True
            return StreamEvent(raw, raw, data, is_done=True, is_content=True, name=name)
        if kind is not None and kind.endswith(b".done"):  # a whole text repeated
            return StreamEvent(raw, raw, data, is_content=True, name=name)
        if kind == b"error":
            self.finish_reason = "error"
        return StreamEvent(raw, raw, data, name=name)

    def _slots(self, event: StreamEvent, obj: Any) -> list[Slot]:
        return list(_event_slots(obj)) if isinstance(obj, dict) else []

    def error_event(self, message: str, code: str, *, before: StreamEvent | None = None) -> bytes:
        """The Responses API's `error` event (the SDK yields it as ResponseErrorEvent)."""
        body = orjson.dumps(
            {
                "type": "error",
                "code": code,
                "message": message,
                "param": None,
                "sequence_number": self._sequence + 1,
            }
        )
        return self._frame(body, b"error")


def _event_slots(obj: dict[str, Any]) -> Iterator[Slot]:
    kind = obj.get("type")
    output = index_of(obj, "output_index", 0)
    if not isinstance(kind, str):
        return
    spec = _DELTAS.get(kind.encode())
    final = spec is None  # not a delta: maybe a `*.done` repeating a whole text
    if final:
        spec = _DONES.get(kind)
    if spec is not None:
        text_kind, field, inner = spec
        slot = string_slot(
            obj, field, channel=channel(output, index_of(obj, inner, 0) if inner else 0),
            kind=text_kind, final=final,
        )  # fmt: skip
        if slot is not None:
            yield slot
        return
    part = obj.get("part")
    if isinstance(part, dict):  # content_part / reasoning_summary_part added|done
        inner = index_of(obj, "summary_index", index_of(obj, "content_index", 0))
        yield from _part_slots(part, channel(output, inner))
        return
    item = obj.get("item")
    if isinstance(item, dict):  # output_item.added|done
        yield from _item_slots(item, output)
        return
    response = obj.get("response")
    if isinstance(response, dict):  # created, in_progress, completed, incomplete, failed
        yield from _response_slots(response)


def _part_slots(part: dict[str, Any], where: int) -> Iterator[Slot]:
    kind = part.get("type")
    if kind == "refusal":
        slot = string_slot(part, "refusal", channel=where, final=True)
    else:
        text_kind = "reasoning" if kind in ("summary_text", "reasoning_text") else "content"
        slot = string_slot(part, "text", channel=where, kind=text_kind, final=True)
    if slot is not None:
        yield slot


def _item_slots(item: dict[str, Any], output: int) -> Iterator[Slot]:
    kind = item.get("type")
    if kind == "message":
        for ci, part in enumerate(dicts(item.get("content"))):
            yield from _part_slots(part, channel(output, ci))
    elif kind in ("function_call", "custom_tool_call"):
        field = "arguments" if kind == "function_call" else "input"
        slot = string_slot(item, field, channel=channel(output), kind="tool_arguments", final=True)
        if slot is not None:
            yield slot
    elif kind == "reasoning":
        for si, part in enumerate(dicts(item.get("summary"))):
            yield from _part_slots(part, channel(output, si))
        for ci, part in enumerate(dicts(item.get("content"))):
            yield from _part_slots(part, channel(output, ci))


def _response_slots(response: Any) -> Iterator[Slot]:
    if not isinstance(response, dict):
        return
    for output, item in enumerate(dicts(response.get("output"))):
        yield from _item_slots(item, output)


def _request_slots(obj: dict[str, Any]) -> Iterator[Slot]:
    """Prompt texts in order: instructions, then `input` (a string, or each item's
    text parts, function-call arguments and tool outputs)."""
    if isinstance(obj.get("instructions"), str):
        yield Slot(obj, "instructions")
    value = obj.get("input")
    if isinstance(value, str):
        yield Slot(obj, "input")
    for item in dicts(value):
        kind = item.get("type")
        yield from content_slots(item, "content")
        if kind == "function_call" and isinstance(item.get("arguments"), str):
            yield Slot(item, "arguments", kind="tool_arguments")
        elif kind == "custom_tool_call" and isinstance(item.get("input"), str):
            yield Slot(item, "input", kind="tool_arguments")
        elif kind in ("function_call_output", "custom_tool_call_output"):
            yield from content_slots(item, "output")
    yield from responses_extras(obj)


def _finish_of(response: dict[str, Any]) -> str | None:
    status = response.get("status")
    if status == "completed":
        calls = any(
            item.get("type") in ("function_call", "custom_tool_call")
            for item in dicts(response.get("output"))
        )
        return "tool_calls" if calls else "stop"
    if status == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return _INCOMPLETE.get(reason, "length") if isinstance(reason, str) else "length"
    if status == "failed":
        return "error"
    return status if isinstance(status, str) else None


def _usage_from(usage: dict[str, Any]) -> Usage:
    return usage_from(usage, RESPONSES_USAGE_KEYS)
