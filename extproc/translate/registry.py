"""Which client API reaches which provider through a translator.

A model alias may point at a provider of another wire format when a translator exists
for (the client's API, the provider's config `format`); any other pair stays a 404, as
before. One translator per provider is built when the policy loads (translators hold
settings only), so the request path does a dict lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar
from urllib.parse import quote

from extproc.config import ProviderConfig
from extproc.translate.azure import ChatToAzure
from extproc.translate.base import RequestTranslator
from extproc.translate.chat_to_anthropic import ChatToAnthropic
from extproc.translate.chat_to_bedrock import ChatToBedrock
from extproc.translate.chat_to_gemini import ChatToGemini
from extproc.translate.messages_to_chat import MessagesToChat

__all__ = ["PAIRS", "TARGETS", "ChatToVertex", "build"]

Make = Callable[[ProviderConfig, int], RequestTranslator | None]


class ChatToVertex(ChatToGemini):
    """Gemini's API under a Vertex project and location (same bodies and streams)."""

    target: ClassVar[str] = "vertex"


def _vertex(provider: ProviderConfig, frame: int) -> RequestTranslator | None:
    """Only a provider that names its project and location has a path to send to."""
    if not (provider.project and provider.location):
        return None
    prefix = (
        f"/v1/projects/{quote(provider.project, safe='')}"
        f"/locations/{quote(provider.location, safe='')}/publishers/google"
    )
    return ChatToVertex(prefix=prefix, max_frame_bytes=frame)


# (client WireFormat.name, provider config `format`) -> a translator for that provider.
PAIRS: dict[tuple[str, str], Make] = {
    ("openai_chat", "anthropic"): lambda p, frame: ChatToAnthropic(max_frame_bytes=frame),
    ("openai_chat", "gemini"): lambda p, frame: ChatToGemini(max_frame_bytes=frame),
    ("openai_chat", "vertex"): _vertex,
    ("openai_chat", "bedrock"): lambda p, frame: ChatToBedrock(max_frame_bytes=frame),
    ("openai_chat", "azure"): lambda p, frame: ChatToAzure(p.api_version),
    ("anthropic_messages", "openai"): lambda p, frame: MessagesToChat(max_frame_bytes=frame),
}

# Provider formats some client API can be translated to.
TARGETS = frozenset(target for _, target in PAIRS)


def build(
    providers: Mapping[str, ProviderConfig], max_frame_bytes: int
) -> dict[tuple[str, str], RequestTranslator]:
    """(client API, provider name) -> its translator, for every pair that has one."""
    out: dict[tuple[str, str], RequestTranslator] = {}
    for provider in providers.values():
        for (client, target), make in PAIRS.items():
            if target == provider.format:
                translator = make(provider, max_frame_bytes)
                if translator is not None:
                    out[client, provider.name] = translator
    return out
