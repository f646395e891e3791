"""What a policy stage (auth, model policy, guards, limits) sees and may decide.

The exchange owns the protocol; stages own decisions. A stage reads and edits one
`RequestContext` per exchange and refuses with `Refusal`, so adding a policy never
means touching the ext_proc state machine.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from extproc.config import ProviderConfig, RouteConfig
from extproc.errors import GatewayError
from extproc.providers.base import RequestInfo, ResponseDecoder, StreamEvent, WireFormat
from extproc.usage import Usage


class Refusal(GatewayError):
    """Answer the client now, before anything reaches the provider.

    Rendered as an OpenAI-style error body (`{"error": {message, type, param, code}}`)
    unless `body` is given (e.g. a 200 list answered by the gateway itself).
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None,
        *,
        kind: str = "policy",
        param: str | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.kind = kind  # errors_total{kind} label and log keyword
        self.param = param
        self.headers = headers or {}
        self.body = body

    @classmethod
    def of(cls, error: GatewayError) -> Refusal:
        """Any error of the family as the answer it hints at (status, code, kind)."""
        if isinstance(error, Refusal):
            return error
        return cls(
            error.status,
            error.message,
            error.code,
            kind=error.kind,
            param=error.param,
        )


class StreamBlocked(GatewayError):
    """Raised by a stream filter: end the response with the format's error event."""

    status = 400  # a hint only: the response has started, the error event says it

    def __init__(self, message: str, code: str, kind: str = "guard_blocked") -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind


@dataclass(slots=True)
class RequestContext:
    """One exchange as the stages see it; the exchange applies what they set."""

    route: RouteConfig
    provider: ProviderConfig
    format: type[WireFormat]
    method: str
    path: str  # as the client sent it
    upstream_path: str  # after the route's rewrite
    headers: dict[str, str]  # request headers, lower-case names
    client_address: str = ""
    consumer: str = ""  # set by auth; "" = anonymous
    claims: dict[str, Any] = field(default_factory=dict)  # what auth learnt (JWT claims...)
    info: RequestInfo | None = None  # the parsed body, from the request-body phase on
    body_dirty: bool = False  # a stage changed info.body: re-serialise it upstream
    upstream_headers: dict[str, str] = field(default_factory=dict)  # set on the request
    remove_headers: list[str] = field(default_factory=list)  # removed from the request
    clear_route_cache: bool = False  # set when a stage changed a header routes match on
    response_headers: dict[str, str] = field(default_factory=dict)  # added for the client
    response_remove: list[str] = field(default_factory=list)  # removed for the client
    upstream_response: dict[str, str] = field(default_factory=dict)  # as Envoy sent them
    metadata: dict[str, Any] = field(default_factory=dict)  # extra dynamic metadata
    status: int = 0  # provider's status, from the response-headers phase on
    buffer_response: bool = False  # a stage needs whole non-streaming bodies
    # A stage must read that whole body (a response guard): one too large to keep, or
    # not JSON, is refused rather than passed on unread.
    must_read_response: bool = False
    # Set on a buffered answer once it was metered (its headers wait for the body):
    # the exact cost of a JSON answer, say.
    completion_headers: dict[str, str] = field(default_factory=dict)
    decoder: ResponseDecoder | None = None  # this response's decoder, for stream filters
    scratch: dict[str, Any] = field(default_factory=dict)  # per-stage state, keyed by stage
    # Guard findings for the trace: (phase, guard, type, action), never the matched text.
    findings: list[tuple[str, str, str, str]] = field(default_factory=list)
    content_type: str = ""  # the response's, from the response-headers phase on
    # A model alias served in another API: the `RequestTranslator` the exchange runs
    # after the stages (ctx.provider is then the target provider).
    translator: Any = None
    answered_by: Any = None  # failover: (translator, model) of a target in another API
    # Failover: the (provider, model) pairs that may answer in place of `provider` and
    # `info.model` (the target tried first); spend reserves the dearest of them.
    alternatives: tuple[tuple[str, str], ...] = ()


class StreamFilter(Protocol):
    """Sees every decoded event of a streamed response, in order.

    Return the very list it was given when nothing changed (the cheap path); otherwise
    a new list: events may get a new `out`, be held back and released later, or be
    dropped. `end` is true with the last chunk: release everything then. Raise
    `StreamBlocked` to end the stream cleanly.
    """

    def process(self, events: list[StreamEvent], end: bool) -> list[StreamEvent]: ...

    @property
    def oldest_held(self) -> StreamEvent | None:
        """The first event held back and not released yet (None: nothing held): where
        the client's stream stands if it has to end now."""
        ...


@runtime_checkable
class QuietFilter(StreamFilter, Protocol):
    """A filter with a pre-check on a chunk's plain text (`ResponseDecoder.plain_text`):
    `take` says True when `process` would pass the chunk untouched and hold nothing,
    having taken the text as `process` would have; False, changing nothing, else."""

    def take(self, text: str) -> bool: ...


# `isinstance(f, QuietFilter)` walks the protocol's members on every call (~12 us on
# Python 3.11, per filter per exchange); filters get them from their class, so the
# answer for the first (initialised) filter of a class holds for the class.
_QUIET_CLASSES: dict[type, bool] = {}


def is_quiet_filter(f: StreamFilter) -> bool:
    """`isinstance(f, QuietFilter)`, asked once per filter class."""
    cls = type(f)
    known = _QUIET_CLASSES.get(cls)
    if known is None:
        known = _QUIET_CLASSES[cls] = isinstance(f, QuietFilter)
    return known


class Stage:
    """A policy step. Every hook is optional; the defaults do nothing."""

    name = "stage"

    def on_request_headers(self, ctx: RequestContext) -> None:
        """Headers only (auth). Sync: nothing here may wait on I/O."""

    async def on_request(self, ctx: RequestContext) -> None:
        """The body is parsed (`ctx.info`): model policy, guards, limits. May await."""

    def on_response_headers(self, ctx: RequestContext) -> None:
        """The provider answered (`ctx.status`); add `ctx.response_headers` here."""

    def stream_filter(self, ctx: RequestContext) -> StreamFilter | None:
        """A filter for this exchange's streamed events, or None."""
        return None

    def on_completion(self, ctx: RequestContext, body: bytes) -> bytes | None:
        """A whole non-streaming answer (only when `ctx.buffer_response` was set):
        return a replacement body or None; raise Refusal to answer with an error."""
        return None

    def on_complete(
        self, ctx: RequestContext, usage: Usage, complete: bool
    ) -> Awaitable[None] | None:
        """The exchange is over (`complete` false: cut short). Settle accounting; return
        an awaitable for I/O, which runs after the last response went to Envoy."""
        return None
