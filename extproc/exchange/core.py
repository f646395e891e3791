"""`Exchange`: the state of one request/response pair and the one dispatch on the kind
of each ext_proc message (the server calls `on`, tests and benchmarks `handle`)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from extproc import envoy_wire as wire
from extproc.envoy_wire import Request, Response
from extproc.errors import SIDECAR_DETAILS_PREFIX, bounded, error_body, shown
from extproc.exchange import offpath, settle
from extproc.exchange import request as request_phase
from extproc.exchange import response as response_phase
from extproc.metrics import Metrics
from extproc.policy import Policy, Refusal, RequestContext
from extproc.usage import Usage

if TYPE_CHECKING:
    from extproc.providers.base import ResponseDecoder, StreamEvent
    from extproc.translate.base import ResponseTranslator

log = logging.getLogger("extproc.exchange")


class Flow(Protocol):
    """What happens after the request headers: inspected (`request.INSPECTED`) or passed
    through untouched (`PASS_THROUGH`, the null object). `metered`: usage is counted."""

    metered: bool

    async def request_body(self, ex: Exchange, body: bytes, now: float) -> Response: ...

    def response_headers(self, ex: Exchange, headers: dict[str, str], now: float) -> Response: ...


class BodyPhase(Protocol):
    """Answers one response chunk; swapped as the response goes (pass, stream, JSON,
    ended). `paced`: a per-token pace (tpot) means something for this answer."""

    paced: bool

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response: ...


class Exchange:
    """State for one request/response pair, fed by one ext_proc `Process` stream."""

    def __init__(self, policy: Policy, metrics: Metrics, now: float) -> None:
        self.policy = policy
        self.metrics = metrics
        self.started = now
        self.ctx: RequestContext | None = None
        self.route_name = "unknown"
        self.model = ""
        self.status = 0
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.error_kind = ""
        self.after: list[Awaitable[None]] = []  # I/O the server runs after answering
        self.flow: Flow = request_phase.PASS_THROUGH  # until an inspected API is routed
        self.body: BodyPhase = response_phase.PASS_BODY
        self.hide_usage = False
        self.decoder: ResponseDecoder | None = None
        # A translated exchange's answer writer (the client's API from the upstream's).
        self.translator: ResponseTranslator | None = None
        self.inflate: zlib._Decompress | None = None
        self.json: bytearray | None = None  # a whole JSON answer, kept (bounded) to meter
        self.json_tail: bytearray | None = None  # one too large to keep: its last bytes
        self.first_frame_at = 0.0
        self.response_id: str | None = None  # the answer's own id and model, if named
        self.response_model: str | None = None
        self.closed = False
        self.upstream_closed = False
        self.answered = False  # response headers came (the provider's, or Envoy's)
        self.request_id = ""  # Envoy's x-request-id
        self.traceparent = ""  # W3C: Envoy's span of the ext_proc call, else the request's
        self.trace_id = ""
        self.refused = ""  # the refusal's code, when the gateway answered
        self.report_at = settle.REPORT_FIRST  # content events at which a stream's figures
        # go to Envoy next (so a stream cut short still has them in the access log)
        self.prompt_estimate = -1  # computed once, for those figures
        self.off_path: offpath.Entry | None = None  # the body is metered by an observer
        # The request body answer's metadata: Envoy keeps it (and merges later answers'
        # fields in), so the response headers need not send the same again.
        self.reported: dict[str, object] | None = None
        metrics.active.inc()

    @property
    def consumer(self) -> str:
        return self.ctx.consumer if self.ctx else ""

    # -- dispatch -------------------------------------------------------------------

    def handle(self, request: Request, now: float) -> Response:
        """Every phase but the request body, which may wait on I/O (`on_request_body`)."""
        return self.on(request.WhichOneof("request"), request, now)  # type: ignore[return-value]

    def on(self, kind: str, request: Request, now: float) -> Response | Awaitable[Response]:
        """The one dispatch on the message kind. Only the request body's answer is an
        awaitable (its stages may wait on I/O); every other one is a `Response`."""
        if kind == "response_body":  # the hot path (one message per chunk): no table
            body = request.response_body
            return self.body.feed(self, body.body, body.end_of_stream, now)
        return _PHASES.get(kind, _response_trailers)(self, request, now)

    async def on_request_body(self, body: bytes, now: float) -> Response:
        return await self.flow.request_body(self, body, now)

    # -- answers shared by the phases ---------------------------------------------------

    def identity(self) -> dict[str, object]:
        """Who and which request, for every metadata answer (the access log joins the
        sidecar's log lines and the trace on `request_id` and `trace_id`)."""
        ids: dict[str, object] = {"request_id": self.request_id, "trace_id": self.trace_id}
        ctx = self.ctx
        if ctx is None:
            return ids
        return {**ids, "consumer": ctx.consumer, **ctx.metadata}

    def refuse(self, refusal: Refusal) -> Response:
        """Answer the client now, in its own API's error shape."""
        self.status = refusal.status
        self.refused = refusal.code or refusal.kind
        if refusal.status >= 400:
            self.error_kind = refusal.kind
            self.metrics.errors.labels(refusal.kind).inc()
            log.warning(
                "refused route=%s path=%s consumer=%s status=%d code=%s: %s",
                self.route_name,
                shown(self.ctx.path, 256) if self.ctx else "",  # query credentials stripped
                shown(self.consumer or "-"),
                refusal.status,
                refusal.code,
                bounded(refusal.message),
            )
        headers = dict(refusal.headers)
        if self.ctx is not None:
            headers = {**self.ctx.response_headers, **headers}
        body = refusal.body
        if body is None:  # in the caller's own API shape, so its SDK raises its usual error
            render = self.ctx.format.error_body if self.ctx is not None else error_body
            body = render(refusal.status, bounded(refusal.message), refusal.code, refusal.param)
        details = f"{SIDECAR_DETAILS_PREFIX}{refusal.code or refusal.status}"
        # The access log names who was refused and why.
        return wire.with_metadata(
            wire.refuse(refusal.status, headers, body, details),
            {
                "route": self.route_name,
                "model": shown(self.model),
                "refused": refusal.code or refusal.kind,
                "reason": refusal.kind,
                **self.identity(),
            },
        )

    def end_stream(
        self,
        message: str,
        code: str,
        now: float,
        end: bool,
        kind: str | None = None,
        before: StreamEvent | None = None,
    ) -> Response:
        """Too late for a status: end the stream with the format's error event
        (`before`: the first event it replaces, which some framings need to know);
        later chunks get the `ENDED` phase."""
        kind = kind or code
        log.warning(
            "ending stream route=%s model=%s: %s", self.route_name, shown(self.model), message
        )
        self.error_kind = kind
        self.metrics.errors.labels(kind).inc()
        self.body = response_phase.ENDED
        # A JSON answer that already started can get nothing well-formed after it.
        if self.translator is not None:  # the client reads its own API, not the upstream's
            tail = self.translator.stop(message, code)  # type: ignore[attr-defined]
        else:
            tail = self.decoder.error_event(message, code, before=before) if self.decoder else b""
        response = wire.replace_body(tail)
        if end:
            return self.finish(response, now)
        # The client may hang up at the error event's end marker, before the last chunk
        # reaches us: the access log learns why now.
        return wire.finished(response, {"reason": kind})

    def end_for_shutdown(self, now: float) -> bool:
        """The worker's grace period ends: the next chunk of an inspected event stream
        becomes the format's error event (+ `[DONE]`), and the one after closes the
        provider's stream (a closed ext_proc stream would let it through unfiltered).
        False when there is no such stream to end (nothing streamed yet, already
        ended, a JSON answer or an untouched body)."""
        body = self.body
        if self.closed or self.decoder is None or body is response_phase.ENDED:
            return False
        if self.off_path is not None:  # no chunk of it waits for an answer of ours
            return False
        if body is response_phase.CLOSING or isinstance(body, response_phase.ShutdownEnding):
            return False
        self.body = response_phase.ShutdownEnding()
        return True

    def finish(self, response: Response, now: float) -> Response:
        """Last response chunk: settle usage and hand the figures to Envoy."""
        settle.settle(self, now, complete=True)
        if offpath.observed(self):  # the observer's answer: Envoy reads none of it
            return response
        return wire.finished(response, settle.final_metadata(self))

    def close(self, now: float) -> None:
        """The ext_proc stream is over (normally, or the client/provider went away)."""
        if not self.closed and not offpath.handed_over(self):
            settle.settle(self, now, complete=False)


# -- the dispatch table -----------------------------------------------------------------


def _request_headers(ex: Exchange, request: Request, now: float) -> Response:
    return request_phase.request_headers(ex, request)


def _request_body(ex: Exchange, request: Request, now: float) -> Awaitable[Response]:
    return ex.flow.request_body(ex, request.request_body.body, now)


def _response_headers(ex: Exchange, request: Request, now: float) -> Response | Awaitable[Response]:
    answer = response_phase.response_headers(ex, request, now)
    return answer if ex.off_path is None else offpath.decide(ex, answer)


def _request_trailers(ex: Exchange, request: Request, now: float) -> Response:
    return wire.continue_trailers(request=True)


def _response_trailers(ex: Exchange, request: Request, now: float) -> Response:
    return wire.continue_trailers(request=False)


_PHASES: dict[str, Callable[[Exchange, Request, float], Response | Awaitable[Response]]] = {
    "request_headers": _request_headers,
    "request_body": _request_body,
    "response_headers": _response_headers,
    "request_trailers": _request_trailers,
    "response_trailers": _response_trailers,
}
