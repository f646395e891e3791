"""The response phases: the headers choose how the body is read (`BodyPhase`: passed,
streamed and framed, kept as JSON, ended), then each chunk gets exactly one answer.

`ex.body` is swapped as the response goes, so the hot path is one call to the current
phase's `feed`, and a chunk of whole, untouched frames costs no allocation
(`CONTINUE_BODY` is shared)."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from extproc import envoy_wire as wire
from extproc.envoy_wire import CLEAR_BODY, CONTINUE_BODY, BodyMode, Request, Response
from extproc.errors import StreamError, shown
from extproc.exchange import settle
from extproc.exchange.unreadable import (
    Sniffed,
    choose_inflation,
    inflate_limit,
    refuse_unreadable,
)
from extproc.headers import INTERNAL_HEADER_PREFIX
from extproc.policy import Refusal, StreamBlocked, StreamFilter, is_quiet_filter
from extproc.providers import decoder_label, response_decoder
from extproc.providers._json import response_identity
from extproc.providers.base import ResponseDecoder, StreamEvent

if TYPE_CHECKING:
    from extproc.exchange.core import BodyPhase, Exchange

log = logging.getLogger("extproc.exchange")


def response_headers(ex: Exchange, request: Request, now: float) -> Response:
    """The provider's (or Envoy's own) status and headers; the stages add theirs."""
    headers = wire.header_map(request)
    try:
        ex.status = int(headers.get(":status", "0"))
    except ValueError:
        ex.status = 0
    ctx = ex.ctx
    if ctx is None:  # e.g. Envoy's own 413 before any request phase reached us
        return wire.continue_response_headers(None, body=BodyMode.SKIP)
    ctx.status = ex.status
    ctx.upstream_response = headers
    ex.answered = True
    try:
        for stage in ex.policy.stages:
            stage.on_response_headers(ctx)
    except Refusal as refusal:  # nothing reached the client yet (failover: all failed)
        return ex.refuse(refusal)
    if ctx.info is not None:
        ex.model = ctx.info.model  # failover: the model of the target that answered
    if ctx.answered_by is not None:  # failover: a target in another API answered
        from extproc.failover.answer import adopt

        adopt(ex, ctx)
    answer = ex.flow.response_headers(ex, headers, now)
    # The gateway's own headers (cost, budget, guard) come from the gateway alone: a
    # provider's copies are removed, whatever the flow.
    remove = [*ctx.response_remove]
    remove += [
        name
        for name in headers
        if name.startswith(INTERNAL_HEADER_PREFIX)
        and name not in ctx.response_headers
        and name not in remove
    ]
    if remove and answer.HasField("response_headers"):
        answer.response_headers.response.header_mutation.remove_headers.extend(remove)
    return answer


def inspect_response(ex: Exchange, headers: dict[str, str], now: float) -> Response:
    """An inspected API answered: choose the body phase (decoder, filters, inflation)."""
    ctx = ex.ctx
    assert ctx is not None
    set_headers = ctx.response_headers
    remove: list[str] = []
    if ex.status == 0:
        return wire.continue_response_headers(set_headers, body=BodyMode.SKIP)
    if ex.status >= 400:
        upstream_failed(ex)
        return wire.continue_response_headers(set_headers, body=BodyMode.SKIP)
    unreadable = choose_inflation(ex, headers)
    if unreadable is not None:
        return refuse_unreadable(ex, f"content encoding ({unreadable})", now)
    if ex.inflate is not None:
        remove.extend(("content-encoding", "content-length"))
    content_type = ctx.content_type = headers.get("content-type", "")
    decoder = ex.decoder = response_decoder(
        ctx.format,
        content_type,
        stream=ctx.info.stream if ctx.info else False,
        hide_usage=ex.hide_usage,
        max_frame_bytes=ex.policy.config.streaming.max_frame_bytes,
    )
    if decoder is not None or "json" in content_type:
        ex.metrics.child(ex.metrics.decoders, decoder_label(ctx.format, decoder)).inc()
    inflated = ex.inflate is not None
    mode = BodyMode.AS_CONFIGURED
    body: BodyPhase = INFLATED_PASS if inflated else PASS_BODY
    if decoder is not None:
        body = _stream_body(ex, decoder, inflated)
        if "content-length" in headers and (ex.hide_usage or body.filters):
            remove.append("content-length")
    elif "json" in content_type:
        ex.json = bytearray()
        body = JsonBody(inflated)
        if ctx.buffer_response:
            # A stage must see the whole answer before the client gets any of it.
            mode = BodyMode.BUFFERED
        if ctx.info is not None and ctx.info.stream:  # the SDK reads a stream anyway
            body = Sniffed(
                body,
                lambda decoder: _stream_body(ex, decoder, inflated),
                Inflating if inflated else _same,
            )
            remove.append("content-length")  # a stream's frames may be rewritten
    elif ex.status < 300:
        # Every inspected API answers JSON or its stream type: a success in anything
        # else (text/plain SSE, none) is read by the client's SDK but by no guard or meter.
        return refuse_unreadable(ex, f"content type ({content_type or 'none'})", now)
    after = Inflating(body) if inflated else body
    first = FirstChunk(body, after)
    ex.body = Inflating(first) if inflated else first
    answer = wire.continue_response_headers(set_headers, remove, body=mode)
    if decoder is None:
        return answer
    # A stream may be cut short before its last chunk: the access log knows who and
    # what from here on (the tokens follow: `settle.REPORT_FIRST`). Envoy merges each
    # answer's fields into what it holds, so what the request body's answer sent
    # needs no second Struct unless a field changed since (failover: the target).
    values = {"route": ex.route_name, "model": shown(ex.model), **ex.identity()}
    if values == ex.reported:
        return answer
    return wire.with_metadata(answer, values)


def _stream_body(ex: Exchange, decoder: ResponseDecoder, inflated: bool) -> StreamBody:
    ctx = ex.ctx
    assert ctx is not None
    ctx.decoder = decoder  # filters read and rewrite its events
    filters = [f for stage in ex.policy.stages if (f := stage.stream_filter(ctx)) is not None]
    return StreamBody(decoder, filters, inflated)


def _same(body: BodyPhase) -> BodyPhase:
    return body


# -- body phases ------------------------------------------------------------------------


def upstream_failed(ex: Exchange) -> None:
    """The provider answered 4xx/5xx: counted and logged once, whatever reads the body."""
    ex.error_kind = "upstream_error"
    ex.metrics.errors.labels("upstream_error").inc()
    provider = ex.ctx.provider.name if ex.ctx is not None else "-"
    log.warning(
        "provider answered %d route=%s model=%s provider=%s",
        ex.status,
        ex.route_name,
        shown(ex.model),
        provider,
    )


class PassBody:
    """The null object: chunks go on as they came (identity: untouched, or inflated)."""

    paced = True

    def __init__(self, inflated: bool) -> None:
        self.inflated = inflated

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        response = wire.replace_body(chunk) if self.inflated else CONTINUE_BODY
        return ex.finish(response, now) if end else response


PASS_BODY = PassBody(inflated=False)
INFLATED_PASS = PassBody(inflated=True)


class FirstChunk:
    """Reads the answer's own id and model from its first chunk (once: the trace's
    `gen_ai.response.id` / `.model`), then hands the body to the phase it wraps, so
    later chunks pay nothing."""

    __slots__ = ("after", "inner", "paced")

    def __init__(self, inner: BodyPhase, after: BodyPhase) -> None:
        self.inner = inner  # reads this chunk (inflated already, when it had to be)
        self.after = after  # reads the next ones
        self.paced = inner.paced

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        ex.response_id, ex.response_model = response_identity(chunk)
        ex.body = self.after
        return self.inner.feed(ex, chunk, end, now)


class Inflating:
    """The provider ignored accept-encoding: inflate, then let the inner phase read."""

    __slots__ = ("inner", "paced")

    def __init__(self, inner: BodyPhase) -> None:
        self.inner = inner
        self.paced = inner.paced

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        inflate = ex.inflate
        assert inflate is not None
        most = inflate_limit(ex, chunk)
        try:
            inflated = inflate.decompress(chunk, most)
            if not inflate.unconsumed_tail and end:
                inflated += inflate.flush()
        except zlib.error as exc:
            return ex.end_stream(
                f"could not decode the provider's gzip stream: {exc}", "decode_error", now, end
            )
        if inflate.unconsumed_tail or len(inflated) > most:
            return ex.end_stream(
                f"the provider's gzip stream inflates past {most} bytes in one chunk",
                "decode_error",
                now,
                end,
            )
        return self.inner.feed(ex, inflated, end, now)


class Ended:
    """The gateway ended the stream: clear what still comes, or close the provider's
    stream (`streaming.on_block: close`)."""

    paced = True

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        if end:
            return ex.finish(CLEAR_BODY, now)
        if ex.policy.config.streaming.on_block == "close":
            return close_upstream(ex, now)
        return CLEAR_BODY


ENDED = Ended()

SHUTDOWN_MESSAGE = (
    "The gateway is shutting down and ended this stream before it finished; retry the request."
)


class ShutdownEnding:
    """The worker's grace period ends (`Exchange.end_for_shutdown`): this chunk becomes
    the error event, the next one closes the provider's stream."""

    paced = True

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        response = ex.end_stream(SHUTDOWN_MESSAGE, "gateway_shutdown", now, end, "shutdown_ended")
        if not end:
            ex.body = CLOSING
        return response


