"""A model alias served in another API: the request translated after the stages, the
answer translated chunk by chunk in the same pass that meters and guards it.

Request: the stages ran on the client's body (guards masked its texts, limits
reserved from it); the `RequestTranslator` makes the upstream's path, headers and
body, and Envoy's route cache is cleared so the provider's dispatch route (matched on
`x-ai-gateway-provider` + `x-ai-gateway-translated`, no rewrite) picks the cluster.

Response: the upstream's own decoder frames and meters the stream (the upstream's
exact usage and finish reason, as for native traffic); the response guards read its
events and texts, and the translator writes the client's frames from the events and
the masked texts (`emit(events, texts)`). A whole JSON answer is buffered and
translated whole; an upstream refusal becomes the translator's error in the client's
shape (status mapped, Retry-After kept), answered in place of the provider's.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from extproc import envoy_wire as wire
from extproc.envoy_wire import CLEAR_BODY, BodyMode, Response
from extproc.errors import SIDECAR_DETAILS_PREFIX, shown
from extproc.exchange import response as response_phase
from extproc.exchange import settle, unreadable
from extproc.exchange.response import JSON_TAIL_BYTES
from extproc.headers import TRANSLATED_HEADER
from extproc.policy import Refusal, StreamBlocked, StreamFilter, credentials
from extproc.providers import RequestError, RequestInfo, decoder_label, format_for
from extproc.providers._json import usage_in_tail
from extproc.providers.base import ResponseDecoder, StreamEvent, WireFormat
from extproc.usage import Usage

if TYPE_CHECKING:
    from extproc.exchange.core import BodyPhase, Exchange
    from extproc.policy import RequestContext
    from extproc.translate.base import ResponseTranslator, UpstreamRequest

log = logging.getLogger("extproc.exchange")

# An upstream refusal is kept up to this size to translate its message.
MAX_ERROR_BYTES = 64 * 1024


def request(ex: Exchange, ctx: RequestContext, info: RequestInfo) -> Response:
    """The client's (checked, maybe masked) body as the target provider's request."""
    translator = ctx.translator
    try:
        upstream = translator.request(info.body, info.model)
    except RequestError as exc:
        return ex.refuse(Refusal.of(exc))
    headers = ctx.upstream_headers
    headers[":path"] = upstream.path
    headers.update(upstream.headers)
    headers["content-length"] = str(len(upstream.body))
    headers[TRANSLATED_HEADER] = "1"  # with x-ai-gateway-provider: the dispatch route
    body = upstream.body
    answer = translator.response(upstream, created=int(time.time()))
    if answer is None:
        # The same API on another path (Azure's deployments): the answer is read as
        # native traffic, usage asked for and hidden as for any native stream.
        if info.stream and ex.policy.config.streaming.ensure_usage:
            asked = ctx.format.ensure_usage(info)
            if asked is not None:
                body, ex.hide_usage = asked, True
                headers["content-length"] = str(len(body))
    else:
        ex.translator = answer
        ex.flow = Translated(format_for(ctx.provider.format), upstream)
    try:  # last: a provider with cloud credentials signs the final path and body
        credentials.finalize(ex.policy.cloud, ctx, body)
    except Refusal as refusal:
        return ex.refuse(refusal)
    ex.metrics.translations.labels(translator.source, translator.target).inc()
    # Every later metadata answer (and the access log) names who answered, and how.
    ctx.metadata["provider"] = ctx.provider.name
    ctx.metadata["upstream_format"] = translator.target
    response = wire.replace_request_body(body, headers, ctx.remove_headers, clear_route_cache=True)
    return wire.with_metadata(
        response, {"route": ex.route_name, "model": ex.model, **ex.identity()}
    )


class Translated:
    """The flow of a translated exchange (see `exchange.core.Flow`): the request body
    is past; the answer is read by the target's format and written in the client's."""

    metered = True
    __slots__ = ("target", "upstream")

    def __init__(self, target: type[WireFormat], upstream: UpstreamRequest) -> None:
        self.target = target
        self.upstream = upstream

    async def request_body(self, ex: Exchange, body: bytes, now: float) -> Response:
        return wire.continue_request_body()  # not reached: the flow is set by that phase

    def response_headers(self, ex: Exchange, headers: dict[str, str], now: float) -> Response:
        ctx = ex.ctx
        translator = ex.translator
        assert ctx is not None and translator is not None
        set_headers = ctx.response_headers
        if ex.status == 0:
            return wire.continue_response_headers(set_headers, body=BodyMode.SKIP)
        if ex.status >= 400:
            response_phase.upstream_failed(ex)
            ex.body = Refused(ex.status, headers)
            return wire.continue_response_headers(set_headers, body=BodyMode.BUFFERED)
        remove = ["content-length"]  # the body is the translator's
        coding = unreadable.choose_inflation(ex, headers)  # as native
        if coding is not None:
            return unreadable.refuse_unreadable(ex, f"content encoding ({coding})", now)
        if ex.inflate is not None:
            remove.append("content-encoding")
        ctx.content_type = headers.get("content-type", "")
        body: BodyPhase
        if self.upstream.stream:
            decoder = translator.decoder
            ex.decoder = decoder  # metering and interim figures read the upstream's
            guarded = ctx.decoder = Masked(decoder)  # the guards' rewrites land here
            filters = [
                f for stage in ex.policy.stages if (f := stage.stream_filter(ctx)) is not None
            ]
            body = TranslatedStream(translator, filters, guarded)
            set_headers["content-type"] = translator.content_type
            mode = BodyMode.AS_CONFIGURED
            ex.metrics.child(ex.metrics.decoders, decoder.name).inc()
        else:
            body = TranslatedWhole(self.target)
            set_headers["content-type"] = "application/json"
            mode = BodyMode.BUFFERED  # translated in one piece
            ex.metrics.child(ex.metrics.decoders, decoder_label(self.target, None)).inc()
        inflated = ex.inflate is not None
        after = response_phase.Inflating(body) if inflated else body
        first = response_phase.FirstChunk(body, after)
        ex.body = response_phase.Inflating(first) if inflated else first
        answer = wire.continue_response_headers(set_headers, remove, body=mode)
        return wire.with_metadata(
            answer, {"route": ex.route_name, "model": shown(ex.model), **ex.identity()}
        )


class Masked:
    """The upstream decoder as the stream guards see it (`ctx.decoder`): `rewrite`
    keeps a guard's masked texts for the translator instead of re-encoding the
    upstream's frame, which never reaches the client. Keyed by the event's `raw`
    (a guard's replacement event shares it); taken back as the event is emitted."""

    __slots__ = ("_decoder", "kept", "texts", "tool_calls")

    def __init__(self, decoder: ResponseDecoder) -> None:
        self._decoder = decoder
        self.texts = decoder.texts
        self.tool_calls = decoder.tool_calls
        self.kept: dict[int, list[str]] = {}

    def rewrite(self, event: StreamEvent, texts: list[str]) -> bytes:
        self.kept[id(event.raw)] = list(texts)
        return event.raw

    def client_texts(self, event: StreamEvent) -> list[str]:
        """The event's texts as the client gets them (a guard's masks, when it gave
        any): what `telemetry.capture_content` keeps of a translated stream."""
        kept = self.kept.get(id(event.raw))
        return kept if kept is not None else [d.text for d in self._decoder.texts(event)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._decoder, name)


class TranslatedStream:
    """An upstream event stream: decoded, guarded, written in the client's frames."""

    __slots__ = ("filters", "guarded", "translator")
    paced = True

    def __init__(
        self, translator: ResponseTranslator, filters: list[StreamFilter], guarded: Masked
    ) -> None:
        self.translator = translator
        self.filters = filters
        self.guarded = guarded

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        translator = self.translator
        decoder = translator.decoder
        events: list[StreamEvent] = []
        out = b""
        # No guard reads the events: the translator may take the chunk whole.
        whole = None if self.filters else translator.feed_whole(chunk)  # type: ignore[attr-defined]
        if whole is not None:
            out, broken = whole
        else:
            events, broken = translator.decode(chunk, end)  # type: ignore[attr-defined]
        if broken:  # the translator ended the client's stream with an error frame
            ex.error_kind = "malformed_stream"
            ex.metrics.errors.labels("malformed_stream").inc()
            log.warning(
                "unreadable upstream stream route=%s model=%s", ex.route_name, shown(ex.model)
            )
            ex.body = response_phase.ENDED
            response = wire.replace_body(out + broken)
            return ex.finish(response, now) if end else response
        if not ex.first_frame_at and decoder.content_events:
            ex.first_frame_at = now
        if whole is None:  # the events, read by the guards, then written
            texts: list[list[str] | None] | None = None
            if self.filters:
                passed = events
                try:
                    for stream_filter in self.filters:
                        passed = stream_filter.process(passed, end)
                except StreamBlocked as blocked:
                    return ex.end_stream(blocked.message, blocked.code, now, end, blocked.kind)
                if passed is not events:
                    kept = self.guarded.kept
                    texts = [kept.pop(id(event.raw), None) for event in passed]
                    events = passed
            out = translator.emit(events, texts)
        if end:
            out += translator.close()  # type: ignore[attr-defined]
            response_phase._check_end(ex, decoder)
        response = wire.replace_body(out)
        if end or response_phase._just_done(ex, decoder):
            return ex.finish(response, now)
        if decoder.content_events >= ex.report_at and not ex.closed:
            return settle.progress(ex, response)
        return response


class TranslatedWhole:
    """A whole JSON answer (buffered): translated in one piece, metered from the
    upstream's own document, checked by the response guards in the client's shape."""

    __slots__ = ("kept", "target")
    paced = False

    def __init__(self, target: type[WireFormat]) -> None:
        self.target = target
        self.kept = bytearray()

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        kept = self.kept
        if len(kept) + len(chunk) > ex.policy.config.streaming.max_json_response_bytes:
            # Not translated, but charged: the upstream's usage is in its last bytes.
            tail = bytes(kept[-JSON_TAIL_BYTES:]) + chunk[-JSON_TAIL_BYTES:]
            ex.usage = usage_in_tail(tail, self.target.completion_usage) or ex.usage
            settle.settle(ex, now, complete=True)
            return ex.refuse(
                Refusal(
                    502,
                    "The provider's answer is too large to translate.",
                    "upstream_too_large",
                    kind="malformed_stream",
                )
            )
        kept += chunk
        if not end:
            return CLEAR_BODY  # buffered: the whole answer comes in one message
        upstream = bytes(kept)
        translator = ex.translator
        ctx = ex.ctx
        assert translator is not None and ctx is not None
        body = translator.whole(upstream)
        ex.usage = self.target.completion_usage(upstream) or Usage()
        ex.finish_reason = self.target.completion_finish_reason(upstream)
        if ctx.buffer_response:
            try:
                for stage in ex.policy.stages:
                    body = stage.on_completion(ctx, body) or body
            except Refusal as refusal:
                settle.settle(ex, now, complete=True)
                return ex.refuse(refusal)
        settle.settle(ex, now, complete=True)  # metered now: stages may name the cost
        if ctx.completion_headers:  # Envoy still holds a buffered answer's headers
            return ex.finish(wire.body_with_headers(body, ctx.completion_headers), now)
        return ex.finish(wire.replace_body(body), now)


class Refused:
    """An upstream refusal (buffered): answered with the translator's error in the
    client's shape, in place of the provider's response (its headers included: only
    Retry-After is kept)."""

    __slots__ = ("headers", "kept", "upstream_status")
    paced = False

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.upstream_status = status
        self.headers = headers
        self.kept = bytearray()

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        if len(self.kept) < MAX_ERROR_BYTES:
            self.kept += chunk[: MAX_ERROR_BYTES - len(self.kept)]
        if not end:
            return CLEAR_BODY
        translator = ex.translator
        assert translator is not None
        error = translator.error(self.upstream_status, self.headers, bytes(self.kept))
        ex.status = error.status
        ctx = ex.ctx
        headers = {**(ctx.response_headers if ctx else {}), **dict(error.headers)}
        settle.settle(ex, now, complete=True)
        details = f"{SIDECAR_DETAILS_PREFIX}upstream_{self.upstream_status}"
        return wire.with_metadata(
            wire.refuse(error.status, headers, error.body, details),
            settle.final_metadata(ex),
        )
