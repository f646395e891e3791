"""OpenAI Chat Completions (and OpenAI-compatible servers): request checks, the
`include_usage` switch, and a stream decoder that parses only the frames it must.

Per frame the decoder does a few `bytes.find` calls; JSON is parsed only for a frame
that carries a non-null `usage`. When the gateway added `include_usage` itself, the
usage-only chunk is dropped and the `"usage":null` the provider then adds to every
chunk is cut out byte-wise, so the client gets the stream it asked for.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.providers.base import RequestError, RequestInfo, StreamEvent
from extproc.sse import SSEFramer
from extproc.usage import Usage

_USAGE_KEY = b'"usage"'
_USAGE_NULL = b',"usage":null'
_FINISH = b'"finish_reason":"'
_CONTENT = b'"content":"'
_ARGUMENTS = b'"arguments":"'
_DONE = b"[DONE]"


class OpenAIChat:
    """The OpenAI Chat Completions wire format."""

    name = "openai"

    @staticmethod
    def handles(upstream_path: str) -> bool:
        path = upstream_path.split("?", 1)[0].rstrip("/")
        return path.endswith("/chat/completions")

    @staticmethod
    def parse_request(body: bytes) -> RequestInfo:
        if not body.strip():
            raise RequestError(
                "The request body is empty; expected a JSON object with 'model' and 'messages'.",
                "missing_body",
            )
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(
                    "The request body is not valid UTF-8.", "invalid_encoding"
                ) from None
            raise RequestError(
                f"We could not parse the JSON body of your request ({exc}).", "invalid_json"
            ) from None
        if not isinstance(obj, dict):
            raise RequestError("The request body must be a JSON object.", "invalid_type")
        model = obj.get("model")
        if model is None:
            raise RequestError(
                "You must provide a model parameter.", "missing_required_parameter", "model"
            )
        if not isinstance(model, str) or not model:
            raise RequestError(
                "Invalid 'model': expected a non-empty string.", "invalid_type", "model"
            )
        messages = obj.get("messages")
        if messages is None:
            raise RequestError(
                "Missing required parameter: 'messages'.", "missing_required_parameter", "messages"
            )
        if not isinstance(messages, list):
            raise RequestError(
                "Invalid type for 'messages': expected an array.", "invalid_type", "messages"
            )
        if not messages:
            raise RequestError(
                "Invalid 'messages': empty array. Expected at least one message.",
                "empty_array",
                "messages",
            )
        stream = obj.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise RequestError(
                "Invalid type for 'stream': expected a boolean.", "invalid_type", "stream"
            )
        options = obj.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise RequestError(
                "Invalid type for 'stream_options': expected an object.",
                "invalid_type",
                "stream_options",
            )
        max_out = obj.get("max_completion_tokens", obj.get("max_tokens"))
        return RequestInfo(
            model=model,
            stream=stream,
            body=obj,
            prompt_texts=list(_message_texts(messages)),
            client_wants_usage=bool(options and options.get("include_usage") is True),
            max_output_tokens=max_out if isinstance(max_out, int) else None,
        )

    @staticmethod
    def ensure_usage(info: RequestInfo) -> bytes | None:
        """A new upstream body asking for usage, or None if the request already does."""
        if not info.stream or info.client_wants_usage:
            return None
        options = dict(info.body.get("stream_options") or {})
        options["include_usage"] = True
        info.body["stream_options"] = options
        return orjson.dumps(info.body)

    @staticmethod
    def stream_decoder(*, hide_usage: bool, max_frame_bytes: int) -> OpenAIChatStream:
        return OpenAIChatStream(hide_usage=hide_usage, max_frame_bytes=max_frame_bytes)

    @staticmethod
    def completion_usage(body: bytes) -> Usage | None:
        """Usage from a non-streaming JSON answer, if it has one."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        usage = obj.get("usage") if isinstance(obj, dict) else None
        return _usage_from(usage) if isinstance(usage, dict) else None


class OpenAIChatStream:
    """Decoder for one `chat.completion.chunk` SSE stream."""

    __slots__ = ("_framer", "_hide_usage", "content_events", "finish_reason", "usage")

    def __init__(self, *, hide_usage: bool, max_frame_bytes: int) -> None:
        self._framer = SSEFramer(max_frame_bytes)
        self._hide_usage = hide_usage
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.content_events = 0

    @property
    def buffered(self) -> int:
        return self._framer.buffered

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        return [self._event(f.raw, f.data) for f in self._framer.feed(chunk)]

    def finish(self) -> list[StreamEvent]:
        tail = self._framer.finish()
        return [self._event(tail.raw, tail.data)] if tail is not None else []

    def _event(self, raw: bytes, data: bytes | None) -> StreamEvent:
        if data is None:
            return StreamEvent(raw, raw)
        if data == _DONE:
            return StreamEvent(raw, raw, data, is_done=True)
        out = raw
        at = data.find(_USAGE_KEY)
        if at >= 0 and not _is_null_after(data, at + len(_USAGE_KEY)):
            obj = _loads(data)
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self.usage = _usage_from(obj["usage"])
                if self._hide_usage and not obj.get("choices"):
                    return StreamEvent(raw, b"", data)
        elif at >= 0 and self._hide_usage:
            out = raw.replace(_USAGE_NULL, b"")
        at = data.find(_FINISH)
        if at >= 0:
            start = at + len(_FINISH)
            self.finish_reason = data[start : data.find(b'"', start)].decode("utf-8", "replace")
        content = _has_text(data, _CONTENT) or _has_text(data, _ARGUMENTS)
        if content:
            self.content_events += 1
        return StreamEvent(raw, out, data, is_content=content)

    @staticmethod
    def error_event(message: str, code: str) -> bytes:
        """An OpenAI-style error frame then `[DONE]`: the SDKs raise on the former."""
        body = orjson.dumps({"error": {"message": message, "type": "server_error", "code": code}})
        return b"data: " + body + b"\n\ndata: [DONE]\n\n"


def _is_null_after(data: bytes, at: int) -> bool:
    """True if the JSON value after `"usage"` (colon, spaces) is `null`."""
    rest = data[at : at + 16].lstrip()
    return rest[:1] == b":" and rest[1:].lstrip()[:4] == b"null"


def _has_text(data: bytes, key: bytes) -> bool:
    at = data.find(key)
    return at >= 0 and data[at + len(key) : at + len(key) + 1] != b'"'


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _usage_from(usage: dict[str, Any]) -> Usage:
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    result = Usage()
    result.set_reported(
        prompt,
        completion,
        _int(usage.get("total_tokens")) or prompt + completion,
        cached=_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0,
        reasoning=_int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else 0,
    )
    return result


def _message_texts(messages: list[Any]):
    """Every text a request carries, for guards and token estimates."""
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                args = call["function"].get("arguments")
                if isinstance(args, str):
                    yield args
