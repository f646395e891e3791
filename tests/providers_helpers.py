"""Shared helpers for the per-format decoder tests: replay a recorded-shape stream in
any chunking, collect texts per channel, mask a planted card number via `rewrite`."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from extproc.providers.base import ResponseDecoder, StreamEvent

CARD = "4111 1111 1111 1111"
CARD_RE = re.compile(r"\b(?:\d{4}[ -]?){3}\d{4}\b")
MASK = "[card]"

# Many examples, but each is a few hundred bytes: the whole suite stays fast.
REPLAY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cut(body: bytes, points: list[int]) -> list[bytes]:
    marks = [0, *sorted({p for p in points if 0 < p < len(body)}), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(marks)]


def cuts(body: bytes) -> st.SearchStrategy[list[int]]:
    """Random chunk boundaries, from none to one per byte."""
    return st.one_of(
        st.lists(st.integers(1, max(1, len(body) - 1)), max_size=40),
        st.just(list(range(1, len(body)))),
    )


def replay(decoder: ResponseDecoder, chunks: list[bytes]) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.finish()
    return events


def raw_of(events: list[StreamEvent]) -> bytes:
    return b"".join(e.raw for e in events)


def out_of(events: list[StreamEvent]) -> bytes:
    return b"".join(e.out for e in events)


def running_texts(decoder: ResponseDecoder, events: list[StreamEvent]) -> dict[tuple, str]:
    """(kind, channel) -> the text the deltas add up to (repeats of whole texts left out)."""
    out: dict[tuple, str] = {}
    for event in events:
        for delta in decoder.texts(event):
            if not delta.final:
                key = (delta.kind, delta.channel)
                out[key] = out.get(key, "") + delta.text
    return out


def final_texts(decoder: ResponseDecoder, events: list[StreamEvent]) -> list[tuple]:
    return [(d.kind, d.channel, d.text) for e in events for d in decoder.texts(e) if d.final]


def rewrite_all(
    decoder: ResponseDecoder, events: list[StreamEvent], change: Callable[[str], str]
) -> bytes:
    """What a masking guard would forward: each event's texts through `change`,
    re-encoded only where something changed."""
    out = []
    for event in events:
        texts = [d.text for d in decoder.texts(event)]
        new = [change(t) for t in texts]
        out.append(decoder.rewrite(event, new) if new != texts else event.out)
    return b"".join(out)


def identity_rewrite(decoder: ResponseDecoder, events: list[StreamEvent]) -> list[bytes]:
    """Every event with texts re-encoded with its own texts (a no-op mask)."""
    return [
        decoder.rewrite(e, [d.text for d in decoder.texts(e)]) for e in events if decoder.texts(e)
    ]


def mask_cards(text: str) -> str:
    return CARD_RE.sub(MASK, text)


def usage_tuple(usage: Any) -> tuple[int, int, int, int, int, bool]:
    return (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.cached_tokens,
        usage.reasoning_tokens,
        usage.reported,
    )
