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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

# The error family lives in errors; the decoders and formats raise these two.
from extproc.errors import RequestError, StreamError  # noqa: F401
from extproc.usage import Usage, estimate_prompt_tokens


class RequestInfo:
    """A checked request: model, stream flag, the parsed body, and its prompt texts.

    `prompt_texts` is every text the request carries, in a stable order (system,
    messages, parts, tool arguments); `WireFormat.replace_request_texts` writes a
    same-length list back. A format that parses a body passes `read_texts` (the walk of
    its text slots) instead of the list: the walk runs on first use, since only a guard,
    an estimate (token limit, spend, unreported usage) or a trace reads the texts, and a
    metering-only exchange never does (~6 us a request warm, 2-3x that through Envoy).
    No stage edits a text slot of `body` in place (masking goes through
    `replace_request_texts`, which assigns the list), so the walk gives the same list
    whenever it runs."""

    __slots__ = (
        "_read_texts",
        "_texts",
        "body",
        "client_wants_usage",
        "estimate",
        "estimate_of",
        "max_output_tokens",
        "model",
        "stream",
    )

    def __init__(
        self,
        model: str,
        stream: bool,
        body: dict[str, Any],
        prompt_texts: list[str] | None = None,
        client_wants_usage: bool = False,
        max_output_tokens: int | None = None,
        *,
        read_texts: Callable[[dict[str, Any]], list[str]] | None = None,
    ) -> None:
        self.model = model
        self.stream = stream
        self.body = body
        self.client_wants_usage = client_wants_usage
        self.max_output_tokens = max_output_tokens
        self._read_texts = read_texts
        if prompt_texts is None and read_texts is None:
            prompt_texts = []
        self._texts = prompt_texts
        # `prompt_estimate`'s cache: the list it was computed from, and the figure.
        self.estimate_of: list[str] | None = None
        self.estimate = 0

    @property
    def prompt_texts(self) -> list[str]:
        texts = self._texts
        if texts is None:  # first use: walk the body's text slots (`read_texts`)
            assert self._read_texts is not None
            texts = self._texts = self._read_texts(self.body)
        return texts

    @prompt_texts.setter
    def prompt_texts(self, texts: list[str]) -> None:
        self._texts = texts

    def _fields(self) -> tuple[object, ...]:
        return (
            self.model,
            self.stream,
            self.body,
            self.prompt_texts,
            self.client_wants_usage,
            self.max_output_tokens,
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it replaced

    def __repr__(self) -> str:
        return (
            f"RequestInfo(model={self.model!r}, stream={self.stream!r}, body={self.body!r}, "
            f"prompt_texts={self.prompt_texts!r}, "
            f"client_wants_usage={self.client_wants_usage!r}, "
            f"max_output_tokens={self.max_output_tokens!r})"
        )

    def prompt_estimate(self) -> int:
        """The offline prompt-token estimate (`estimate_prompt_tokens`), once per
        prompt: the token limit, the spend stage and settlement all ask for it (~35 us
        a request). A new `prompt_texts` (masking assigns one; it is never edited in
        place) is estimated afresh."""
        texts = self.prompt_texts
        if self.estimate_of is not texts:
            self.estimate = estimate_prompt_tokens(texts)
            self.estimate_of = texts
        return self.estimate


@dataclass(slots=True)
class TextDelta:
    """A piece of generated text in one event.

    `channel` says which running text it continues (a choice index, a content block
    index...), so a guard can follow one text across many events.
    """

    channel: int
    text: str
    kind: str = "content"  # content | tool_arguments | reasoning
    # The whole text of the channel again (OpenAI Responses' `*.done` events, a Gemini
    # function call's arguments): scan it on its own, do not append it to the running
    # text, or a guard would see everything twice.
    final: bool = False


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A tool call opens in this event: its id and function name (the arguments follow
    as `TextDelta`s of kind `tool_arguments` on the same `channel`). Translation needs
    them to emit another format's tool-call header; metering and guards do not."""

    channel: int
    id: str  # "" where the format gives calls no id (Gemini, mostly)
    name: str
    # The whole arguments as JSON, for formats that send a call in one piece (Gemini);
    # None when they follow as deltas.
    arguments: str | None = None


@dataclass(slots=True)
class StreamEvent:
    """One provider message on the wire (SSE frame, JSON array element, eventstream
    message)."""

    raw: bytes
    out: bytes  # what the client gets for it; `is raw` when untouched
    data: bytes | None = None  # the format's payload (SSE data, JSON element...)
    is_content: bool = False  # carries generated text a policy must see (deltas and
    # whole-text repeats such as Responses' `*.done`; decoders count deltas themselves)
    is_done: bool = False  # the format's explicit end marker
    name: str | None = None  # the format's event type, where it has one


class ResponseDecoder(Protocol):
    """Per-response, sans-I/O. Usage is cumulative: set, never added.

    `finish_reason` uses OpenAI's words whatever the provider (stop, length,
    tool_calls, content_filter, error; anything else lower-cased as sent), so metrics
    and limits need no per-provider table.
    """

    name: ClassVar[str]  # which decoder ran (a metrics label), e.g. "anthropic_sse"
    usage: Usage
    finish_reason: str | None
    content_events: int
    # The format's end marker passed (usage, where sent, comes before it): the answer
    # is complete even if the client hangs up before Envoy's end of stream reaches us.
    done: bool
    has_end_marker: ClassVar[bool]  # the format has one (Gemini's SSE, Bedrock's: no)

    @property
    def buffered(self) -> int:
        """Bytes held back because their event is not complete yet."""
        ...

    def feed(self, chunk: bytes) -> list[StreamEvent]: ...

    def feed_whole(self, chunk: bytes) -> bytes | None:
        """Fast path when no stream filter needs events: meter the chunk, return the
        bytes to forward (the chunk itself when untouched), or None to use `feed`."""
        ...

    def plain_text(self, chunk: bytes) -> str | None:
        """For a chunk `feed_whole` would take: its generated text if all of it is
        choice 0's content (channel 0, kind "content"), found by byte search without
        parsing ("" when it has none); None when unsure. Changes nothing."""
        ...

    def finish(self) -> list[StreamEvent]:
        """End of stream: whatever is left, as events."""
        ...

    def texts(self, event: StreamEvent) -> list[TextDelta]:
        """Generated text in this event (parses it; call only when a policy needs it)."""
        ...

    def tool_calls(self, event: StreamEvent) -> list[ToolCallStart]:
        """Tool calls this event opens (parses it, sharing the parse with `texts`)."""
        ...

    def rewrite(self, event: StreamEvent, texts: list[str]) -> bytes:
        """The event re-encoded in the provider's shape with `texts` (same order and
        count as `texts(event)`) in place of the originals."""
        ...

    def error_event(self, message: str, code: str, *, before: StreamEvent | None = None) -> bytes:
        """Bytes that end this stream cleanly with an error the client's SDK understands
        (with the format's end marker, e.g. `data: [DONE]` for OpenAI).

        The client is taken to have every event returned so far, or, with `before`,
        every event returned before that one (the stream is cut in front of it). Only
        framings with state between events (a Gemini JSON array) need it.
        """
        ...


class WireFormat(Protocol):
    """One API shape (OpenAI chat, Anthropic Messages...). Stateless: class methods."""

    name: ClassVar[str]

    @staticmethod
    def handles(upstream_path: str) -> bool:
        """True for the API paths this format inspects (others pass through)."""
        ...

    @staticmethod
    def parse_request(body: bytes, path: str = "") -> RequestInfo:
        """Validate the buffered body. `path` is the upstream path with its query: some
        formats carry the model (Gemini, Bedrock, Azure deployments) or the stream flag
        (Gemini's `:streamGenerateContent`) there, not in the body."""
        ...

    @staticmethod
    def replace_request_texts(info: RequestInfo, texts: list[str]) -> bytes:
        """The request body with `prompt_texts` replaced (guards' masking). Updates
        `info.body` and `info.prompt_texts` too, so `ensure_usage` keeps the masks."""
        ...

    @staticmethod
    def error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
        """A refusal (4xx/5xx JSON body) in this format's own error shape."""
        ...

    @staticmethod
    def client_credential(headers: Mapping[str, str], path: str = "") -> str | None:
        """The key the client presented where this format's SDKs put it
        (`Authorization: Bearer`, Anthropic's `x-api-key`, Azure's `api-key`...)."""
        ...

    @staticmethod
    def upstream_auth(key: str) -> list[tuple[str, str]]:
        """Request headers that carry the provider's own key upstream."""
        ...

    # Request headers that carry a client credential in this format (to strip them
    # before the request goes upstream with the provider's key).
    credential_headers: ClassVar[tuple[str, ...]]

    @staticmethod
    def response_decoder(
        content_type: str, *, stream: bool, hide_usage: bool, max_frame_bytes: int
    ) -> ResponseDecoder | None:
        """The incremental decoder for a response of this content type, or None when the
        body is one JSON document (use `completion_*`) or nothing this format reads."""
        ...

    @staticmethod
    def ensure_usage(info: RequestInfo) -> bytes | None:
        """A new body that makes the provider report usage, or None if nothing to do."""
        ...

    @staticmethod
    def stream_decoder(*, hide_usage: bool, max_frame_bytes: int) -> ResponseDecoder:
        """The format's usual streaming decoder (`response_decoder` picks by content type)."""
        ...

    @staticmethod
    def completion_usage(body: bytes) -> Usage | None:
        """Usage from a whole (non-streaming) JSON answer."""
        ...

    @staticmethod
    def completion_finish_reason(body: bytes) -> str | None:
        """Finish reason of a whole JSON answer, in OpenAI's words."""
        ...

    @staticmethod
    def completion_texts(body: bytes) -> list[TextDelta]:
        """Generated text in a whole JSON answer (every TextDelta is `final`)."""
        ...

    @staticmethod
    def rewrite_completion(body: bytes, texts: list[str]) -> bytes:
        """The answer re-encoded with `texts` in place of `completion_texts(body)`."""
        ...
