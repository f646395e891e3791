"""Google Gemini API and Vertex AI (`:generateContent`, `:streamGenerateContent`).

The model and the stream flag live in the path
(`/v1beta/models/{model}:streamGenerateContent`, on Vertex
`/v1/projects/{p}/locations/{l}/publishers/google/models/{model}:...`), not the body.
A streamed answer comes in one of two framings, told apart by the response content
type:

- `?alt=sse`: SSE frames, each `data: {GenerateContentResponse}` (CRLF line ends);
- without it: one JSON array whose elements arrive over time (`application/json`),
  split incrementally by `jsonarray.JSONArraySplitter`.

Every element carries `usageMetadata` with the running figures (set, never added):
prompt = promptTokenCount + toolUsePromptTokenCount, completion = candidatesTokenCount
+ thoughtsTokenCount (Gemini counts thoughts apart; OpenAI counts reasoning inside
completion), cached = cachedContentTokenCount, reasoning = thoughtsTokenCount. To keep
the hot path free of JSON parsing, the decoder only remembers the last element that
had usage and parses it when `usage` is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from extproc.errors import shown
from extproc.providers._common import (
    EventDecoder,
    JSONWireFormat,
    Slot,
    SSEDecoder,
    channel,
    dicts,
    figures,
    index_of,
    loads,
    normalize_finish,
    object_slot,
    parse_json_object,
    string_slot,
    uint,
)
from extproc.providers._fields import GEMINI_CODE, gemini_extras
from extproc.providers.base import RequestError, RequestInfo, StreamEvent, ToolCallStart
from extproc.providers.gemini_paths import error_json, model_and_action, names_path_model
from extproc.providers.jsonarray import JSONArraySplitter, Piece, State
from extproc.sse import Frame
from extproc.usage import Usage

_SSE = "text/event-stream"
_USAGE = b'"usageMetadata"'
_FINISH_RE = re.compile(rb'"finishReason"\s*:\s*"([A-Z_]+)"')
_TEXT = b'"text"'
_CALL = b'"functionCall"'
_PARTS = b'"parts"'
_BLOCKED = b'"blockReason"'
_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "MALFORMED_FUNCTION_CALL": "error",
}


class Gemini(JSONWireFormat):
    """The Gemini API wire format (generativelanguage.googleapis.com); usageMetadata
    is always sent (the inherited `ensure_usage` has nothing to switch on)."""

    name = "gemini"
    key_header = "x-goog-api-key"
    key_query = "key"

    @staticmethod
    def handles(upstream_path: str) -> bool:
        return model_and_action(upstream_path) is not None

    @classmethod
    def parse_request(cls, body: bytes, path: str = "") -> RequestInfo:
        obj = parse_json_object(body, "a JSON object with 'contents'")
        found = model_and_action(path)
        model = found[0] if found else obj.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(
                "The model is missing: expected a path like "
                "/v1beta/models/{model}:generateContent.",
                "missing_required_parameter",
                "model",
            )
        model = model.removeprefix("models/")
        named = obj.get("model")
        if found and named is not None and not names_path_model(named, model, path):
            # The path names the model; a body naming another is read two ways.
            raise RequestError(
                f"The body's model '{shown(named)}' is not the model '{shown(model)}' in "
                "the path; send one model (or the same in both).",
                "model_mismatch",
                "model",
            )
        contents = obj.get("contents")
        if contents is None:
            raise RequestError(
                "* GenerateContentRequest.contents: contents is not specified",
                "missing_required_parameter",
                "contents",
            )
        if not isinstance(contents, list):
            raise RequestError(
                "Invalid value at 'contents': expected a list of Content objects.",
                "invalid_type",
                "contents",
            )
        config = obj.get("generationConfig", obj.get("generation_config"))
        max_out = None
        if isinstance(config, dict):
            value = config.get("maxOutputTokens", config.get("max_output_tokens"))
            max_out = value if isinstance(value, int) and not isinstance(value, bool) else None
        return cls._request_info(
            obj,
            model=model,
            stream=found is not None and found[1] == "streamGenerateContent",
            max_output_tokens=max_out,
        )

    @staticmethod
    def error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
        return orjson.dumps(error_json(status, message, code), option=orjson.OPT_INDENT_2)

    @staticmethod
    def stream_decoder(*, hide_usage: bool, max_frame_bytes: int) -> GeminiSSEStream:
        return GeminiSSEStream(max_frame_bytes)

    @staticmethod
    def response_decoder(
        content_type: str, *, stream: bool, hide_usage: bool, max_frame_bytes: int
    ) -> GeminiSSEStream | GeminiArrayStream | None:
        kind = content_type.lower()
        if kind.startswith(_SSE):
            return GeminiSSEStream(max_frame_bytes)
        if stream and "json" in kind:
            return GeminiArrayStream(max_frame_bytes)
        return None

    @staticmethod
    def completion_usage(body: bytes) -> Usage | None:
        obj = loads(body)
        for element in reversed(_elements(obj)):
            usage = _usage_from(element)
            if usage is not None:
                return usage
        return None

    @staticmethod
    def completion_finish_reason(body: bytes) -> str | None:
        obj = loads(body)
        reason = None
        for element in _elements(obj):
            reason = _finish_of(element) or reason
        return reason

    @staticmethod
    def _prompt_slots(body: dict[str, Any]) -> Iterator[Slot]:
        return _request_slots(body)

    @staticmethod
    def _completion_slots(obj: Any) -> Iterator[Slot]:
        """A whole answer (one object, final texts) or a collected stream (an array)."""
        final = isinstance(obj, dict)
        return (s for e in _elements(obj) for s in _response_slots(e, final=final))

    @staticmethod
    def _dump_completion(original: bytes, obj: Any) -> bytes:
        return _dumps_like(original, obj)


class Vertex(Gemini):
    """Vertex AI's Gemini endpoints: same bodies, OAuth bearer tokens."""

    name = "vertex"
    key_header = None
    key_query = None


