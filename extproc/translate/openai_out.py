"""The OpenAI side of every `* -> OpenAI chat` translation: `chat.completion.chunk`
SSE bytes from neutral pieces, and the driver that feeds an upstream decoder.

The chunks are what OpenAI sends: a role chunk first, one chunk per content,
reasoning or tool-call delta (a tool call's first chunk carries `index`, `id`,
`type` and `function.name` with empty arguments, later ones only `index` and
`function.arguments`), a finish chunk with an empty delta, then (only when the client
asked with `stream_options.include_usage`) a `choices: []` usage chunk, and
`data: [DONE]`. While usage is asked every other chunk carries `"usage":null`, as
OpenAI's do. Reasoning goes out as `delta.reasoning_content`, the field DeepSeek and
vLLM use (the openai SDK keeps it as an extra field; clients that do not know it
ignore it).

Each chunk is the delta's text between byte templates built once per stream (id,
created, model, the delta's key and the chunk's tail): a text chunk costs one
`orjson.dumps` of the string, or none when the upstream's frame already holds the
escaped text as orjson writes it (`ChunkWriter.escaped`, fed by a decoder's byte
search).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from extproc.errors import bounded
from extproc.providers.base import ResponseDecoder, StreamError, StreamEvent, TextDelta
from extproc.translate.base import DecoderDriven, TranslatedError, replaced_texts, usage_json
from extproc.usage import Usage

DONE = b"data: [DONE]\n\n"
# Finish reasons an OpenAI client knows; the decoders already speak OpenAI's words.
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})
MAX_TOOL_CALLS = 1024  # per stream: the index map stays small whatever the upstream sends


def finish_reason(reason: str | None) -> str:
    """A decoder's finish reason as one of OpenAI's; anything else (Anthropic's
    `pause_turn`, an unknown new reason) reads as `stop`."""
    return reason if reason in FINISH_REASONS else "stop"


def error_frame(message: str, code: str, kind: str = "server_error") -> bytes:
    """An error frame then `[DONE]`: the openai SDK raises APIError on the former."""
    body = orjson.dumps({"error": {"message": bounded(message), "type": kind, "code": code}})
    return b"data: " + body + b"\n\n" + DONE


class ChunkWriter:
    """Bytes of one `chat.completion.chunk` stream (one choice, index 0)."""

    __slots__ = (
        "_created",
        "_finish_suffix",
        "_head",
        "_include_usage",
        "_open",
        "_tail",
        "_tools",
        "finished",
        "started",
    )

    def __init__(self, *, created: int, include_usage: bool) -> None:
        self._created = created
        self._include_usage = include_usage
        self._head = b""
        self._finish_suffix = b""
        self._tail = b""
        # A text chunk's bytes before its JSON string, by delta kind (rebuilt at start).
        self._open: dict[str, bytes] = {}
        self._templates()
        self._tools: dict[int, int] = {}  # upstream channel -> OpenAI tool-call index
        self.started = False
        self.finished = False

    def start(self, ident: str, model: str) -> bytes:
        """The role chunk (and the prefix every later chunk shares)."""
        if self.started:
            return b""
        self.started = True
        self._head = (
            b'data: {"id":'
            + orjson.dumps(ident)
            + b',"object":"chat.completion.chunk","created":'
            + str(self._created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"choices":[{"index":0,"delta":'
        )
        usage = b',"usage":null' if self._include_usage else b""
        self._finish_suffix = b"}]" + usage + b"}\n\n"
        self._templates()
        return self._chunk(b'{"role":"assistant","content":"","refusal":null}')

    def _templates(self) -> None:
        """The text chunks' bytes around their JSON string, from `_head` and the suffix."""
        self._tail = b'},"logprobs":null,"finish_reason":null' + self._finish_suffix
        head = self._head
        self._open = {
            "content": head + b'{"content":',
            "reasoning": head + b'{"reasoning_content":',
        }

    def _chunk(self, delta: bytes, finish: bytes = b"null") -> bytes:
        return (
            self._head + delta + b',"logprobs":null,"finish_reason":' + finish + self._finish_suffix
        )

    def text(self, delta: TextDelta) -> bytes:
        """One upstream text delta (content, reasoning or tool arguments)."""
        if not delta.text or delta.final:
            return b""
        return self._string(delta.kind, delta.channel, orjson.dumps(delta.text))

    def escaped(self, kind: str, channel: int, string: bytes) -> bytes:
        """`text` for a delta whose JSON string (quotes included) is already written
        as `orjson.dumps` writes it: the decoder found it in the upstream's bytes."""
        if len(string) <= 2:  # `""`: an empty delta sends nothing, as in `text`
            return b""
        return self._string(kind, channel, string)

    def _string(self, kind: str, channel: int, string: bytes) -> bytes:
        opening = self._open.get(kind)
        if opening is not None:  # content, reasoning
            return opening + string + self._tail
        index = self._tools.get(channel)
        head = b""
        if index is None:  # arguments without a start: open the call (no name known)
            head = self.tool_start(channel, f"call_{channel}", "")
            index = self._tools[channel]
        return head + self._chunk(
            b'{"tool_calls":[{"index":%d,"function":{"arguments":%b}}]}' % (index, string)
        )

    def tool_start(self, channel: int, ident: str, name: str) -> bytes:
        """A tool call's first chunk: index, id, type, name, empty arguments."""
        if channel in self._tools:
            return b""
        if len(self._tools) >= MAX_TOOL_CALLS:
            raise StreamError(f"more than {MAX_TOOL_CALLS} tool calls in one answer")
        index = self._tools[channel] = len(self._tools)
        call = {"index": index, "id": ident, "type": "function"}
        call["function"] = {"name": name, "arguments": ""}  # type: ignore[assignment]
        return self._chunk(b'{"tool_calls":[' + orjson.dumps(call) + b"]}")

    @property
    def tool_calls(self) -> int:
        return len(self._tools)

    def finish(self, reason: str | None) -> bytes:
        """The finish chunk (once)."""
        if self.finished:
            return b""
        self.finished = True
        mapped = finish_reason(reason)
        if mapped == "stop" and self._tools:
            mapped = "tool_calls"  # an upstream that says STOP after a call (Gemini)
        return self._chunk(b"{}", b'"' + mapped.encode() + b'"')

    def end(self, usage: Usage, reason: str | None) -> bytes:
        """Finish chunk if still due, the usage chunk if asked, `[DONE]`."""
        out = self.finish(reason)
        if self._include_usage:
            head = self._head[: self._head.rindex(b'"choices"')]
            out += head + b'"choices":[],"usage":' + orjson.dumps(usage_json(usage)) + b"}\n\n"
        return out + DONE


