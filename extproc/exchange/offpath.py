"""Metering off the latency path (`streaming.meter_off_path: auto`).

A stream that is only metered needs no answer per chunk, yet the first (synchronous)
ext_proc filter makes Envoy wait for one. So a second filter in observability mode
(`bootstrap.listener._observer_filter`) sends the same chunks without waiting, and the
exchange is split over two `Process` streams of this worker:

1. request body (synchronous stream): the request may go off path (a stream whose usage
   is not hidden from the client): the exchange is registered under a random token,
   set as the request header `EXCHANGE_HEADER`, which the observing filter then sends
   with its request headers. Not `x-request-id`: a client may choose that one
   (`preserve_external_request_id`), and two requests sharing it must not share a meter.
2. the observing stream opens, finds the exchange by its token and attaches.
3. response headers (synchronous): the exchange qualifies (an event stream with no
   stream filter, nothing to inflate, a success status) and an observer is attached:
   the answer turns the synchronous filter's body mode off. Otherwise the observer is
   told to leave (its stream ends, and Envoy sends it nothing more), and the
   synchronous stream does it all.
4. the observer feeds each chunk to the exchange's own body phase (the same decoder,
   settlement, limits, metrics and log line as the synchronous path) and discards the
   answers: Envoy reads none in observability mode. So the final figures never reach
   Envoy's dynamic metadata (access log, ratelimit `hits_addend`): the sidecar's own
   `exchange` log line (with `request_id`) and metrics carry them.

Everything here runs on the worker's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from extproc import envoy_wire as wire
from extproc.bootstrap.common import observer_enabled
from extproc.envoy_wire import Response
from extproc.exchange import response as response_phase
from extproc.exchange import settle
from extproc.headers import EXCHANGE_HEADER
from extproc.logcontext import set_exchange

if TYPE_CHECKING:
    import grpc

    from extproc.exchange.core import Exchange

log = logging.getLogger("extproc.offpath")

# How long a qualifying exchange's response headers wait for its observer to attach
# (once per exchange; only a loop far behind its messages waits this long, and then
# the exchange stays synchronous).
ATTACH_WAIT_S = 0.05


class Entry:
    """One exchange that may be metered off path, from its request body to its end."""

    __slots__ = ("attach", "attached", "decided", "exchange", "token")

    def __init__(self, exchange: Exchange, token: str) -> None:
        self.exchange = exchange
        self.token = token
        self.attached = False  # an observing stream found it
        self.attach = asyncio.Event()  # set when it does
        loop = asyncio.get_running_loop()
        self.decided: asyncio.Future[bool] = loop.create_future()  # off path or not

    def decide(self, off_path: bool) -> None:
        if not self.decided.done():
            self.decided.set_result(off_path)
        if not off_path:
            REGISTRY.pop(self.token, None)

    def done(self) -> None:
        REGISTRY.pop(self.token, None)


# Token -> entry, for this worker process (both streams of an exchange must reach the
# same process: `bootstrap.common.observer_enabled`).
REGISTRY: dict[str, Entry] = {}


def claim(ex: Exchange, upstream_headers: dict[str, str]) -> None:
    """Request body answered: register a stream that could be metered off path."""
    ctx = ex.ctx
    if ctx is None or ctx.info is None or not ctx.info.stream or ex.hide_usage:
        return
    if not observer_enabled(ex.policy.config):
        return
    token = secrets.token_urlsafe(18)
    entry = ex.off_path = Entry(ex, token)
    REGISTRY[token] = entry
    upstream_headers[EXCHANGE_HEADER] = token


def decide(ex: Exchange, answer: Response) -> Response | Awaitable[Response]:
    """Response headers: off path when the body phase is a plain metered stream and an
    observer is attached; the synchronous filter then skips the body.

    The observer's first message left Envoy before the request went upstream, so it is
    at most a few loop turns behind: a qualifying exchange waits for it (bounded)."""
    entry = ex.off_path
    assert entry is not None
    qualifies = (
        not ex.closed
        and 0 < ex.status < 400
        and not ex.hide_usage
        and ex.inflate is None
        and _plain_stream(ex)
    )
    if qualifies and not entry.attached:
        return _decide_later(ex, entry, answer)
    return _decided(ex, entry, answer, qualifies and entry.attached)


async def _decide_later(ex: Exchange, entry: Entry, answer: Response) -> Response:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(entry.attach.wait(), ATTACH_WAIT_S)
    return _decided(ex, entry, answer, entry.attached and not ex.closed)


def _decided(ex: Exchange, entry: Entry, answer: Response, off_path: bool) -> Response:
    entry.decide(off_path)
    if not off_path:
        ex.off_path = None
        return answer
    return wire.skip_response_body(answer)


def _plain_stream(ex: Exchange) -> bool:
    """An event stream read by the decoder alone (no stage's stream filter)."""
    body = ex.body
    inner = getattr(body, "inner", None)
    return (
        isinstance(body, response_phase.FirstChunk)
        and isinstance(inner, response_phase.StreamBody)
        and not inner.filters
    )


def handed_over(ex: Exchange) -> bool:
    """The synchronous stream ended: True when the observer settles the exchange."""
    entry = ex.off_path
    if entry is None:
        return False
    if not entry.decided.done():  # ended before its response headers: stays ours
        entry.decide(False)
        ex.off_path = None
        return False
    return True


async def observe(
    first: object,
    context: grpc.aio.ServicerContext,
    clock: Callable[[], float],
    run_after: Callable[[Exchange], None],
) -> None:
    """One observing stream: nothing is ever answered (Envoy reads no answer in
    observability mode); ending the stream early makes Envoy stop sending to it."""
    from grpc import aio

    headers = wire.header_map(first) if first.WhichOneof("request") == "request_headers" else {}
    entry = REGISTRY.get(headers.get(EXCHANGE_HEADER, ""))
    if entry is None or entry.attached:
        return
    entry.attached = True
    entry.attach.set()
    ex = entry.exchange
    set_exchange(ex.request_id, ex.trace_id)  # the log lines of this task name them too
    try:
        if not await entry.decided:
            return
        while not ex.closed:
            request = await context.read()
            if request is aio.EOF:
                break
            if request.WhichOneof("request") != "response_body":
                continue
            body = request.response_body
            ex.body.feed(ex, body.body, body.end_of_stream, clock())
            if ex.after:
                run_after(ex)
    finally:
        if entry.decided.done() and entry.decided.result() and not ex.closed:
            settle.settle(ex, clock(), complete=False)
        if ex.after:
            run_after(ex)
        entry.done()