class _GeminiEvents:
    """Per-element bookkeeping shared by both framings (mixed into the decoders, which
    declare the slots: `_tool_call`, `_usage`, `_usage_src`)."""

    __slots__ = ()

    def __init__(self, *args: Any) -> None:
        self._usage = Usage()
        self._usage_src: bytes | None = None
        self._tool_call = False
        super().__init__(*args)

    @property
    def usage(self) -> Usage:
        return self._current_usage()

    @usage.setter
    def usage(self, value: Usage) -> None:
        self._usage = value
        self._usage_src = None

    def _slots(self, event: StreamEvent, obj: Any) -> list[Slot]:
        return list(_response_slots(obj, final=False))

    def tool_calls(self, event: StreamEvent) -> list[ToolCallStart]:
        """Function calls of this element, whole (name and arguments in one part);
        `channel` is (candidate, position among the element's calls)."""
        if event.data is None or _CALL not in event.data:
            return []
        obj = self._parsed(event)[0]  # type: ignore[attr-defined]
        starts = []
        for position, candidate in enumerate(dicts(obj.get("candidates"))):
            content = candidate.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            calls = [
                p["functionCall"] for p in dicts(parts) if isinstance(p.get("functionCall"), dict)
            ]
            for k, call in enumerate(calls):
                if not isinstance(call.get("name"), str):
                    continue
                args = call.get("args")
                arguments = orjson.dumps(args if isinstance(args, dict) else {}).decode()
                ident = call.get("id") if isinstance(call.get("id"), str) else ""
                where = channel(index_of(candidate, "index", position), k)
                starts.append(ToolCallStart(where, ident, call["name"], arguments))
        return starts

    def _element(self, data: bytes) -> bool:
        """Note what one GenerateContentResponse carries; True if it has output."""
        if _USAGE in data:
            self._usage_src = data  # type: ignore[attr-defined]
        call = _CALL in data
        if call:
            self._tool_call = True  # type: ignore[attr-defined]
        match = _FINISH_RE.search(data)
        if match is not None:
            reason = match.group(1).decode()
            if reason == "STOP" and self._tool_call:  # type: ignore[attr-defined]
                self.finish_reason = "tool_calls"
            else:
                self.finish_reason = normalize_finish(reason, _FINISH)
        elif _BLOCKED in data:
            self.finish_reason = "content_filter"
        content = call or _TEXT in data
        if content:
            self.content_events += 1  # type: ignore[attr-defined]
            return True
        # Other parts the SDK shows (escaped keys, `function_call`, code): guarded too.
        return _PARTS in data or b"\\u" in data

    def _current_usage(self) -> Usage:
        src = self._usage_src  # type: ignore[attr-defined]
        if src is not None:
            self._usage_src = None
            parsed = _usage_from(loads(src))
            if parsed is not None:
                self._usage = parsed
        return self._usage  # type: ignore[attr-defined]


