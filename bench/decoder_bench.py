"""Per-frame cost of each wire format's stream decoder, in process (no Envoy).

The streams come from the mock provider's generators (the same bytes the end-to-end
tests see), fed one frame per chunk as a slow provider sends them, then all in one
chunk as a fast one does. Prints microseconds per frame: the metering cost every
streamed chunk pays before any policy looks at it.

    .venv/bin/python bench/decoder_bench.py [--tokens 64] [--rounds 300]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from extproc.dev import mock
from extproc.providers import (
    AnthropicMessages,
    BedrockConverse,
    Gemini,
    OpenAIChat,
    OpenAIResponses,
    WireFormat,
    response_decoder,
)

MESSAGES = [{"role": "user", "content": "Tell me about gateways."}]


def streams(tokens: int) -> list[tuple[str, type[WireFormat], str, list[bytes]]]:
    opts = mock.MockOptions(tokens=tokens)
    chat = {"model": "gpt-4o-mini", "stream": True, "messages": MESSAGES}
    usage = {**chat, "stream_options": {"include_usage": True}}
    anthropic = {"model": "claude-x", "max_tokens": 4096, "stream": True, "messages": MESSAGES}
    gemini = {"contents": [{"role": "user", "parts": [{"text": "Tell me about gateways."}]}]}
    bedrock = {"messages": [{"role": "user", "content": [{"text": "Tell me about gateways."}]}]}
    sse = "text/event-stream"
    return [
        ("openai chat (client asked usage)", OpenAIChat, sse, mock.build_stream(usage, opts)),
        ("openai chat (usage hidden)", OpenAIChat, sse, mock.build_stream(usage, opts)),
        (
            "openai responses",
            OpenAIResponses,
            sse,
            mock.build_responses_stream({"model": "gpt-4o", "input": "hi", "stream": True}, opts),
        ),
        (
            "anthropic messages",
            AnthropicMessages,
            sse,
            mock.build_anthropic_stream(anthropic, opts),
        ),
        ("gemini sse", Gemini, sse, mock.build_gemini_stream(gemini, "gemini-2.0", opts, sse=True)),
        (
            "gemini json array",
            Gemini,
            "application/json",
            mock.build_gemini_stream(gemini, "gemini-2.0", opts, sse=False),
        ),
        (
            "bedrock eventstream",
            BedrockConverse,
            "application/vnd.amazon.eventstream",
            mock.build_bedrock_stream(bedrock, "anthropic.claude", opts),
        ),
    ]


def per_frame_us(
    make: Callable[[], object], chunks: list[bytes], frames: int, rounds: int
) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        decoder = make()
        for chunk in chunks:
            whole = decoder.feed_whole(chunk)
            if whole is None:
                decoder.feed(chunk)
        decoder.finish()
    return (time.perf_counter() - start) / rounds / frames * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    print(
        f"{'format':36} {'frames':>6} {'µs/frame, frame by frame':>25} {'µs/frame, one chunk':>20}"
    )
    for label, fmt, content_type, frames in streams(args.tokens):
        hide = "hidden" in label

        def make(fmt=fmt, content_type=content_type, hide=hide):
            return response_decoder(
                fmt, content_type, stream=True, hide_usage=hide, max_frame_bytes=1 << 20
            )

        one = per_frame_us(make, frames, len(frames), args.rounds)
        whole = per_frame_us(make, [b"".join(frames)], len(frames), args.rounds)
        print(f"{label:36} {len(frames):>6} {one:>25.2f} {whole:>20.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
