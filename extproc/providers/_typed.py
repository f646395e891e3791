"""Typed SSE events (Anthropic, OpenAI Responses): an event's type as its clients read
it. The SDKs dispatch on the data's `type` (the last one, as every JSON parser keeps
it), not on the `event:` line the decoders read by byte search: a frame whose two
disagree is one the client reads as another event than the gateway (a text delta
that no guard saw, a usage figure no meter read), so it ends the stream."""

from __future__ import annotations

from typing import Any

from extproc.errors import StreamError, shown
from extproc.sse import Frame

_TYPE = b'"type":"'


def leading_type(data: bytes) -> bytes | None:
    """The `type` of an event whose frame had no `event:` line (not sent by the
    providers; the OpenAI SDK reads it by its data, the Anthropic SDKs skip it): the
    first `"type":"..."`, which leads the object."""
    at = data.find(_TYPE)
    if at < 0:
        return None
    start = at + len(_TYPE)
    end = data.find(b'"', start)
    return data[start:end] if end > start else None


class AmbiguousEvent(StreamError):
    """A typed event its clients would read as another type than the gateway does (an
    `event:` line naming one type, the data another; a repeated `type` key): text could
    reach them unguarded, usage unmetered. The stream is ended, not guessed at."""


_TYPE_OPENS = (b'{"type":"', b'{"type": "')  # Anthropic writes its pings spaced


def opens_with_type(data: bytes, kind: bytes) -> bool:
    """The data opens with `{"type":"<kind>"`, as the providers write every event."""
    for head in _TYPE_OPENS:
        end = len(head) + len(kind)
        if (
            data.startswith(head)
            and data.startswith(kind, len(head))
            and data[end : end + 1] == b'"'
        ):
            return True
    return False


def check_type(obj: Any, kind: bytes | None) -> None:
    """The parsed data's `type` (the last, as every JSON parser keeps it, which is what
    the SDKs dispatch on) is `kind`, else AmbiguousEvent. Data that is not JSON, or
    has no string `type`, is no other event to anyone (the SDKs fail or skip it, the
    decoders read nothing from it): it passes as before."""
    typed = obj.get("type") if isinstance(obj, dict) else None
    if isinstance(typed, str) and (kind is None or typed.encode() != kind):
        named = shown((kind or b"none").decode("utf-8", "replace"))
        raise AmbiguousEvent(
            f"The provider sent an event its clients would read as another type than "
            f"'{named}'; the gateway ended the stream."
        )


def event_kind(frame: Frame, data: bytes) -> tuple[bytes | None, str | None]:
    """A typed SSE frame's type: as bytes for the hot path's comparisons, and as the
    str `StreamEvent.name` carries. The `event:` line names it, else the leading type."""
    kind = frame.event if frame.event is not None else leading_type(data)
    return kind, kind.decode("utf-8", "replace") if kind is not None else None
