"""Metering off the latency path (`streaming.meter_off_path: auto`).

A stream that is only metered needs no answer per chunk, yet the first (synchronous)
ext_proc filter makes Envoy wait for one. So a second filter in observability mode
(`bootstrap.observer`) sends the same chunks without waiting, and the exchange is split
over two `Process` streams of this worker:

1. request body (synchronous stream): the request may go off path (a stream whose usage
   is not hidden from the client): the exchange is registered under a random token,
   set as the request header `EXCHANGE_HEADER`, which the observing filter then sends
   with its request headers. Not `x-request-id`: a client may choose that one
   (`preserve_external_request_id`), and two requests sharing it must not share a meter.
   The token starts with this worker's index: with several workers, only that worker's
   observing filter runs, and it reaches only this worker.
2. the observing stream opens, finds the exchange by its token and attaches.
3. response headers (synchronous): the exchange qualifies (an event stream with no
   stream filter, nothing to inflate, a success status): the answer turns the
   synchronous filter's body mode off. Otherwise the observer is told to leave (its
   stream ends, and Envoy sends it nothing more), and the synchronous stream does it
   all. The decision never waits for the observer: its stream opened before the
   request went upstream, on the same HTTP/2 connection, so it is on its way.
4. the observer feeds each chunk to the exchange's own body phase (the same decoder,
   settlement, limits, metrics and log line as the synchronous path) and discards the
   answers: Envoy reads none in observability mode. So the final figures never reach
   Envoy's dynamic metadata (access log, ratelimit `hits_addend`): the sidecar's own
   `exchange` log line (with `request_id`) and metrics carry them.

Everything here runs on the worker's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from extproc import envoy_wire as wire
from extproc.bootstrap.common import observer_enabled
from extproc.envoy_wire import Response
from extproc.exchange import response as response_phase
from extproc.exchange import settle
from extproc.h2stream import EOF
from extproc.headers import EXCHANGE_HEADER
from extproc.logcontext import set_exchange

if TYPE_CHECKING:
    from extproc.exchange.core import Exchange
    from extproc.h2stream import Stream

log = logging.getLogger("extproc.offpath")

# After the synchronous stream ended, how long an off-path exchange waits for an
# observer that has not attached: longer than the observer's `deferred_close_timeout`
# (5 s), after which Envoy has closed that stream anyway. Then it settles as cut short.
ORPHAN_S = 6.0
# Content events per interim report: never (no answer of the observer reaches Envoy).
NEVER = 1 << 62


class Entry:
    """One exchange that may be metered off path, from its request body to its end."""

    __slots__ = ("attached", "decided", "exchange", "release", "token")

    def __init__(self, exchange: Exchange, token: str) -> None:
        self.exchange = exchange
        self.token = token
        self.attached = False  # an observing stream found it
        # The synchronous stream's admission slot, once that stream has ended: given
        # back when the exchange is done (`keep_slot`).
        self.release: Callable[[], None] | None = None
        loop = asyncio.get_running_loop()
        self.decided: asyncio.Future[bool] = loop.create_future()  # off path or not

    def decide(self, off_path: bool) -> None:
        if not self.decided.done():
            self.decided.set_result(off_path)
        if not off_path:
            REGISTRY.pop(self.token, None)

    def done(self) -> None:
        REGISTRY.pop(self.token, None)
        release, self.release = self.release, None
        if release is not None:
            release()


# Token -> entry, for this worker process (both streams of an exchange reach it).
REGISTRY: dict[str, Entry] = {}
# Every token starts with this worker's index and a dot: the bootstrap gives each worker
# its own observing filter, run only for tokens of that worker (`bootstrap.observer`).
_prefix = "0."


def set_worker(index: int) -> None:
    """This process is worker `index` of the supervisor's (0 when alone)."""
    global _prefix
    _prefix = f"{index}."