class GeminiSSEStream(_GeminiEvents, SSEDecoder):
    """`:streamGenerateContent?alt=sse`: one GenerateContentResponse per SSE frame."""

    name = "gemini_sse"
    __slots__ = ("_tool_call", "_usage", "_usage_src")

    def _event(self, frame: Frame) -> StreamEvent:
        raw = frame.raw
        data = frame.data
        if data is None:
            return StreamEvent(raw, raw)
        return StreamEvent(raw, raw, data, is_content=self._element(data))

    def error_event(self, message: str, code: str, *, before: StreamEvent | None = None) -> bytes:
        """`data: {"error": {...}}`: google-genai raises APIError on it."""
        return self._frame(orjson.dumps(error_json(500, message, code)))


class GeminiArrayStream(_GeminiEvents, EventDecoder):
    """`:streamGenerateContent` without alt=sse: one JSON array, element by element."""

    name = "gemini_json_stream"
    has_end_marker = True
    __slots__ = ("_before", "_sent", "_splitter", "_tool_call", "_usage", "_usage_src")

    def __init__(self, max_frame_bytes: int) -> None:
        super().__init__()
        self._splitter = JSONArraySplitter(max_frame_bytes)
        self._sent = State.START  # the array after every event returned so far
        self._before: dict[int, int] = {}  # id(event) -> state before it, last batch

    @property
    def buffered(self) -> int:
        return self._splitter.buffered

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        return self._events(self._splitter.feed(chunk))

    def finish(self) -> list[StreamEvent]:
        return self._events(self._splitter.finish())

    def _events(self, pieces: list[Piece]) -> list[StreamEvent]:
        events = []
        before: dict[int, int] = {}
        state = self._sent
        for piece in pieces:
            raw = piece.raw
            if piece.element:
                event = StreamEvent(raw, raw, raw, is_content=self._element(raw))
            else:
                event = StreamEvent(raw, raw, is_done=piece.state == State.END)
                self.done = self.done or event.is_done
            events.append(event)
            before[id(event)] = state
            state = piece.state
        if pieces:
            self._before = before
            self._sent = state
        return events

    def _encode(self, event: StreamEvent, obj: Any) -> bytes:
        return _dumps_like(event.raw, obj)

    def error_event(self, message: str, code: str, *, before: StreamEvent | None = None) -> bytes:
        """An error element, then `]`: the array stays valid JSON for the client."""
        state = self._sent
        if before is not None:
            # An element always follows `[` or `,`; a filler's state was recorded.
            fallback = State.NEXT if before.data is not None else state
            state = self._before.get(id(before), fallback)
        error = orjson.dumps(error_json(500, message, code), option=orjson.OPT_INDENT_2)
        if state == State.START:
            return b"[" + error + b"\n]"
        if state in (State.FIRST, State.NEXT):
            return error + b"\n]"
        if state == State.AFTER:
            return b"\n,\r\n" + error + b"\n]"
        return b""  # the array is closed: nothing valid can follow


