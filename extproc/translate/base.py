"""The translation contract: a client API on one side, an upstream API on the other.

Sans-I/O like `providers/`: a `RequestTranslator` turns the client's parsed JSON body
into the upstream request (path, headers to set, body bytes) or refuses it with a
`RequestError` naming the part the target cannot take; the matching
`ResponseTranslator` is fed the upstream's response chunk by chunk and gives the
client's bytes for each chunk (the upstream's own decoder from `providers/` frames it,
meters it and yields the neutral texts, tool calls, finish and usage). No clock, no
socket: the caller passes `created`, the time the client sees.

`extproc/exchange/translated.py` runs them in the exchange (docs/translation.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from extproc.errors import bounded
from extproc.errors import error_body as openai_error_body
from extproc.providers._json import loads
from extproc.providers.base import (
    RequestError,
    ResponseDecoder,
    StreamError,
    StreamEvent,
    TextDelta,
)
from extproc.sse import FrameTooLarge
from extproc.usage import Usage

__all__ = [
    "RequestError",
    "RequestTranslator",
    "ResponseTranslator",
    "TranslatedError",
    "UpstreamRequest",
    "client_status",
    "openai_error",
]


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """What goes upstream: the wiring sets `path` and `headers` on the request (with
    the provider's credentials, which are not the translator's business) and replaces
    the body."""

    path: str
    body: bytes
    stream: bool
    model: str
    headers: tuple[tuple[str, str], ...] = ()
    # The client asked for the usage chunk (OpenAI's `stream_options.include_usage`).
    include_usage: bool = False


@dataclass(frozen=True, slots=True)
class TranslatedError:
    """An upstream refusal (non-2xx before the stream) in the client's error shape."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class ResponseTranslator(Protocol):
    """One response, upstream format in, client format out.

    `decoder` is the upstream format's own decoder (metering reads `decoder.usage`
    and `decoder.finish_reason`: the upstream's exact figures, as for native traffic).
    """

    decoder: ResponseDecoder
    content_type: ClassVar[str]  # of the translated stream

    @property
    def buffered(self) -> int:
        """Bytes held back for an unfinished upstream frame (bounded by the decoder)."""
        ...

    def feed(self, chunk: bytes) -> bytes:
        """The client's bytes for this upstream chunk (b"" while a frame is incomplete):
        `emit(decoder.feed(chunk))`."""
        ...

    def emit(self, events: list[StreamEvent], texts: list[list[str] | None] | None = None) -> bytes:
        """The client's bytes for events the caller took from `decoder.feed` itself,
        so a guard could read them first: `texts[i]`, when given, replaces the texts
        of `events[i]` (same order and count as `decoder.texts(events[i])`), and the
        client gets the masked words, as with native traffic."""
        ...

    def finish(self) -> bytes:
        """End of the upstream stream: the rest, or an error if it ended early."""
        ...

    def whole(self, body: bytes) -> bytes:
        """A non-streaming upstream answer (one JSON document) translated whole."""
        ...

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> TranslatedError:
        """An upstream error response (before any stream) for the client."""
        ...


class DecoderDriven:
    """What every `ResponseTranslator` does with its upstream decoder: feed it each chunk
    and `emit` the events; a broken or oversized upstream frame ends the stream through
    `_broke` (never an exception), and an upstream that ends without its end marker
    through `_end_of_stream`. Subclasses define `emit`, `_broke`, `_end_of_stream` and
    the `decoder`, `_broken`, `_done` slots."""

    __slots__ = ()
    decoder: ResponseDecoder
    _broken: bool
    _done: bool

    @property
    def buffered(self) -> int:
        return self.decoder.buffered

    def feed(self, chunk: bytes) -> bytes:
        if self._broken:
            return b""
        try:
            events = self.decoder.feed(chunk)
        except (StreamError, FrameTooLarge) as exc:
            return self.emit(exc.before) + self._broke(exc)
        return self.emit(events)

    def finish(self) -> bytes:
        if self._broken:
            return b""
        try:
            events = self.decoder.finish()
        except (StreamError, FrameTooLarge) as exc:
            return self._broke(exc)
        out = self.emit(events)
        if not self._done:
            out += self._end_of_stream()
        return out

    def decode(self, chunk: bytes, end: bool = False) -> tuple[list[StreamEvent], bytes]:
        """`feed` in two steps, for a caller whose guards read the upstream's events
        before `emit`: the events of this chunk (and the decoder's rest when `end`),
        and the client's bytes when the upstream stream broke (then no events)."""
        if self._broken:
            return [], b""
        try:
            events = self.decoder.feed(chunk)
            if end:
                events += self.decoder.finish()
        except (StreamError, FrameTooLarge) as exc:
            return [], self._broke(exc)
        return events, b""

    def feed_whole(self, chunk: bytes) -> tuple[bytes, bytes] | None:
        """`decode` and `emit` in one pass for a caller with no guards reading the
        events: (the client's bytes, the error bytes when the upstream stream broke),
        or None (nothing consumed) to take those two steps. Translators without a
        whole-chunk path always say None."""
        return None

    def close(self) -> bytes:
        """After `decode(..., end=True)` and `emit`: the error when the upstream ended
        without its end marker (b"" when the client's stream is complete)."""
        if self._broken or self._done:
            return b""
        return self._end_of_stream()

    def stop(self, message: str, code: str) -> bytes:
        """End the client's stream now with an error event in its format (a guard
        blocked it, the gateway shuts down); b"" when it has ended already."""
        raise NotImplementedError

    def emit(self, events: list[StreamEvent], texts: list[list[str] | None] | None = None) -> bytes:
        raise NotImplementedError

    def _broke(self, exc: Exception) -> bytes:
        raise NotImplementedError

    def _end_of_stream(self) -> bytes:
        raise NotImplementedError


