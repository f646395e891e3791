"""Which client API reaches which provider through a translator.

A model alias may point at a provider of another wire format when a translator exists
for (the client's API, the provider's config `format`); any other pair stays a 404, as
before. One translator per provider is built when the policy loads (translators hold
settings only), so the request path does a dict lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from extproc.config import ProviderConfig
from extproc.translate.base import RequestTranslator
from extproc.translate.chat_to_anthropic import ChatToAnthropic
from extproc.translate.chat_to_bedrock import ChatToBedrock
from extproc.translate.chat_to_gemini import ChatToGemini
from extproc.translate.messages_to_chat import MessagesToChat

__all__ = ["PAIRS", "TARGETS", "build", "translatable"]

Make = Callable[[ProviderConfig, int], RequestTranslator]

# (client WireFormat.name, provider config `format`) -> a translator for that provider.
PAIRS: dict[tuple[str, str], Make] = {
    ("openai_chat", "anthropic"): lambda p, frame: ChatToAnthropic(max_frame_bytes=frame),
    ("openai_chat", "gemini"): lambda p, frame: ChatToGemini(max_frame_bytes=frame),
    ("openai_chat", "bedrock"): lambda p, frame: ChatToBedrock(max_frame_bytes=frame),
    ("anthropic_messages", "openai"): lambda p, frame: MessagesToChat(max_frame_bytes=frame),
}

# Provider formats some client API can be translated to.
TARGETS = frozenset(target for _, target in PAIRS)


def translatable(client: str, provider: ProviderConfig) -> bool:
    """A translator takes `client`'s requests to `provider`."""
    return (client, provider.format) in PAIRS


def build(
    providers: Mapping[str, ProviderConfig], max_frame_bytes: int
) -> dict[tuple[str, str], RequestTranslator]:
    """(client API, provider name) -> its translator, for every pair that has one."""
    out: dict[tuple[str, str], RequestTranslator] = {}
    for provider in providers.values():
        for (client, target), make in PAIRS.items():
            if target == provider.format:
                out[client, provider.name] = make(provider, max_frame_bytes)
    return out