class Closing:
    """After the gateway's own error event: close the provider's stream."""

    paced = True

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        if end:
            return ex.finish(CLEAR_BODY, now)
        return close_upstream(ex, now)


CLOSING = Closing()


KIND_TOO_LARGE = "guard_budget_exceeded"  # the guard's reading budget, as for requests
JSON_TAIL_BYTES = 64 << 10  # what follows an answer's texts (usage, ids) fits in this


class JsonBody:
    """A whole JSON answer: kept (bounded) to meter, or buffered for a stage to see."""

    paced = False

    def __init__(self, inflated: bool) -> None:
        self.inflated = inflated

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        limit = ex.policy.config.streaming.max_json_response_bytes
        kept = ex.json
        if kept is not None and len(kept) + len(chunk) <= limit:
            kept += chunk
        elif kept is not None or ex.json_tail is not None:
            # Too big to keep: its last bytes still hold the usage (`settle`).
            tail = ex.json_tail = ex.json_tail if ex.json_tail is not None else kept
            assert tail is not None
            tail += chunk
            del tail[:-JSON_TAIL_BYTES]
            kept = ex.json = None
        ctx = ex.ctx
        if end and ctx is not None and ctx.must_read_response and kept is None:
            settle.settle(ex, now, complete=True)
            message = (
                f"The answer is larger than the gateway reads whole ({limit} bytes, "
                "streaming.max_json_response_bytes), so the response guard cannot read it."
            )
            return ex.refuse(Refusal(502, message, KIND_TOO_LARGE, kind=KIND_TOO_LARGE))
        if end and ctx is not None and ctx.buffer_response and kept is not None:
            body = bytes(kept)
            try:
                for stage in ex.policy.stages:
                    body = stage.on_completion(ctx, body) or body
            except Refusal as refusal:
                settle.settle(ex, now, complete=True)
                return ex.refuse(refusal)
            changed = body != kept
            if changed:
                ex.json = bytearray(body)
            settle.settle(ex, now, complete=True)  # metered now: stages may name the cost
            if ctx.completion_headers:
                replaced = body if changed or self.inflated else None
                return ex.finish(wire.body_with_headers(replaced, ctx.completion_headers), now)
            if changed:
                return ex.finish(wire.replace_body(body), now)
        response = wire.replace_body(chunk) if self.inflated else CONTINUE_BODY
        return ex.finish(response, now) if end else response


