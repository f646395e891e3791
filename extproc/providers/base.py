"""The provider-neutral contract every wire format implements.

Request side: parse the buffered JSON body into `RequestInfo` (model, stream flag,
prompt text for guards and estimates) and, where the format needs it, rewrite the body
so that the provider reports usage. Response side: a `ResponseDecoder` eats chunks and
yields `StreamEvent`s, each carrying its exact wire bytes (`raw`) and the bytes to
forward (`out`): `out is raw` is the cheap default meaning "untouched".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

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
    prompt_texts: list[str] = field(default_factory=list)
    client_wants_usage: bool = False
    max_output_tokens: int | None = None


@dataclass(slots=True)
class StreamEvent:
    """One provider message on the wire (an SSE frame, for the formats so far)."""

    raw: bytes
    out: bytes  # what the client gets for it; `is raw` when untouched
    data: bytes | None = None
    is_content: bool = False  # carries generated output (counts toward estimates)
    is_done: bool = False  # the format's explicit end marker


class ResponseDecoder(Protocol):
    usage: Usage
    finish_reason: str | None
    content_events: int

    @property
    def buffered(self) -> int:
        """Bytes held back because their frame is not complete yet."""
        ...

    def feed(self, chunk: bytes) -> list[StreamEvent]: ...

    def finish(self) -> list[StreamEvent]: ...

    def error_event(self, message: str, code: str) -> bytes:
        """Bytes that end this stream cleanly with an error the client's SDK understands."""
        ...
