"""The end of an exchange: usage metered (reported, else estimated), the metrics and the
log line, the stages' settlement (their I/O goes to `ex.after`), and the figures the
last answer hands Envoy as dynamic metadata (access log, ratelimit `hits_addend`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from extproc import envoy_wire as wire
from extproc.envoy_wire import Response
from extproc.errors import shown
from extproc.logcontext import line as logline
from extproc.providers._json import usage_in_tail
from extproc.usage import estimate_prompt_tokens

if TYPE_CHECKING:
    from extproc.exchange.core import Exchange

log = logging.getLogger("extproc.exchange")


def final_metadata(ex: Exchange) -> dict[str, object]:
    usage = ex.usage
    return {
        "route": ex.route_name,
        "model": ex.model,
        **ex.identity(),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "usage_estimated": usage.estimated,
        "finish_reason": ex.finish_reason or "",
        **({"upstream_closed": True} if ex.upstream_closed else {}),
        **({"reason": ex.error_kind} if ex.error_kind else {}),
        **({"refused": ex.refused} if ex.refused else {}),
    }


# A stream's interim figures go with content event 32, 64, 128, ... then every 512: an
# access-log line of a stream cut short is at most half (later 512 events) behind, for
# a handful of metadata answers per stream (each costs a Struct, about 5 us; the chunks
# between cost one comparison).
REPORT_FIRST = 32
REPORT_MAX_GAP = 512


def progress(ex: Exchange, response: Response) -> Response:
    """A stream's figures so far, handed to Envoy with this chunk's answer (see
    `REPORT_FIRST`), so the access log of a stream that the client or the provider cuts
    short still carries who, what and the tokens metered until then."""
    decoder = ex.decoder
    assert decoder is not None
    seen = decoder.content_events
    ex.report_at = seen + min(max(seen, REPORT_FIRST), REPORT_MAX_GAP)
    usage = decoder.usage
    ctx = ex.ctx
    if not usage.reported and ctx is not None and ctx.info is not None:
        if ex.prompt_estimate < 0:
            ex.prompt_estimate = ctx.info.prompt_estimate()
        prompt, completion = ex.prompt_estimate, decoder.content_events
    else:
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
    # Who and what went with the response headers (Envoy merges the fields).
    return wire.finished(
        response,
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "usage_estimated": not usage.reported,
        },
    )


def settle(ex: Exchange, now: float, complete: bool) -> None:
    """Once per exchange (`complete` false: the stream was cut short)."""
    if ex.closed:
        return
    ex.closed = True
    m = ex.metrics
    m.active.dec()
    named = ex.model or "unknown"
    metered = ex.flow.metered and ex.model and 0 < ex.status < 400
    labels = ex.policy.labels
    # As a label: known to the policy, or a name that a provider without a catalog
    # took (it answered, and not "no such model": 400/404), learned up to a bound;
    # else "other".
    took = ex.answered and ex.status not in (400, 404) and ex.ctx is not None
    model = labels.model(named, learn=took and ex.ctx.provider.name in labels.open_providers)
    if metered:
        if not complete and not ex.error_kind:
            ex.error_kind = "stream_aborted"
            m.errors.labels("stream_aborted").inc()
            log.warning(
                "stream ended early route=%s model=%s (client hung up or provider cut it)",
                ex.route_name,
                shown(named),
            )
        _meter(ex, now, model)
    if ex.ctx is not None:
        for stage in ex.policy.stages:
            pending = stage.on_complete(ex.ctx, ex.usage, complete)
            if pending is not None:
                ex.after.append(pending)
    status = str(ex.status) if ex.status else "none"
    m.child(m.requests, ex.route_name, model, status).inc()
    logline(
        log,
        logging.INFO,
        "exchange route=%s consumer=%s model=%s status=%s prompt=%d completion=%d "
        "estimated=%s duration_ms=%.1f%s",
        ex.route_name,
        shown(ex.consumer or "-"),
        shown(named),
        status,
        ex.usage.prompt_tokens,
        ex.usage.completion_tokens,
        ex.usage.estimated,
        (now - ex.started) * 1000,
        f" error={ex.error_kind}" if ex.error_kind else "",
    )
    if ex.policy.tracing is not None:
        ex.policy.tracing.record(ex, now)


def _meter(ex: Exchange, now: float, model: str) -> None:
    m = ex.metrics
    ctx = ex.ctx
    assert ctx is not None
    decoder = ex.decoder
    if decoder is not None:
        ex.usage = decoder.usage
        ex.finish_reason = decoder.finish_reason
        content_events = decoder.content_events
    else:
        content_events = 0
        if ex.json:
            body = bytes(ex.json)
            ex.usage = ctx.format.completion_usage(body) or ex.usage
            ex.finish_reason = ctx.format.completion_finish_reason(body)
        elif ex.json_tail:  # too large to keep whole: the usage from its end
            tail = bytes(ex.json_tail)
            ex.usage = usage_in_tail(tail, ctx.format.completion_usage) or ex.usage
    usage = ex.usage
    if not usage.reported:
        prompt = ctx.info.prompt_estimate() if ctx.info else estimate_prompt_tokens([])
        usage.set_estimated(prompt, content_events)
        m.child(m.usage_estimated, model).inc()
    consumer = ex.policy.labels.consumer(ex.consumer or "anonymous")
    series = m.settled(ex.route_name, model, consumer)
    series.prompt(usage.prompt_tokens)
    series.completion(usage.completion_tokens)
    if usage.cached_tokens:
        series.cached(usage.cached_tokens)
    if usage.reasoning_tokens:
        series.reasoning(usage.reasoning_tokens)
    series.duration(now - ex.started)
    if ex.first_frame_at:
        series.ttft(ex.first_frame_at - ex.started)
        if usage.completion_tokens > 1 and ex.body.paced:
            series.tpot((now - ex.first_frame_at) / (usage.completion_tokens - 1))
