"""Answers not as the gateway asked for them, read the way the client will read them.

The guards and the meter read the answer's bytes, so an answer they cannot read is an
answer that walks around them (docs/security.md, "Answers the gateway cannot read"):
- a content coding: gzip and deflate are inflated (bounded per chunk), anything else is
  a 502 before any byte;
- a success in a content type the format does not read (SSE as text/plain): a 502;
- a stream request answered under a JSON label: SDKs read the body by the request's
  stream flag, not the label, so the first chunk decides between a whole JSON answer
  and the format's stream (`Sniffed`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from extproc.envoy_wire import CONTINUE_BODY, Response
from extproc.errors import shown
from extproc.exchange import settle
from extproc.policy import Refusal

if TYPE_CHECKING:
    from extproc.exchange.core import BodyPhase, Exchange
    from extproc.providers.base import ResponseDecoder

# Content codings the gateway decodes (zlib: gzip, or zlib-wrapped deflate).
INFLATABLE = frozenset(("gzip", "x-gzip", "deflate"))
# One compressed chunk inflates to at most this many times its size, or to
# `streaming.max_frame_bytes` when that is more: SSE and JSON compress 5-20x, a bomb
# 1000x, and the inflated bytes are held, decoded and sent back in one answer.
INFLATE_RATIO = 100


def choose_inflation(ex: Exchange, headers: dict[str, str]) -> str | None:
    """Reads the answer's content coding: identity (None), one the gateway inflates
    (sets `ex.inflate`, None), or one it cannot read (returned). The gateway asked for
    identity; a provider that sends anything else must not blind the guards and meter."""
    codings = [
        c.strip() for c in headers.get("content-encoding", "").lower().split(",") if c.strip()
    ]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in INFLATABLE:
        # Decoded incrementally (linear) and sent on as identity, so the client and
        # the inspection see the same bytes.
        ex.inflate = zlib.decompressobj(47)  # 32 + 15: gzip or zlib header
        return None
    return ", ".join(codings)


def inflate_limit(ex: Exchange, chunk: bytes) -> int:
    return max(INFLATE_RATIO * len(chunk), ex.policy.config.streaming.max_frame_bytes)


def refuse_unreadable(ex: Exchange, what: str, now: float) -> Response:
    """A success the gateway cannot read (a coding it does not inflate, a content type
    its format does not read) would pass the guards and meter unread: the client gets a
    502 before any byte, and the exchange settles as answered (the prompt, estimated)."""
    ex.error_kind = "decode_error"  # `refuse` counts it
    settle.settle(ex, now, complete=True)
    message = f"The provider answered in a {shown(what)} the gateway cannot read."
    return ex.refuse(Refusal(502, message, "decode_error", kind="decode_error"))


class Sniffed:
    """A stream request answered under a JSON label. The client's SDK reads the body as
    a stream because it asked for one (the OpenAI SDKs ignore the label), so the first
    chunk with content decides: a JSON document goes to `whole`, anything else is the
    format's own stream (`streamed` builds that phase for the decoder, with its filters)."""

    __slots__ = ("streamed", "whole", "wrap")
    paced = False

    def __init__(
        self,
        whole: BodyPhase,
        streamed: Callable[[ResponseDecoder], BodyPhase],
        wrap: Callable[[BodyPhase], BodyPhase],
    ) -> None:
        self.whole = whole
        self.streamed = streamed
        self.wrap = wrap  # what reads the next chunks first (the inflation, if any)

    def feed(self, ex: Exchange, chunk: bytes, end: bool, now: float) -> Response:
        head = chunk.lstrip()[:1]
        if not head and not end:
            return CONTINUE_BODY  # whitespace so far: the next chunk decides
        if head in (b"{", b"[", b""):
            body = self.whole
        else:
            ctx = ex.ctx
            assert ctx is not None
            decoder = ex.decoder = ctx.decoder = ctx.format.stream_decoder(
                hide_usage=ex.hide_usage,
                max_frame_bytes=ex.policy.config.streaming.max_frame_bytes,
            )
            body = self.streamed(decoder)
        ex.body = self.wrap(body)
        return body.feed(ex, chunk, end, now)
