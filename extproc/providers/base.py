"""The provider-neutral contract every wire format implements.

Everything above `providers/` (auth, guards, limits, metrics, the exchange) talks to
these types only and never asks which provider it is looking at.

Request side: a `WireFormat` parses the buffered JSON body into `RequestInfo` (model,
stream flag, the prompt texts guards read and may rewrite) and, where the format
needs it, switches on usage reporting. Response side: a `ResponseDecoder` eats chunks
and yields `StreamEvent`s, each carrying its exact wire bytes (`raw`) and the bytes to
forward (`out`): `out is raw` is the cheap default meaning "untouched". Text is parsed
out of an event only when a policy asks (`texts`), and put back in the provider's own
frame shape (`rewrite`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from extproc.usage import Usage


class RequestError(Exception):
    """A client request the gateway refuses before it reaches the provider."""

    def __init__(self, message: str, code: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.status = status


@dataclass(slots=True)
class RequestInfo:
    model: str
    stream: bool
    body: dict[str, Any]
    # Every text the request carries, in a stable order (system, messages, parts, tool
    # arguments). `WireFormat.replace_request_texts` writes a same-length list back.
    prompt_texts: list[str] = field(default_factory=list)
    client_wants_usage: bool = False
    max_output_tokens: int | None = None


@dataclass(slots=True)
class TextDelta:
    """A piece of generated text in one event.

    `channel` says which running text it continues (a choice index, a content block
    index...), so a guard can follow one text across many events.
    """

    channel: int
    text: str
    kind: str = "content"  # content | tool_arguments | reasoning


@dataclass(slots=True)
class StreamEvent:
    """One provider message on the wire (SSE frame, JSON array element, eventstream
    message)."""

    raw: bytes
    out: bytes  # what the client gets for it; `is raw` when untouched
    data: bytes | None = None  # the format's payload (SSE data, JSON element...)
    is_content: bool = False  # carries generated output (counts toward estimates)
    is_done: bool = False  # the format's explicit end marker
    name: str | None = None  # the format's event type, where it has one


class ResponseDecoder(Protocol):
    """Per-response, sans-I/O. Usage is cumulative: set, never added."""

    usage: Usage
    finish_reason: str | None
    content_events: int

    @property
    def buffered(self) -> int:
        """Bytes held back because their event is not complete yet."""
        ...

    def feed(self, chunk: bytes) -> list[StreamEvent]: ...

    def finish(self) -> list[StreamEvent]:
        """End of stream: whatever is left, as events."""
        ...

    def texts(self, event: StreamEvent) -> list[TextDelta]:
        """Generated text in this event (parses it; call only when a policy needs it)."""
        ...

    def rewrite(self, event: StreamEvent, texts: list[str]) -> bytes:
        """The event re-encoded in the provider's shape with `texts` (same order and
        count as `texts(event)`) in place of the originals."""
        ...

    def error_event(self, message: str, code: str) -> bytes:
        """Bytes that end this stream cleanly with an error the client's SDK understands
        (with the format's end marker, e.g. `data: [DONE]` for OpenAI)."""
        ...


class WireFormat(Protocol):
    """One API shape (OpenAI chat, Anthropic Messages...). Stateless: class methods."""

    name: ClassVar[str]

    @staticmethod
    def handles(upstream_path: str) -> bool:
        """True for the API paths this format inspects (others pass through)."""
        ...

    @staticmethod
    def parse_request(body: bytes) -> RequestInfo: ...

    @staticmethod
    def replace_request_texts(info: RequestInfo, texts: list[str]) -> bytes:
        """The request body with `prompt_texts` replaced (guards' masking)."""
        ...

    @staticmethod
    def ensure_usage(info: RequestInfo) -> bytes | None:
        """A new body that makes the provider report usage, or None if nothing to do."""
        ...

    @staticmethod
    def stream_decoder(*, hide_usage: bool, max_frame_bytes: int) -> ResponseDecoder: ...

    @staticmethod
    def completion_usage(body: bytes) -> Usage | None:
        """Usage from a whole (non-streaming) JSON answer."""
        ...

    @staticmethod
    def completion_texts(body: bytes) -> list[TextDelta]: ...

    @staticmethod
    def rewrite_completion(body: bytes, texts: list[str]) -> bytes: ...
