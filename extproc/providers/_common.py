"""Pieces every wire format needs: strict JSON body parsing with the gateway's error
codes, text slots (where a text lives in a parsed body, to read it and write it back
in place), an SSE decoder skeleton, SSE frame re-encoding and credential headers."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import orjson

from extproc.providers.base import RequestError, StreamEvent, TextDelta
from extproc.sse import Frame, SSEFramer
from extproc.usage import Usage

# --------------------------------------------------------------------------- JSON


def loads(data: bytes | str | None) -> Any:
    """Parsed JSON, or None when it is not JSON (a decoder never raises on content)."""
    if data is None:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def uint(value: Any) -> int:
    """A token count as reported: non-negative int, anything else counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def parse_json_object(body: bytes, expected: str) -> dict[str, Any]:
    """The request body as a JSON object, or the RequestError a client can act on."""
    if not body.strip():
        raise RequestError(f"The request body is empty; expected {expected}.", "missing_body")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("The request body is not valid UTF-8.", "invalid_encoding") from None
        raise RequestError(
            f"We could not parse the JSON body of your request ({exc}).", "invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise RequestError("The request body must be a JSON object.", "invalid_type")
    return obj


def require_string(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        raise RequestError(
            f"You must provide a {name} parameter.", "missing_required_parameter", name
        )
    if not isinstance(value, str) or not value:
        raise RequestError(f"Invalid '{name}': expected a non-empty string.", "invalid_type", name)
    return value


def request_model(obj: Mapping[str, Any], default: str | None = None) -> str:
    """The body's `model`; "" when absent, so a policy default can still fill it (the
    exchange refuses a request that is still without one after the policy stages)."""
    value = obj.get("model")
    if value is None:
        return default or ""
    if not isinstance(value, str) or not value:
        raise RequestError("Invalid 'model': expected a non-empty string.", "invalid_type", "model")
    return value


def optional_bool(obj: Mapping[str, Any], name: str) -> bool:
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"Invalid type for '{name}': expected a boolean.", "invalid_type", name)
    return value


def optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
    __slots__ = ("_cache", "content_events", "finish_reason", "usage")

    def __init__(self) -> None:
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.content_events = 0
        self._cache: tuple[StreamEvent, Any, list[Slot]] | None = None

    def feed_whole(self, chunk: bytes) -> bytes | None:
        """Fast path for a chunk that no stream filter reads: meter it without making
        events and return the bytes to forward (`chunk` itself when untouched), or
        None to take the per-event path. Formats without one always say None."""
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
        return [self._event(f) for f in frames]

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
