"""Wire formats. Everything above this package (auth, guards, limits, metrics) talks to
the neutral interface in `base`, never to a provider's shapes."""

from __future__ import annotations

from extproc.providers.base import RequestError, RequestInfo, ResponseDecoder, StreamEvent
from extproc.providers.openai_chat import OpenAIChat

__all__ = [
    "OpenAIChat",
    "RequestError",
    "RequestInfo",
    "ResponseDecoder",
    "StreamEvent",
    "format_for",
]

_FORMATS = {"openai": OpenAIChat}


def format_for(name: str) -> type[OpenAIChat]:
    return _FORMATS[name]
