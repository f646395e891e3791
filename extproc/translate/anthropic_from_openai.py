"""OpenAI chat answers for an Anthropic Messages client: the response half of
`messages_to_chat`. The stream is decoded (framed, metered) by the gateway's own
`providers.openai_chat.OpenAIChatStream`; this module writes Anthropic's events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from extproc.errors import bounded
from extproc.providers._common import dicts, loads
from extproc.providers.anthropic import ERROR_TYPES
from extproc.providers.base import StreamError, StreamEvent, TextDelta
from extproc.providers.openai_chat import OpenAIChat, OpenAIChatStream
from extproc.translate.base import (
    DecoderDriven,
    TranslatedError,
    client_status,
    json_object,
    kept_headers,
    replaced_texts,
)
from extproc.usage import Usage

_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _event(name: str, payload: dict[str, Any]) -> bytes:
    body = orjson.dumps({"type": name, **payload})
    return b"event: " + name.encode() + b"\ndata: " + body + b"\n\n"


_REFUSAL = b'"refusal":"'


def _refusals(obj: Any) -> list[str]:
    """Non-empty `delta.refusal` texts of a chunk."""
    texts = []
    for choice in dicts(obj.get("choices") if isinstance(obj, dict) else None):
        delta = choice.get("delta")
        text = delta.get("refusal") if isinstance(delta, dict) else None
        if isinstance(text, str) and text:
            texts.append(text)
    return texts


def anthropic_usage(usage: Usage) -> dict[str, int]:
    """Neutral usage in Anthropic's terms: input excludes the cache reads."""
    return {
        "input_tokens": max(usage.prompt_tokens - usage.cached_tokens, 0),
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "output_tokens": usage.completion_tokens,
    }


def stop_reason(reason: str | None) -> str:
    return _STOP.get(reason or "stop", "end_turn")


def error_event(message: str, kind: str = "api_error") -> bytes:
    return _event("error", {"error": {"type": kind, "message": bounded(message)}})