class DecoderToOpenAI(DecoderDriven):
    """A `ResponseTranslator` skeleton: runs the upstream decoder over each chunk and
    hands every event to `_event`, which appends the client's bytes. A broken or
    oversized upstream frame ends the stream with an error frame, never an exception.

    The decoder's `finish_reason` and `usage` are its state after the whole chunk, not
    after the event at hand: a decision about one event (is this the finish? an
    exception?) reads the event itself, or the bytes would depend on the chunking."""

    content_type: ClassVar[str] = "text/event-stream"
    __slots__ = ("_broken", "_created", "_done", "_model", "_texts", "decoder", "writer")

    def __init__(
        self, decoder: ResponseDecoder, *, created: int, include_usage: bool, model: str = ""
    ) -> None:
        """`model` is the requested one, for an upstream whose answer may not name it."""
        self.decoder = decoder
        self.writer = ChunkWriter(created=created, include_usage=include_usage)
        self._created = created
        self._model = model
        self._done = False
        self._broken = False  # the decoder failed: it is fed nothing more
        self._texts: list[str] | None = None  # a guard's texts for the event at hand

    def emit(self, events: list[StreamEvent], texts: list[list[str] | None] | None = None) -> bytes:
        """See `base.ResponseTranslator.emit`."""
        if self._done:
            for event in events:  # still metered by the decoder; nothing more to send
                self._after_done(event)
            return b""
        out: list[bytes] = []
        hook = self._event
        try:
            if texts is None:  # the usual case: no guard replaced a text
                for event in events:
                    if self._done:
                        self._after_done(event)
                    else:
                        hook(event, out)
            else:
                for event, replaced in zip(events, texts, strict=True):
                    if self._done:
                        self._after_done(event)
                    else:
                        self._texts = replaced
                        hook(event, out)
        except StreamError as exc:
            out.append(self._fail(str(exc), "malformed_stream"))
        finally:
            self._texts = None
        return b"".join(out)

    def texts(self, event: StreamEvent) -> list[TextDelta]:
        """The event's texts as the client gets them (a guard's, when it gave any)."""
        return replaced_texts(self.decoder, event, self._texts)

    def _broke(self, exc: Exception) -> bytes:
        self._broken = True
        return self._fail(f"The upstream stream could not be read: {exc}", "malformed_stream")

    def stop(self, message: str, code: str) -> bytes:
        """See `DecoderDriven.stop`: an error frame and `[DONE]`."""
        return self._fail(message, code)

    def _fail(self, message: str, code: str, kind: str = "server_error") -> bytes:
        if self._done:
            return b""
        self._done = True
        return self._start_if_needed() + error_frame(message, code, kind)

    def _start_if_needed(self) -> bytes:
        return b"" if self.writer.started else self.writer.start("chatcmpl-gateway", "")

    def _complete(self) -> bytes:
        """The normal end: finish (if not sent), usage (if asked), [DONE]."""
        self._done = True
        decoder = self.decoder
        return self._start_if_needed() + self.writer.end(decoder.usage, decoder.finish_reason)

    def _end_of_stream(self) -> bytes:
        """The upstream closed without its end marker: an error the SDK raises."""
        return self._fail("The upstream stream ended before its end marker.", "upstream_truncated")

    # ------------------------------------------------------------------ hooks

    def _event(self, event: StreamEvent, out: list[bytes]) -> None:
        raise NotImplementedError

    def _after_done(self, event: StreamEvent) -> None:
        """An upstream event after the client's stream ended (metering only)."""

    def _deltas(self, event: StreamEvent, out: list[bytes]) -> None:
        """Tool-call starts, then texts, of one event, through the writer."""
        decoder = self.decoder
        writer = self.writer
        if not writer.started:
            out.append(self._start_if_needed())
        for call in decoder.tool_calls(event):
            out.append(writer.tool_start(call.channel, call.id, call.name))
        for delta in self.texts(event):
            out.append(writer.text(delta))

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> TranslatedError:
        raise NotImplementedError

    def whole(self, body: bytes) -> bytes:
        raise NotImplementedError


def completion(
    *,
    ident: str,
    created: int,
    model: str,
    texts: list[str],
    thoughts: list[str],
    tool_calls: list[dict[str, Any]],
    finish: str | None,
    usage: Usage,
) -> bytes:
    """A whole `chat.completion` (non-streaming answers), usage always included: the
    upstream's text blocks joined (content null for an answer of tool calls only), its
    thinking blocks joined as `reasoning_content`."""
    content = "".join(texts) if texts or not tool_calls else None
    reasoning = "".join(thoughts)
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    reason = finish_reason(finish)
    if reason == "stop" and tool_calls:
        reason = "tool_calls"
    return orjson.dumps(
        {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            ],
            "usage": usage_json(usage),
        }
    )


def tool_call(ident: str, name: str, arguments: Any) -> dict[str, Any]:
    """One whole tool call; object arguments become the JSON string OpenAI sends."""
    text = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": text}}