class StreamBody:
    """An event stream: framed and decoded, filtered when a stage asked, forwarded as
    whole frames (an unfinished one waits for its end).

    With one filter, a chunk of whole frames whose text it passes by its pre-check
    (`QuietFilter`: the guards) takes the no-filter path: metered by byte counts,
    never parsed, answered "no mutation". (With more, one could take a text that the
    next refuses: every chunk is parsed.)"""

    __slots__ = ("decoder", "filters", "held", "inflated", "plain_text", "take")
    paced = True

    def __init__(
        self,
        decoder: ResponseDecoder,
        filters: list[StreamFilter],
        inflated: bool,
        *,
        precheck: bool = True,
    ):
        self.decoder = decoder
        self.filters = filters
        self.inflated = inflated
        self.held = False
        # The pre-check, bound once: the one filter's `take` of a chunk's plain text;
        # None: no filter, more than one, one that cannot, or the pre-check is off.
        one = len(filters) == 1 and precheck and is_quiet_filter(filters[0])
        self.take: Callable[[str], bool] | None = filters[0].take if one else None
        self.plain_text = decoder.plain_text

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        decoder = self.decoder
        inflated = self.inflated
        take = self.take
        # The pre-check: the filter takes the chunk's plain text (as `process` would
        # have; not None only for a chunk `feed_whole` takes, as it needs), or nothing
        # changed and the chunk is parsed.
        if not inflated and (
            not self.filters
            or (take is not None and (text := self.plain_text(chunk)) is not None and take(text))
        ):
            whole = decoder.feed_whole(chunk)
            if whole is not None:  # whole frames, nothing to read: no events needed
                if not ex.first_frame_at and decoder.content_events:
                    ex.first_frame_at = now
                if end:
                    _check_end(ex, decoder)
                response = CONTINUE_BODY if whole is chunk else wire.replace_body(whole)
                if end or (decoder.done and not ex.closed):  # `_just_done`, inline
                    return ex.finish(response, now)
                if decoder.content_events >= ex.report_at and not ex.closed:
                    return settle.progress(ex, response)
                return response
        try:
            events = decoder.feed(chunk)
            if end:
                events += decoder.finish()
                _check_end(ex, decoder)
        except StreamError as exc:  # FrameTooLarge included
            return ex.end_stream(str(exc), exc.kind, now, end)
        # Time to first token: the first content (text, tool-call, reasoning) delta,
        # not a role chunk or Anthropic's message_start.
        if not ex.first_frame_at and decoder.content_events:
            ex.first_frame_at = now
        held = decoder.buffered > 0
        changed = inflated or held or self.held
        self.held = held
        if self.filters:
            passed = events
            try:
                for stream_filter in self.filters:
                    passed = stream_filter.process(passed, end)
            except StreamBlocked as blocked:
                first = _first_unsent(self.filters, events)
                return ex.end_stream(
                    blocked.message, blocked.code, now, end, blocked.kind, before=first
                )
            if passed is not events:
                changed = True
                events = passed
        out = []
        for event in events:
            if event.out is not event.raw:
                changed = True
            out.append(event.out)
        response = wire.replace_body(b"".join(out)) if changed else CONTINUE_BODY
        if end or _just_done(ex, decoder):
            return ex.finish(response, now)
        if decoder.content_events >= ex.report_at and not ex.closed:
            return settle.progress(ex, response)
        return response