class ChatToMessages(DecoderDriven):
    """An OpenAI chat answer (stream or whole) for an Anthropic Messages client.

    Anthropic streams one content block at a time: a change of kind (reasoning ->
    text -> a tool call) closes the open block and starts the next index. Tool-call
    arguments of a call whose block already closed cannot be placed (OpenAI sends
    calls one after the other): the stream ends with an error event."""

    content_type: ClassVar[str] = "text/event-stream"
    __slots__ = (
        "_block",
        "_broken",
        "_done",
        "_index",
        "_refused",
        "_started",
        "_texts",
        "_tools",
        "decoder",
    )

    def __init__(self, *, max_frame_bytes: int) -> None:
        self.decoder = OpenAIChatStream(hide_usage=False, max_frame_bytes=max_frame_bytes)
        self._started = False
        self._done = False
        self._broken = False
        self._index = -1  # of the open block
        self._block: tuple[str, int] | None = None  # (kind, channel) of the open block
        self._tools: set[int] = set()  # channels of tool calls opened so far
        self._refused = False  # the model refused (OpenAI's `delta.refusal`)
        self._texts: list[str] | None = None  # a guard's texts for the event at hand

    def _end_of_stream(self) -> bytes:
        if self.decoder.finish_reason is not None:  # finished, only [DONE] missing
            return self._complete()
        return self._fail("The upstream stream ended before its end marker.")

    def _broke(self, exc: Exception) -> bytes:
        self._broken = True
        return self._fail(f"The upstream stream could not be read: {exc}")

    def stop(self, message: str, code: str) -> bytes:
        """See `DecoderDriven.stop`: Anthropic's `error` event (no code field there)."""
        return self._fail(message)

    def _fail(self, message: str, kind: str = "api_error") -> bytes:
        if self._done:
            return b""
        self._done = True
        return error_event(message, kind)

    def emit(self, events: list[StreamEvent], texts: list[list[str] | None] | None = None) -> bytes:
        """See `base.ResponseTranslator.emit`."""
        out: list[bytes] = []
        for i, event in enumerate(events):
            if self._done:
                continue
            self._texts = texts[i] if texts is not None else None
            if event.is_done:
                out.append(self._complete())
            elif event.data is not None and event.data.lstrip().startswith(b'{"error"'):
                out.append(self._upstream_error(event.data))
            elif event.data is not None:
                try:
                    self._chunk(event, out)
                except StreamError as exc:
                    out.append(self._fail(str(exc)))
        self._texts = None
        return b"".join(out)

    def _upstream_error(self, data: bytes) -> bytes:
        obj = loads(data)
        error = obj.get("error") if isinstance(obj, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        return self._fail(message if isinstance(message, str) else "The upstream stream failed.")

    def _start(self, event: StreamEvent, out: list[bytes]) -> None:
        self._started = True
        obj = loads(event.data) or {}
        ident = obj.get("id") if isinstance(obj, dict) else None
        model = obj.get("model") if isinstance(obj, dict) else None
        message = {
            "id": f"msg_{ident}" if isinstance(ident, str) and ident else "msg_gateway",
            "type": "message",
            "role": "assistant",
            "model": model if isinstance(model, str) else "",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        out.append(_event("message_start", {"message": message}))

    def _chunk(self, event: StreamEvent, out: list[bytes]) -> None:
        if not self._started:
            self._start(event, out)
        decoder = self.decoder
        for call in decoder.tool_calls(event):
            if call.channel in self._tools:
                continue
            self._tools.add(call.channel)
            block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            self._open(("tool", call.channel), block, out)
        for delta in replaced_texts(decoder, event, self._texts):
            self._delta(delta, out)
        if not self._refused and _REFUSAL in event.data:  # type: ignore[operator]
            # OpenAI streams a refusal in its own field; the decoder gives it as text
            # (guarded like content), which Anthropic's clients read as text, and the
            # stop reason says `refusal`.
            self._refused = bool(_refusals(loads(event.data)))

    def _open(self, key: tuple[str, int], block: dict[str, Any], out: list[bytes]) -> None:
        self._close(out)
        self._index += 1
        self._block = key
        out.append(_event("content_block_start", {"index": self._index, "content_block": block}))

    def _close(self, out: list[bytes]) -> None:
        if self._block is not None:
            out.append(_event("content_block_stop", {"index": self._index}))
            self._block = None

    def _delta(self, delta: TextDelta, out: list[bytes]) -> None:
        if not delta.text or delta.final:
            return
        if delta.kind == "tool_arguments":
            if self._block != ("tool", delta.channel):
                raise StreamError("tool-call arguments arrived for a call that was closed")
            payload = {"type": "input_json_delta", "partial_json": delta.text}
        elif delta.kind == "reasoning":
            if self._block != ("thinking", 0):
                block = {"type": "thinking", "thinking": "", "signature": ""}
                self._open(("thinking", 0), block, out)
            payload = {"type": "thinking_delta", "thinking": delta.text}
        else:
            if self._block != ("text", 0):
                self._open(("text", 0), {"type": "text", "text": ""}, out)
            payload = {"type": "text_delta", "text": delta.text}
        out.append(_event("content_block_delta", {"index": self._index, "delta": payload}))

    def _complete(self) -> bytes:
        out: list[bytes] = []
        if not self._started:
            self._start(StreamEvent(b"", b""), out)
        self._close(out)
        self._done = True
        reason = "refusal" if self._refused else stop_reason(self.decoder.finish_reason)
        delta = {"stop_reason": reason, "stop_sequence": None}
        usage = anthropic_usage(self.decoder.usage)
        out.append(_event("message_delta", {"delta": delta, "usage": usage}))
        out.append(_event("message_stop", {}))
        return b"".join(out)

    def whole(self, body: bytes) -> bytes:
        """A `chat.completion` as a Messages object."""
        obj = json_object(body)
        choice = next(iter(dicts(obj.get("choices"))), {})
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content: list[dict[str, Any]] = []
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if isinstance(message.get("content"), str) and message["content"]:
            content.append({"type": "text", "text": message["content"]})
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal:
            content.append({"type": "text", "text": refusal})
        for call in dicts(message.get("tool_calls")):
            function = call.get("function") if isinstance(call.get("function"), dict) else {}
            arguments = loads(function.get("arguments") or "{}")
            content.append(
                {
                    "type": "tool_use",
                    "id": str(call.get("id", "")),
                    "name": str(function.get("name", "")),
                    "input": arguments if isinstance(arguments, dict) else {},
                }
            )
        usage = OpenAIChat.completion_usage(body) or Usage()
        ident = obj.get("id")
        return orjson.dumps(
            {
                "id": f"msg_{ident}" if isinstance(ident, str) and ident else "msg_gateway",
                "type": "message",
                "role": "assistant",
                "model": str(obj.get("model", "")),
                "content": content,
                "stop_reason": "refusal"
                if isinstance(refusal, str) and refusal
                else stop_reason(choice.get("finish_reason")),
                "stop_sequence": None,
                "usage": anthropic_usage(usage),
            }
        )

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> TranslatedError:
        """OpenAI's `{"error": {...}}` -> Anthropic's error shape; 503 is Anthropic's
        529 overloaded (its SDKs retry it), 429 keeps Retry-After."""
        obj = loads(body)
        error = obj.get("error") if isinstance(obj, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        shown = client_status(status)
        if status in (401, 403):
            message = f"The upstream provider refused the gateway's credentials ({status})."
        elif shown == 503:
            shown = 529
        kind = ERROR_TYPES.get(shown, "api_error" if shown >= 500 else "invalid_request_error")
        text = bounded(message) if isinstance(message, str) else f"Upstream answered {status}."
        payload = orjson.dumps({"type": "error", "error": {"type": kind, "message": text}})
        return TranslatedError(
            shown, payload, (("content-type", "application/json"), *kept_headers(headers))
        )
