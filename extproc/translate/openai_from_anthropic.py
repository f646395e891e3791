"""Anthropic Messages answers for an OpenAI chat client: the response half of
`chat_to_anthropic`. The stream is decoded (framed, metered) by the gateway's own
`providers.anthropic.AnthropicStream`; `openai_out` writes the chunks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc.providers._common import dicts, loads
from extproc.providers.anthropic import AnthropicMessages, AnthropicStream
from extproc.providers.base import StreamEvent
from extproc.translate.base import TranslatedError, openai_error
from extproc.translate.openai_out import DecoderToOpenAI, completion, tool_call


class AnthropicToOpenAI(DecoderToOpenAI):
    """An Anthropic Messages answer (stream or whole) for an OpenAI chat client."""

    __slots__ = ()

    def __init__(self, *, created: int, include_usage: bool, max_frame_bytes: int) -> None:
        super().__init__(
            AnthropicStream(max_frame_bytes), created=created, include_usage=include_usage
        )

    def _event(self, event: StreamEvent, out: list[bytes]) -> None:
        name = event.name
        if name == "content_block_delta" or name == "content_block_start":
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
