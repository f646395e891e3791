"""AWS Bedrock Converse API: `POST /model/{modelId}/converse-stream` and `/converse`.

The stream is binary `application/vnd.amazon.eventstream` (see `eventstream`); each
message's `:event-type` header names the event and its payload is JSON:
`messageStart`, `contentBlockStart` (tool use), `contentBlockDelta` (`text`,
`toolUse.input`, `reasoningContent.text`), `contentBlockStop`, `messageStop`
(`stopReason`) and last `metadata` (`usage`, `metrics`). Payloads carry a `p` field of
random padding, kept as is. Errors mid-stream are messages with `:message-type`
`exception` (boto3 raises EventStreamError). Only `messageStop` and `metadata` are
parsed on the hot path. Usage is always reported.

Usage: prompt = inputTokens + cacheReadInputTokens + cacheWriteInputTokens (Bedrock
reports the cache counts apart from inputTokens), cached = cacheReadInputTokens.
Requests are not signed here: a provider's `auth: {type: aws_sigv4}` makes the gateway
sign the final request (`extproc.cloudauth`), and Bedrock API keys (`Authorization:
Bearer`) need no signing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import orjson

from extproc.providers._common import (
    EventDecoder,
    JSONWireFormat,
    Slot,
    dicts,
    figures,
    index_of,
    loads,
    normalize_finish,
    object_slot,
    parse_json_object,
    path_only,
    string_slot,
    text_parts,
)
from extproc.providers._fields import bedrock_extras
from extproc.providers.base import RequestError, RequestInfo, StreamEvent, ToolCallStart
from extproc.providers.eventstream import (
    EventStreamSplitter,
    Message,
    encode_message,
)
from extproc.providers.eventstream import message as eventstream_message
from extproc.usage import Usage

CONTENT_TYPE = "application/vnd.amazon.eventstream"
_PATH = re.compile(r"/model/([^/]+)/(converse|converse-stream)/?$")
_EMPTY_TEXT = b'"delta":{"text":""}'
_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
# Bedrock's exception names by HTTP status (boto3 maps them onto its error classes).
ERROR_TYPES = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    413: "ValidationException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
# In-stream exception event names, by the gateway's error code.
_STREAM_EXCEPTIONS = {
    "rate_limited": "throttlingException",
    "throttled": "throttlingException",
    "validation": "validationException",
}


class BedrockConverse(JSONWireFormat):
    """The Bedrock Converse / ConverseStream wire format. Clients present Bedrock API
    keys as `Authorization: Bearer` (a SigV4 Authorization is not a key); the metadata
    event always carries usage."""

    name = "bedrock_converse"
    stream_content_type = CONTENT_TYPE

    @staticmethod
    def handles(upstream_path: str) -> bool:
        return _PATH.search(path_only(upstream_path)) is not None

    @classmethod
    def parse_request(cls, body: bytes, path: str = "") -> RequestInfo:
        obj = parse_json_object(body, "a JSON object with 'messages'")
        match = _PATH.search(path_only(path))
        if match is None:
            raise RequestError(
                "The model is missing: expected a path like /model/{modelId}/converse-stream.",
                "missing_required_parameter",
                "modelId",
            )
        messages = obj.get("messages")
        if messages is not None and not isinstance(messages, list):
            raise RequestError(
                "1 validation error detected: Value at 'messages' failed to satisfy "
                "constraint: Member must be a list",
                "invalid_type",
                "messages",
            )
        config = obj.get("inferenceConfig")
        max_out = config.get("maxTokens") if isinstance(config, dict) else None
        return cls._request_info(
            obj,
            model=unquote(match.group(1)),
            stream=match.group(2) == "converse-stream",
            max_output_tokens=max_out if isinstance(max_out, int) else None,
        )

    @staticmethod
    def error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
        """`{"message": ...}` as Bedrock sends it, plus `__type` (the exception name
        botocore reads when the `x-amzn-ErrorType` header is absent)."""
        kind = ERROR_TYPES.get(
            status, "InternalServerException" if status >= 500 else "ValidationException"
        )
        return orjson.dumps({"message": message, "__type": kind})

    @staticmethod
    def stream_decoder(*, hide_usage: bool, max_frame_bytes: int) -> BedrockStream:
        return BedrockStream(max_frame_bytes)

    @staticmethod
    def _prompt_slots(body: dict[str, Any]) -> Iterator[Slot]:
        return _request_slots(body)

    @staticmethod
    def _completion_slots(obj: Any) -> Iterator[Slot]:
        return _completion_slots(obj)

    @staticmethod
    def _usage(usage: dict[str, Any]) -> Usage:
        return _usage_from(usage)

    @staticmethod
    def _finish(obj: dict[str, Any]) -> str | None:
        return normalize_finish(obj.get("stopReason"), _FINISH)


class BedrockStream(EventDecoder):
    """Decoder for one ConverseStream event stream."""

    name = "bedrock_eventstream"
    __slots__ = ("_splitter",)

    def __init__(self, max_frame_bytes: int) -> None:
        super().__init__()
        self._splitter = EventStreamSplitter(max_frame_bytes)

    @property
    def buffered(self) -> int:
        return self._splitter.buffered

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        return [self._event(m) for m in self._splitter.feed(chunk)]

    def finish(self) -> list[StreamEvent]:
        self._splitter.finish()
        return []

    def _event(self, msg: Message) -> StreamEvent:
        raw = msg.raw
        headers = msg.headers
        kind = headers.get(":message-type", "event")
        if kind != "event":
            self.finish_reason = "error"
            name = headers.get(":exception-type") or headers.get(":error-code") or kind
            return StreamEvent(raw, raw, msg.payload, name=str(name))
        name = headers.get(":event-type")
        name = name if isinstance(name, str) else None
        payload = msg.payload
        if name == "contentBlockDelta":
            # Empty only as the one delta `{"text":""}` (an empty text elsewhere, a
            # repeated key or an escape would hide from the guards what boto3 shows).
            empty = (
                _EMPTY_TEXT in payload
                and payload.count(b'"text"') == 1
                and payload.count(b'"delta"') == 1
                and b"\\u" not in payload
            )
            return self._delta(raw, payload, not empty, name)
        if name == "metadata":
            obj = loads(payload)
            if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                self.usage = _usage_from(obj["usage"])
            # ConverseStream's last event: the answer is complete here (a client may hang
            # up at it, before Envoy's end of stream: the figures go with this chunk).
            self.done = True
        elif name == "messageStop":
            obj = loads(payload)
            if isinstance(obj, dict):
                self.finish_reason = normalize_finish(obj.get("stopReason"), _FINISH)
        return StreamEvent(raw, raw, payload, name=name)

    def _slots(self, event: StreamEvent, obj: Any) -> list[Slot]:
        if event.name != "contentBlockDelta" or not isinstance(obj, dict):
            return []
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return []
        index = index_of(obj, "contentBlockIndex", 0)
        slot = string_slot(delta, "text", channel=index)
        if slot is None and isinstance(delta.get("toolUse"), dict):
            slot = string_slot(delta["toolUse"], "input", channel=index, kind="tool_arguments")
        if slot is None and isinstance(delta.get("reasoningContent"), dict):
            slot = string_slot(delta["reasoningContent"], "text", channel=index, kind="reasoning")
        return [slot] if slot is not None else []

    def tool_calls(self, event: StreamEvent) -> list[ToolCallStart]:
        """A `contentBlockStart` of a tool use: its id and name."""
        if event.name != "contentBlockStart":
            return []
        obj = self._parsed(event)[0]
        start = obj.get("start") if isinstance(obj, dict) else None
        tool = start.get("toolUse") if isinstance(start, dict) else None
        if not isinstance(tool, dict):
            return []
        ident, name = tool.get("toolUseId"), tool.get("name")
        if not isinstance(ident, str) or not isinstance(name, str):
            return []
        return [ToolCallStart(index_of(obj, "contentBlockIndex", 0), ident, name)]

    def _encode(self, event: StreamEvent, obj: Any) -> bytes:
        raw = event.raw
        headers_end = 12 + int.from_bytes(raw[4:8], "big")
        return encode_message(raw[12:headers_end], orjson.dumps(obj))

    def error_event(self, message: str, code: str, *, before: StreamEvent | None = None) -> bytes:
        """An exception message (`:message-type` exception): boto3 raises EventStreamError."""
        kind = _STREAM_EXCEPTIONS.get(code, "internalServerException")
        return eventstream_message(
            [
                (":exception-type", kind),
                (":content-type", "application/json"),
                (":message-type", "exception"),
            ],
            orjson.dumps({"message": message}),
        )


def _usage_from(usage: dict[str, Any]) -> Usage:
    counts = figures(
        usage, "cacheReadInputTokens", "cacheWriteInputTokens", "inputTokens", "outputTokens"
    )
    result = Usage()
    if counts is None:  # a figure that is no count: not trusted, the estimate stands
        return result
    cache_read, cache_write, inputs, completion = counts
    prompt = inputs + cache_read + cache_write
    result.set_reported(
        prompt, completion, prompt + completion, cached=cache_read, cache_write=cache_write
    )
    return result


def _completion_slots(obj: Any) -> Iterator[Slot]:
    output = obj.get("output") if isinstance(obj, dict) else None
    msg = output.get("message") if isinstance(output, dict) else None
    if not isinstance(msg, dict):
        return
    for position, block in enumerate(dicts(msg.get("content"))):
        slot = string_slot(block, "text", channel=position, final=True)
        if slot is None and isinstance(block.get("toolUse"), dict):
            slot = object_slot(
                block["toolUse"], "input", channel=position, kind="tool_arguments", final=True
            )
        if slot is None and isinstance(block.get("reasoningContent"), dict):
            reasoning = block["reasoningContent"].get("reasoningText")
            slot = string_slot(reasoning, "text", channel=position, kind="reasoning", final=True)
        if slot is not None:
            yield slot


def _request_slots(obj: dict[str, Any]) -> Iterator[Slot]:
    """Prompt texts in order: `system` text blocks, then each message's content blocks
    (text, toolUse input, toolResult text/json). Reasoning blocks are signed: left out."""
    yield from text_parts(obj.get("system"))
    for msg in dicts(obj.get("messages")):
        for block in dicts(msg.get("content")):
            if isinstance(block.get("text"), str):
                yield Slot(block, "text")
            elif isinstance(block.get("toolUse"), dict):
                slot = object_slot(block["toolUse"], "input", kind="tool_arguments")
                if slot is not None:
                    yield slot
            elif isinstance(block.get("toolResult"), dict):
                for part in dicts(block["toolResult"].get("content")):
                    if isinstance(part.get("text"), str):
                        yield Slot(part, "text")
                    else:
                        slot = object_slot(part, "json")
                        if slot is not None:
                            yield slot
    yield from bedrock_extras(obj)