def claim(ex: Exchange, upstream_headers: dict[str, str]) -> None:
    """Request body answered: register a stream that could be metered off path."""
    ctx = ex.ctx
    if ctx is None or ctx.info is None or not ctx.info.stream or ex.hide_usage:
        return
    if getattr(ctx, "translator", None) is not None:  # the client's frames are rewritten
        return
    if not observer_enabled(ex.policy.config):
        return
    token = _prefix + secrets.token_urlsafe(18)  # 144 random bits, no dot
    entry = ex.off_path = Entry(ex, token)
    REGISTRY[token] = entry
    upstream_headers[EXCHANGE_HEADER] = token


def decide(ex: Exchange, answer: Response) -> Response:
    """Response headers: off path when the body phase is a plain metered stream; the
    synchronous filter then skips the body. The observer's first message left Envoy
    before the request went upstream, so it comes even when it has not attached yet
    (the server starts a new stream's handler a loop turn later): `handed_over` waits
    for it, bounded, should the synchronous stream end first."""
    entry = ex.off_path
    assert entry is not None
    off_path = (
        not ex.closed
        and 0 < ex.status < 400
        and not ex.hide_usage
        and ex.inflate is None
        and _plain_stream(ex)
    )
    entry.decide(off_path)
    if not off_path:
        ex.off_path = None
        return answer
    ex.report_at = NEVER  # interim figures for Envoy: it reads no answer of the observer
    return wire.skip_response_body(answer)


def observed(ex: Exchange) -> bool:
    """The body goes off path (decided at the response headers): every body answer is
    the observer's, which Envoy never reads, so none needs figures (metadata)."""
    entry = ex.off_path
    return entry is not None and entry.decided.done() and entry.decided.result()


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
    if not entry.attached:
        asyncio.get_running_loop().call_later(ORPHAN_S, _orphaned, entry)
    return True


def keep_slot(ex: Exchange, release: Callable[[], None]) -> bool:
    """The synchronous stream is over. Off path it ends at its response headers: Envoy
    sends it nothing more (body mode NONE, no trailers), and an open gRPC stream costs
    the worker ~30 KiB for the whole answer. The exchange, still metered by its
    observer, keeps its admission slot (`release`) until it is done; False when it is
    done already (or never was off path): the caller releases it now."""
    entry = ex.off_path
    if entry is None or ex.closed or REGISTRY.get(entry.token) is not entry:
        return False
    entry.release = release
    return True


_AFTER: set[asyncio.Future] = set()  # settlement I/O of orphans, kept until done


def _orphaned(entry: Entry) -> None:
    """No observer ever came (its stream failed to open, or the loop fell more than
    Envoy's deferred close behind): the body went unread, settle as cut short."""
    ex = entry.exchange
    entry.done()
    if entry.attached or ex.closed:
        return
    ex.metrics.errors.labels("off_path_unobserved").inc()
    log.warning("no observer came for an off-path stream route=%s", ex.route_name)
    settle.settle(ex, asyncio.get_running_loop().time(), complete=False)
    for work in ex.after:
        task = asyncio.ensure_future(work)
        _AFTER.add(task)
        task.add_done_callback(_AFTER.discard)
    ex.after.clear()


async def observe(
    first: object,
    context: Stream,
    clock: Callable[[], float],
    run_after: Callable[[Exchange], None],
) -> None:
    """One observing stream: nothing is ever answered (Envoy reads no answer in
    observability mode); ending the stream early makes Envoy stop sending to it."""
    headers = wire.header_map(first) if first.WhichOneof("request") == "request_headers" else {}
    entry = REGISTRY.get(headers.get(EXCHANGE_HEADER, ""))
    if entry is None or entry.attached or entry.exchange.closed:
        return
    entry.attached = True
    ex = entry.exchange
    set_exchange(ex.request_id, ex.trace_id)  # the log lines of this task name them too
    try:
        if not await entry.decided:
            return
        while not ex.closed:
            request = await context.read()
            if request is EOF:
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