class RequestTranslator(Protocol):
    """One client API -> one upstream API. Stateless apart from its settings."""

    source: ClassVar[str]  # client API, e.g. "openai_chat" (a metrics label)
    target: ClassVar[str]  # upstream API, e.g. "anthropic_messages"

    def request(self, body: dict[str, Any], model: str | None = None) -> UpstreamRequest:
        """The upstream request, or RequestError (400 naming the refused part).
        `body` is the client's as its WireFormat parsed it; `model` the upstream's
        model name when an alias renamed it."""
        ...

    def response(self, upstream: UpstreamRequest, *, created: int) -> ResponseTranslator:
        """The translator for the answer to `upstream`."""
        ...


# --------------------------------------------------------------------------- errors

# Upstream statuses a client can act on as they are; the rest are the gateway's problem.
_KEPT = frozenset({400, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504})
# Headers of an upstream refusal worth passing on.
KEPT_ERROR_HEADERS = ("retry-after", "retry-after-ms")


def client_status(upstream: int) -> int:
    """The status a client gets for an upstream error status.

    Overloaded (Anthropic's 529) is 503; an upstream 401/403 is the provider refusing
    the gateway's credential, not the client's, so 502; other 4xx are 400, other 5xx 502.
    """
    if upstream in _KEPT:
        return upstream
    if upstream == 529:
        return 503
    if upstream in (401, 403):
        return 502
    return 400 if 400 <= upstream < 500 else 502


def kept_headers(headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Retry-After (and the -ms variant) from an upstream refusal; nothing else (no
    provider request ids or rate-limit headers naming the gateway's account)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return tuple((name, lowered[name]) for name in KEPT_ERROR_HEADERS if name in lowered)


def openai_error(
    status: int, headers: Mapping[str, str], message: Any, code: Any
) -> TranslatedError:
    """An upstream refusal as OpenAI's `{"error": {...}}` with the mapped status.
    `message` and `code` are as the upstream's JSON held them: anything but a string
    counts as absent."""
    shown = client_status(status)
    code = code if isinstance(code, str) else None
    if isinstance(message, str) and message:
        text = bounded(message)
    else:
        text = f"The upstream provider answered {status}."
    if status in (401, 403):
        # The provider's words about the gateway's key are not for the client.
        text = f"The upstream provider refused the gateway's credentials ({status})."
        code = "upstream_auth_error"
    return TranslatedError(
        shown,
        openai_error_body(shown, text, code),
        (("content-type", "application/json"), *kept_headers(headers)),
    )


def refuse(message: str, param: str, code: str = "unsupported_parameter") -> RequestError:
    """The 400 for a part of the request the target cannot take."""
    return RequestError(message, code, param)


def replaced_texts(
    decoder: ResponseDecoder, event: StreamEvent, texts: list[str] | None
) -> list[TextDelta]:
    """`decoder.texts(event)`, with a guard's replacements when it gave any."""
    deltas = decoder.texts(event)
    if texts is None:
        return deltas
    if len(texts) != len(deltas):
        raise ValueError(f"expected {len(deltas)} texts, got {len(texts)}")
    return [TextDelta(d.channel, t, d.kind, d.final) for d, t in zip(deltas, texts, strict=True)]


def data_url(url: str) -> tuple[str, str] | None:
    """`data:<type>;base64,<data>` -> (type, data); None for anything else."""
    head, comma, data = url.partition(",")
    if not comma or not head.startswith("data:") or not head.endswith(";base64"):
        return None
    return head[5:-7].lower(), data


def data_url_in(obj: Any, key: str) -> tuple[str, str] | None:
    """`obj[key]` as `data_url` reads it, when `obj` is an object and that a string
    (an `image_url.url`, a `file.file_data`)."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return data_url(value) if isinstance(value, str) else None


def json_object(data: bytes | None) -> dict[str, Any]:
    """An upstream JSON document as an object: `{}` for anything else (a translator
    reads what is there and never raises on content)."""
    obj = loads(data)
    return obj if isinstance(obj, dict) else {}


def usage_json(usage: Usage) -> dict[str, Any]:
    """The neutral usage in OpenAI Chat's shape (always with both details objects)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