def _first_unsent(filters: list[StreamFilter], events: list[StreamEvent]) -> StreamEvent | None:
    """The first event the client has not had (the error event takes its place): one a
    filter still holds from an earlier chunk (a later filter holds older ones: each
    only sees what the one before released), else this chunk's first."""
    current = {id(event) for event in events}
    for stream_filter in reversed(filters):
        held = stream_filter.oldest_held
        if held is not None and id(held) not in current:
            return held
    return events[0] if events else None


def _check_end(ex: Exchange, decoder: ResponseDecoder) -> None:
    """The provider ended its stream without the format's end marker: the client has
    a truncated answer (passed on as it came), counted as `upstream_truncated`."""
    if decoder.has_end_marker and not decoder.done and not ex.error_kind:
        ex.error_kind = "upstream_truncated"
        ex.metrics.errors.labels("upstream_truncated").inc()
        log.warning(
            "provider ended its stream without its end marker route=%s model=%s",
            ex.route_name,
            shown(ex.model),
        )


def _just_done(ex: Exchange, decoder: ResponseDecoder) -> bool:
    """The end marker (and usage before it) passed with this chunk: settle and send the
    metadata now. The `openai` SDK closes its connection right after `data: [DONE]`,
    so Envoy's end of stream often never reaches us; later chunks (the empty last one)
    still get their answers, and the figures go again with the last (unchanged)."""
    return decoder.done and not ex.closed


def close_upstream(ex: Exchange, now: float) -> Response:
    """`streaming.on_block: close`: the error event went out with an earlier chunk,
    and this one shows the provider is still generating (and billing). Once the
    response has started, Envoy answers an ImmediateResponse by resetting the stream:
    the provider's connection is closed, and the client, which already has the whole
    error event (and `[DONE]`), sees its HTTP stream end without a clean end (HTTP/1:
    the connection closes before the last chunk; HTTP/2: RST_STREAM). Waiting for
    this chunk rather than sending it with the error event gives the error event a
    chunk's time to leave Envoy before the reset."""
    kind = ex.error_kind or "stream_ended"
    ex.metrics.upstream_closed.labels(kind).inc()
    log.info(
        "closing provider stream route=%s model=%s after %s (streaming.on_block: close)",
        ex.route_name,
        shown(ex.model or "unknown"),
        kind,
    )
    ex.upstream_closed = True
    reset = wire.reset(ex.status or 200, "ai_gateway_upstream_closed")
    return ex.finish(reset, now)
