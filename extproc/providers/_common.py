"""Pieces every wire format needs: strict JSON body parsing with the gateway's error
codes (in `_json`, re-exported here), text slots (where a text lives in a parsed body,
to read it and write it back in place), an SSE decoder skeleton, SSE frame
re-encoding, credential headers, and `JSONWireFormat`, the `WireFormat` methods that
differ between formats only by where things live (a hook or class attribute each)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import orjson

from extproc.errors import StreamError
from extproc.errors import error_body as openai_error_body
from extproc.providers._json import (  # noqa: F401
    figure,
    figures,
    loads,
    optional_bool,
    optional_int,
    parse_json_object,
    reject_duplicate_keys,
    request_model,
    require_string,
    uint,
)

# The JSON helpers live in `_json`; the formats import them from here with the rest.
from extproc.providers._typed import (  # noqa: F401
    AmbiguousEvent,
    check_type,
    event_kind,
    leading_type,
    opens_with_type,
)
from extproc.providers.base import RequestInfo, StreamEvent, TextDelta, ToolCallStart
from extproc.sse import Frame, SSEFramer
from extproc.usage import Usage

# --------------------------------------------------------------------------- text slots


class Slot:
    """One text inside a parsed JSON body: read it, write a replacement back.

    `as_json` marks a value that is a JSON object, not a string (Gemini and Bedrock
    tool arguments, Anthropic's tool input in a request): it is shown to guards as
    compact JSON and parsed back on write.
    """

    __slots__ = ("as_json", "channel", "container", "final", "key", "kind")

    def __init__(
        self,
        container: Any,
        key: Any,
        channel: int = 0,
        kind: str = "content",
        final: bool = False,
        as_json: bool = False,
    ) -> None:
        self.container = container
        self.key = key
        self.channel = channel
        self.kind = kind
        self.final = final
        self.as_json = as_json

    def get(self) -> str:
        value = self.container[self.key]
        return orjson.dumps(value).decode() if self.as_json else value

    def set(self, text: str) -> None:
        if self.as_json:
            parsed = loads(text)
            # A mask that broke the JSON must still never leak the original.
            self.container[self.key] = parsed if isinstance(parsed, dict) else {"text": text}
        else:
            self.container[self.key] = text

    def delta(self) -> TextDelta:
        return TextDelta(self.channel, self.get(), self.kind, self.final)


def string_slot(container: Any, key: Any, **kw: Any) -> Slot | None:
    """A slot if `container[key]` is a string (None otherwise)."""
    if isinstance(container, dict):
        if isinstance(container.get(key), str):
            return Slot(container, key, **kw)
    elif isinstance(container, list) and isinstance(container[key], str):
        return Slot(container, key, **kw)
    return None


def object_slot(container: Any, key: Any, **kw: Any) -> Slot | None:
    """A JSON-object slot if `container[key]` is a dict (tool arguments as objects)."""
    if isinstance(container, dict) and isinstance(container.get(key), dict):
        return Slot(container, key, as_json=True, **kw)
    return None


def read_slots(slots: Iterable[Slot]) -> list[TextDelta]:
    return [slot.delta() for slot in slots]


def write_slots(slots: list[Slot], texts: list[str]) -> None:
    if len(slots) != len(texts):
        raise ValueError(f"expected {len(slots)} texts, got {len(texts)}")
    for slot, text in zip(slots, texts, strict=True):
        slot.set(text)


def text_parts(parts: Any) -> Iterator[Slot]:
    """The `text` of each part that has a string one (prompt text blocks and parts)."""
    for part in dicts(parts):
        if isinstance(part.get("text"), str):
            yield Slot(part, "text")


def content_slots(container: dict[str, Any], key: str) -> Iterator[Slot]:
    """`container[key]` when it is a string, else its text parts: the string-or-parts
    shape of OpenAI message content and Anthropic's `system`."""
    value = container.get(key)
    if isinstance(value, str):
        yield Slot(container, key)
    else:
        yield from text_parts(value)


def dicts(value: Any) -> Iterable[dict[str, Any]]:
    """The dict items of a list (anything else: none), for tolerant walks."""
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                yield item


def index_of(obj: dict[str, Any], key: str, default: int) -> int:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def channel(outer: int, inner: int = 0) -> int:
    """One int for a two-level position (choice and tool call, output and content)."""
    return (outer << 16) | inner


# --------------------------------------------------------------------------- SSE

_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def line_ending(raw: bytes) -> bytes:
    """The first line terminator in `raw` (LF when there is none)."""
    at = raw.find(b"\n")
    cr = raw.find(b"\r")
    if cr >= 0 and (at < 0 or cr < at):
        return b"\r\n" if raw[cr + 1 : cr + 2] == b"\n" else b"\r"
    return b"\n"


def sse_reframe(raw: bytes, data: bytes) -> bytes:
    """`raw` (one SSE frame) with its data replaced by `data`, everything else kept:
    `event:`/`id:` lines, comments, line endings, the blank line that ends it."""
    out: list[bytes] = []
    placed = False
    eol = line_ending(raw)
    for line in _LINE.findall(raw):
        if line.startswith(b"data:") or line.rstrip(b"\r\n") == b"data":
            if not placed:
                out.append(b"data: " + data + eol)
                placed = True
            continue
        out.append(line)
    if not placed:  # a frame without data gets one before its blank line
        at = len(out) - 1 if out and out[-1] in (b"\n", b"\r\n", b"\r") else len(out)
        out.insert(at, b"data: " + data + eol)
    return b"".join(out)


class EventDecoder:
    """What every decoder shares: the metered state and the parse cache behind
    `texts`/`rewrite` (a guard asks for the texts, then rewrites the same event: one
    parse). Subclasses write `feed`, `finish`, `_slots` (where the texts of one parsed
    payload live) and `_encode` (the payload back into the wire frame)."""

    name: ClassVar[str] = "events"
    # The format has an explicit end marker (`done` turns true): an end without it is
    # a truncated answer.
    has_end_marker: ClassVar[bool] = False
    __slots__ = ("_cache", "content_events", "done", "finish_reason", "usage")

    def __init__(self) -> None:
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.content_events = 0
        self.done = False  # the format's end marker passed: the answer is complete
        self._cache: tuple[StreamEvent, Any, list[Slot]] | None = None

    def _delta(self, raw: bytes, data: bytes, content: bool, name: str | None) -> StreamEvent:
        """A delta event, counted in `content_events` only when it carries text (an
        empty delta, or a signature, is not content)."""
        if content:
            self.content_events += 1
        return StreamEvent(raw, raw, data, is_content=content, name=name)

    def feed_whole(self, chunk: bytes) -> bytes | None:
        """Fast path for a chunk that no stream filter reads: meter it without making
        events and return the bytes to forward (`chunk` itself when untouched), or
        None to take the per-event path. Formats without one always say None."""
        return None

    def plain_text(self, chunk: bytes) -> str | None:
        """The guards' pre-check: for a chunk `feed_whole` takes, all the generated text
        it carries when that is choice 0's content alone, found without parsing; None
        when unsure (the chunk is then parsed). Formats without one always say None."""
        return None

    def _slots(self, event: StreamEvent, obj: Any) -> list[Slot]:
        raise NotImplementedError

    def _encode(self, event: StreamEvent, obj: Any) -> bytes:
        raise NotImplementedError

    def _parsed(self, event: StreamEvent) -> tuple[Any, list[Slot]]:
        cache = self._cache
        if cache is not None and cache[0] is event:
            return cache[1], cache[2]
        obj = loads(event.data)
        slots = self._slots(event, obj) if obj is not None else []
        self._cache = (event, obj, slots)
        return obj, slots

    def texts(self, event: StreamEvent) -> list[TextDelta]:
        if event.data is None:
            return []
        return read_slots(self._parsed(event)[1])

    def tool_calls(self, event: StreamEvent) -> list[ToolCallStart]:
        """Formats that translation reads override this; the others open none."""
        return []

    def rewrite(self, event: StreamEvent, texts: list[str]) -> bytes:
        if event.data is None:
            if texts:
                raise ValueError(f"expected 0 texts, got {len(texts)}")
            return event.out
        obj, slots = self._parsed(event)
        if not slots and not texts:
            return event.out
        write_slots(slots, texts)
        self._cache = None  # the parsed object now holds the new texts
        return self._encode(event, obj)


class SSEDecoder(EventDecoder):
    """An SSE-framed decoder: subclasses write `_event` (the hot path: byte searches,
    no JSON unless usage is due) and `_slots`."""

    name: ClassVar[str] = "sse"
    __slots__ = ("_eol", "_framer")

    def __init__(self, max_frame_bytes: int) -> None:
        super().__init__()
        self._framer = SSEFramer(max_frame_bytes)
        self._eol: bytes | None = None

    @property
    def buffered(self) -> int:
        return self._framer.buffered

    def feed(self, chunk: bytes) -> list[StreamEvent]:
        frames = self._framer.feed(chunk)
        if frames and self._eol is None:
            self._eol = line_ending(frames[0].raw)
        events: list[StreamEvent] = []
        append, event = events.append, self._event
        try:
            for frame in frames:
                append(event(frame))
        except StreamError as exc:
            exc.before = events
            raise
        return events

    def finish(self) -> list[StreamEvent]:
        tail = self._framer.finish()
        return [self._event(tail)] if tail is not None else []

    def _event(self, frame: Frame) -> StreamEvent:
        raise NotImplementedError

    def _encode(self, event: StreamEvent, obj: Any) -> bytes:
        return sse_reframe(event.raw, orjson.dumps(obj))

    @property
    def eol(self) -> bytes:
        """The stream's own line ending, for the events the gateway adds."""
        return self._eol or b"\n"

    def _frame(self, data: bytes, event: bytes | None = None) -> bytes:
        """A frame the gateway adds (an error event), in the stream's line endings."""
        eol = self.eol
        head = b"event: " + event + eol if event is not None else b""
        return head + b"data: " + data + eol + eol


# --------------------------------------------------------------------------- HTTP bits


def bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value.strip() or None if value is not None else None


def path_only(path: str) -> str:
    return path.split("?", 1)[0]


def query_param(path: str, name: str) -> str | None:
    values = parse_qs(urlsplit(path).query).get(name)
    return values[0] if values else None


def normalize_finish(value: Any, table: Mapping[str, str]) -> str | None:
    """A provider's stop reason in OpenAI's words (unknown ones lower-cased as sent)."""
    if not isinstance(value, str) or not value:
        return None
    return table.get(value, value.lower())


# --------------------------------------------------------------------------- formats


class JSONWireFormat:
    """The `WireFormat` methods every JSON format writes alike, each derived from one
    hook or class attribute: `key_header` (auth), `stream_content_type` and
    `stream_decoder` (decoders), `_prompt_slots` (request texts), `_completion_slots`
    (answer texts), `_usage` and `_finish` (a whole answer's metering). A format
    overrides a method outright where its logic differs (Gemini's usage, Chat's
    `ensure_usage`); everything stays callable on the class, as `WireFormat` says."""

    name: ClassVar[str]
    # The header the format's SDKs put a key in, and the provider's key goes upstream
    # in; None: `Authorization: Bearer` (OpenAI, Bedrock API keys, Vertex OAuth).
    key_header: ClassVar[str | None] = None
    # A query parameter some SDKs carry the key in instead (Gemini's `?key=`).
    key_query: ClassVar[str | None] = None
    # Derived from `key_header` (see `__init_subclass__`).
    credential_headers: ClassVar[tuple[str, ...]] = ("authorization",)
    # The content type of a streamed answer (`response_decoder` reads it).
    stream_content_type: ClassVar[str] = "text/event-stream"
    # The end of the API paths the format inspects (the inherited `handles` reads it);
    # formats whose paths carry more (Gemini's model, Bedrock's) override `handles`.
    path_suffix: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        key = cls.key_header
        cls.credential_headers = (key, "authorization") if key else ("authorization",)

    # ------------------------------------------------------------------ hooks

    @staticmethod
    def stream_decoder(*, hide_usage: bool, max_frame_bytes: int) -> Any:
        raise NotImplementedError

    @staticmethod
    def _prompt_slots(body: dict[str, Any]) -> Iterable[Slot]:
        """Where the prompt texts of a parsed request live, in `prompt_texts` order."""
        raise NotImplementedError

    @staticmethod
    def _completion_slots(obj: Any) -> Iterable[Slot]:
        """Where the generated texts of a parsed whole answer (any JSON) live."""
        raise NotImplementedError

    @staticmethod
    def _usage(usage: dict[str, Any]) -> Usage:
        """A whole answer's `usage` object as the neutral Usage."""
        raise NotImplementedError

    @staticmethod
    def _finish(obj: dict[str, Any]) -> str | None:
        """A whole answer's finish reason, in OpenAI's words."""
        raise NotImplementedError

    @staticmethod
    def _dump_completion(original: bytes, obj: Any) -> bytes:
        """A rewritten answer's bytes (Gemini keeps its pretty-printing)."""
        return orjson.dumps(obj)

    # ------------------------------------------------------------------ derived

    @classmethod
    def handles(cls, upstream_path: str) -> bool:
        return path_only(upstream_path).rstrip("/").endswith(cls.path_suffix)

    @classmethod
    def _request_info(
        cls,
        obj: dict[str, Any],
        *,
        model: str,
        stream: bool,
        max_output_tokens: int | None,
        client_wants_usage: bool = True,
    ) -> RequestInfo:
        """A checked request's RequestInfo; its `prompt_texts` are read on first use."""
        return RequestInfo(
            model=model,
            stream=stream,
            body=obj,
            client_wants_usage=client_wants_usage,
            max_output_tokens=max_output_tokens,
            read_texts=cls._read_prompt_texts,
        )

    @classmethod
    def _read_prompt_texts(cls, body: dict[str, Any]) -> list[str]:
        """Every prompt text, by `_prompt_slots`: the walk `replace_request_texts` writes."""
        return [slot.get() for slot in cls._prompt_slots(body)]

    @classmethod
    def replace_request_texts(cls, info: RequestInfo, texts: list[str]) -> bytes:
        write_slots(list(cls._prompt_slots(info.body)), texts)
        info.prompt_texts = list(texts)
        return orjson.dumps(info.body)

    @staticmethod
    def ensure_usage(info: RequestInfo) -> bytes | None:
        return None  # most formats always report usage: nothing to switch on

    @staticmethod
    def error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
        """The gateway's own (OpenAI) error shape; formats with another override it."""
        return openai_error_body(status, message, code, param)

    @classmethod
    def client_credential(cls, headers: Mapping[str, str], path: str = "") -> str | None:
        if cls.key_header is not None:
            key = header(headers, cls.key_header)
            if key:
                return key
        if cls.key_query is not None:
            key = query_param(path, cls.key_query)
            if key:
                return key
        return bearer(headers)

    @classmethod
    def upstream_auth(cls, key: str) -> list[tuple[str, str]]:
        if cls.key_header is not None:
            return [(cls.key_header, key)]
        return [("authorization", f"Bearer {key}")]

    @classmethod
    def response_decoder(
        cls, content_type: str, *, stream: bool, hide_usage: bool, max_frame_bytes: int
    ) -> Any:
        if content_type.lower().startswith(cls.stream_content_type):
            return cls.stream_decoder(hide_usage=hide_usage, max_frame_bytes=max_frame_bytes)
        return None

    @classmethod
    def completion_usage(cls, body: bytes) -> Usage | None:
        obj = loads(body)
        usage = obj.get("usage") if isinstance(obj, dict) else None
        return cls._usage(usage) if isinstance(usage, dict) else None

    @classmethod
    def completion_finish_reason(cls, body: bytes) -> str | None:
        obj = loads(body)
        return cls._finish(obj) if isinstance(obj, dict) else None

    @classmethod
    def completion_texts(cls, body: bytes) -> list[TextDelta]:
        return read_slots(cls._completion_slots(loads(body)))

    @classmethod
    def rewrite_completion(cls, body: bytes, texts: list[str]) -> bytes:
        obj = loads(body)
        slots = list(cls._completion_slots(obj))
        if not slots and not texts:
            return body
        write_slots(slots, texts)
        return cls._dump_completion(body, obj)