def _dumps_like(original: bytes, obj: Any) -> bytes:
    """orjson, pretty-printed with two spaces when the original was (Gemini's REST
    answers are), compact otherwise."""
    if b"\n" in original.strip():
        return orjson.dumps(obj, option=orjson.OPT_INDENT_2)
    return orjson.dumps(obj)


def _elements(obj: Any) -> list[dict[str, Any]]:
    if isinstance(obj, dict):
        return [obj]
    return list(dicts(obj))


def _finish_of(element: dict[str, Any]) -> str | None:
    reason = None
    calls = False
    for candidate in dicts(element.get("candidates")):
        if isinstance(candidate.get("finishReason"), str):
            reason = candidate["finishReason"]
        content = candidate.get("content")
        if isinstance(content, dict):
            calls = calls or any("functionCall" in p for p in dicts(content.get("parts")))
    if reason is None:
        feedback = element.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            return "content_filter"
        return None
    if reason == "STOP" and calls:
        return "tool_calls"
    return normalize_finish(reason, _FINISH)


_COUNTS = ("promptTokenCount", "toolUsePromptTokenCount", "thoughtsTokenCount",
           "candidatesTokenCount")  # fmt: skip


def _usage_from(element: Any) -> Usage | None:
    meta = element.get("usageMetadata") if isinstance(element, dict) else None
    if not isinstance(meta, dict):
        return None
    counts = figures(meta, *_COUNTS)
    result = Usage()
    if counts is None:  # a figure that is no count: not trusted, the estimate stands
        return result
    prompt, tools, thoughts, candidates = counts
    prompt, completion = prompt + tools, candidates + thoughts
    result.set_reported(
        prompt,
        completion,
        uint(meta.get("totalTokenCount")),
        cached=uint(meta.get("cachedContentTokenCount")),
        reasoning=thoughts,
    )
    return result


def _response_slots(element: Any, *, final: bool) -> Iterator[Slot]:
    """Texts of one GenerateContentResponse: each candidate's text parts (thoughts as
    reasoning) and function-call arguments (an object, shown as JSON, always whole)."""
    if not isinstance(element, dict):
        return
    for position, candidate in enumerate(dicts(element.get("candidates"))):
        index = index_of(candidate, "index", position)
        content = candidate.get("content")
        if not isinstance(content, dict):
            continue
        for part in dicts(content.get("parts")):
            kind = "reasoning" if part.get("thought") is True else "content"
            slot = string_slot(part, "text", channel=index, kind=kind, final=final)
            if slot is not None:
                yield slot
            for key in ("functionCall", "function_call"):  # google-genai reads both
                args = part.get(key)
                slot = object_slot(args, "args", channel=index, kind="tool_arguments", final=True)
                if slot is not None:
                    yield slot
            for key, field in GEMINI_CODE:  # code execution: the code and its output
                slot = string_slot(part.get(key), field, channel=channel(index, 1), final=True)
                if slot is not None:
                    yield slot


def _request_slots(obj: dict[str, Any]) -> Iterator[Slot]:
    """Prompt texts in order: systemInstruction parts, then each content's parts
    (text, function-call arguments, function responses)."""
    for key in ("systemInstruction", "system_instruction"):
        system = obj.get(key)
        if isinstance(system, dict):
            yield from _parts_slots(system.get("parts"))
    for content in dicts(obj.get("contents")):
        yield from _parts_slots(content.get("parts"))
    yield from gemini_extras(obj)


def _parts_slots(parts: Any) -> Iterator[Slot]:
    for part in dicts(parts):
        if isinstance(part.get("text"), str):
            yield Slot(part, "text")
        for key, field in (
            ("functionCall", "args"),
            ("function_call", "args"),
            ("functionResponse", "response"),
            ("function_response", "response"),
        ):
            inner = part.get(key)
            if isinstance(inner, dict):
                slot = object_slot(inner, field, kind="tool_arguments")
                if slot is not None:
                    yield slot
