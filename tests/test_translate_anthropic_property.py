"""Property: for random Anthropic event sequences (text, thinking and tool-use blocks
in any order, pings anywhere, any text) cut into random chunks, the translated OpenAI
stream, as the `openai` SDK reads it, carries the same text, reasoning, tool calls,
usage and finish reason, and the bytes do not depend on the chunking."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
from hypothesis import given
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState

from extproc.translate import ChatToAnthropic
from extproc.translate.base import UpstreamRequest
from tests.providers_helpers import REPLAY, cut

UPSTREAM = UpstreamRequest("/v1/messages", b"{}", True, "claude-x", include_usage=True)
STOPS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}

fragments = st.lists(st.text(max_size=12), min_size=1, max_size=5)
blocks = st.lists(
    st.one_of(
        st.tuples(st.just("text"), fragments),
        st.tuples(st.just("thinking"), fragments),
        st.tuples(st.just("tool"), fragments, st.text("abcxyz_", min_size=1, max_size=8)),
    ),
    max_size=5,
)
counts = st.integers(0, 10**6)


def sse(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + orjson.dumps({"type": name, **payload}) + b"\n\n"


def stream_of(draw_blocks: list, usage: tuple[int, ...], stop: str, pings: list[int]) -> bytes:
    inp, read, write, out = usage
    start = {"id": "msg_p", "model": "claude-x", "usage": {
        "input_tokens": inp, "cache_read_input_tokens": read,
        "cache_creation_input_tokens": write, "output_tokens": 1}}  # fmt: skip
    frames = [sse("message_start", {"message": start})]
    for index, block in enumerate(draw_blocks):
        kind, parts = block[0], block[1]
        if kind == "text":
            head, delta = {"type": "text", "text": ""}, ("text_delta", "text")
        elif kind == "thinking":
            head, delta = {"type": "thinking", "thinking": ""}, ("thinking_delta", "thinking")
        else:
            head = {"type": "tool_use", "id": f"toolu_{index}", "name": block[2], "input": {}}
            delta = ("input_json_delta", "partial_json")
        frames.append(sse("content_block_start", {"index": index, "content_block": head}))
        for part in parts:
            frames.append(
                sse("content_block_delta",
                    {"index": index, "delta": {"type": delta[0], delta[1]: part}})
            )  # fmt: skip
        frames.append(sse("content_block_stop", {"index": index}))
    for at in sorted(pings, reverse=True):
        frames.insert(1 + at % len(frames), sse("ping", {}))
    final = {"output_tokens": out, "input_tokens": inp, "cache_read_input_tokens": read}
    frames.append(sse("message_delta", {"delta": {"stop_reason": stop}, "usage": final}))
    frames.append(sse("message_stop", {}))
    return b"".join(frames)


def translated(native: bytes, points: list[int]) -> bytes:
    translator = ChatToAnthropic().response(UPSTREAM, created=1)
    return b"".join(translator.feed(c) for c in cut(native, points)) + translator.finish()


_BODY: list[bytes] = [b""]  # what the one client's server answers next


def _handler(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_BODY[0])


CLIENT = openai.OpenAI(
    api_key="k",
    base_url="http://gateway.test/v1",
    http_client=httpx.Client(transport=httpx.MockTransport(_handler)),
    max_retries=0,
)


def read_with_sdk(body: bytes) -> tuple[Any, list[Any]]:
    """The SDK's own stream parser and chunk accumulator over `body`."""
    _BODY[0] = body
    state = ChatCompletionStreamState()
    chunks = []
    for chunk in CLIENT.chat.completions.create(model="m", messages=[], stream=True):
        chunks.append(chunk)
        state.handle_chunk(chunk)
    # The snapshot, not get_final_completion(): that one raises on finish "length".
    return state.current_completion_snapshot, chunks


@given(
    drawn=blocks,
    usage=st.tuples(counts, counts, counts, counts),
    stop=st.sampled_from(sorted(STOPS)),
    pings=st.lists(st.integers(0, 100), max_size=3),
    data=st.data(),
)
@REPLAY
def test_translated_stream_carries_the_same_text_tools_and_usage(
    drawn: list, usage: tuple[int, ...], stop: str, pings: list[int], data: st.DataObject
) -> None:
    native = stream_of(drawn, usage, stop, pings)
    points = data.draw(st.lists(st.integers(1, len(native) - 1), max_size=60))
    body = translated(native, points)
    assert body == translated(native, [])  # the chunking never shows

    final, chunks = read_with_sdk(body)
    message = final.choices[0].message
    text = "".join("".join(b[1]) for b in drawn if b[0] == "text")
    reasoning = "".join("".join(b[1]) for b in drawn if b[0] == "thinking")
    tools = [(f"toolu_{i}", b[2], "".join(b[1])) for i, b in enumerate(drawn) if b[0] == "tool"]
    assert (message.content or "") == text
    seen = "".join(c.choices[0].delta.model_extra.get("reasoning_content", "") for c in chunks
                   if c.choices)  # fmt: skip
    assert seen == reasoning
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []] == (
        tools
    )
    expected = STOPS[stop]
    if expected == "stop" and tools:
        expected = "tool_calls"
    assert final.choices[0].finish_reason == expected
    inp, read, write, out = usage
    reported = chunks[-1].usage
    assert chunks[-1].choices == []
    assert reported.prompt_tokens == inp + read + write
    assert reported.completion_tokens == out
    assert reported.total_tokens == inp + read + write + out
    assert reported.prompt_tokens_details.cached_tokens == read
