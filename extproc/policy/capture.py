"""`telemetry.capture_content`: the answer's text as the client got it, for the span.

Runs after the guards (last stage), so what it keeps is what they let through, masked.
It reads the bytes each event goes out as (`event.out`) with a decoder of its own: an
event a guard rewrote is read as rewritten, never as the provider sent it. A translated
stream's events are the upstream's (the client gets the translator's frames): it reads
their texts as the translator writes them, the guards' masks included
(`ctx.decoder.client_texts`, set by exchange/translated.py). Only built when capture
is on, so an exchange without it pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from extproc.config import Config
from extproc.policy import RequestContext, Shared, Stage, StreamFilter
from extproc.providers import response_decoder
from extproc.providers.base import ResponseDecoder, StreamEvent

CAPTURED = "telemetry.output"  # ctx.scratch key: the answer's text as the client got it
MAX_CONTENT_CHARS = 16_384  # kept per exchange, and per attribute of the span


class CaptureStream:
    """Keeps (bounded) the text of the events as they leave; changes nothing."""

    __slots__ = ("decoder", "kept", "size")

    def __init__(self, decoder: ResponseDecoder, kept: list[str]) -> None:
        self.decoder = decoder
        self.kept = kept
        self.size = 0

    oldest_held = None  # holds nothing back

    def process(self, events: list[StreamEvent], end: bool) -> list[StreamEvent]:
        if self.size > MAX_CONTENT_CHARS:
            return events
        decoder = self.decoder
        for event in events:
            if not event.out:
                continue
            for seen in decoder.feed(event.out):
                if not seen.is_content or (seen.name or "").endswith(".done"):
                    continue  # Responses' `*.done` repeats the whole text
                for delta in decoder.texts(seen):
                    self.kept.append(delta.text)
                    self.size += len(delta.text)
        return events


class CaptureTranslated:
    """`CaptureStream` for a translated stream: the upstream's events, read with the
    texts the client gets for them (`client_texts`: a guard's masks, else the
    upstream's own)."""

    __slots__ = ("client_texts", "kept", "size")

    def __init__(self, client_texts: Callable[[StreamEvent], list[str]], kept: list[str]):
        self.client_texts = client_texts
        self.kept = kept
        self.size = 0

    oldest_held = None  # holds nothing back

    def process(self, events: list[StreamEvent], end: bool) -> list[StreamEvent]:
        if self.size > MAX_CONTENT_CHARS:
            return events
        for event in events:
            if not event.is_content or (event.name or "").endswith(".done"):
                continue
            for text in self.client_texts(event):
                self.kept.append(text)
                self.size += len(text)
        return events


class CaptureStage(Stage):
    name = "capture"

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes

    def stream_filter(self, ctx: RequestContext) -> StreamFilter | None:
        client_texts = getattr(ctx.decoder, "client_texts", None)
        if client_texts is not None:  # a translated stream
            shown: list[str] = []
            ctx.scratch[CAPTURED] = shown
            return CaptureTranslated(client_texts, shown)
        decoder = response_decoder(
            ctx.format,
            ctx.content_type,
            stream=ctx.info.stream if ctx.info else False,
            hide_usage=False,
            max_frame_bytes=self.max_frame_bytes,
        )
        if decoder is None:
            return None
        kept: list[str] = []
        ctx.scratch[CAPTURED] = kept
        return CaptureStream(decoder, kept)


def build(config: Config, shared: Shared, env: Mapping[str, str]) -> Stage | None:
    telemetry = config.telemetry
    if telemetry.endpoint is None or not telemetry.capture_content:
        return None
    return CaptureStage(config.streaming.max_frame_bytes)
