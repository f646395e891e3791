"""Property, reverse direction: random OpenAI chunk sequences (reasoning, text and tool
calls in any order, any text, arguments split anywhere) cut into random chunks become
Anthropic events from which the `anthropic` SDK accumulates the same blocks, stop
reason and usage; the bytes do not depend on the chunking."""

from __future__ import annotations

import itertools
from typing import Any

import anthropic
import httpx2
import orjson
from hypothesis import given
from hypothesis import strategies as st

from extproc.translate import MessagesToChat
from extproc.translate.base import UpstreamRequest
from tests.providers_helpers import REPLAY, cut

UPSTREAM = UpstreamRequest("/v1/chat/completions", b"{}", True, "gpt-x", include_usage=True)
STOPS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
         "content_filter": "refusal"}  # fmt: skip

fragments = st.lists(st.text(max_size=10), min_size=1, max_size=4)
arguments = st.dictionaries(
    st.text("abc", min_size=1, max_size=3), st.integers(-9, 99) | st.text(max_size=6), max_size=3
)
segments = st.lists(
    st.one_of(
        st.tuples(st.just("text"), fragments),
        st.tuples(st.just("thinking"), fragments),
        st.tuples(st.just("tool"), arguments, st.lists(st.integers(0, 40), max_size=3)),
    ),
    max_size=5,
)


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    obj = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
           "choices": [choice], "usage": None}  # fmt: skip
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_of(drawn: list, stop: str, usage: tuple[int, int, int]) -> bytes:
    frames = [chunk({"role": "assistant", "content": ""})]
    calls = 0
    for segment in drawn:
        if segment[0] == "tool":
            text = orjson.dumps(segment[1]).decode()
            pieces = [
                text[a:b] for a, b in itertools.pairwise([0, *sorted(set(segment[2])), len(text)])
            ]
            head = {"index": calls, "id": f"call_{calls}", "type": "function",
                    "function": {"name": f"f{calls}", "arguments": ""}}  # fmt: skip
            frames.append(chunk({"tool_calls": [head]}))
            frames += [chunk({"tool_calls": [{"index": calls, "function": {"arguments": p}}]})
                       for p in pieces]  # fmt: skip
            calls += 1
        else:
            field = "content" if segment[0] == "text" else "reasoning_content"
            frames += [chunk({field: piece}) for piece in segment[1]]
    frames.append(chunk({}, stop))
    prompt, cached, completion = usage
    counts = {"prompt_tokens": prompt + cached, "completion_tokens": completion,
              "total_tokens": prompt + cached + completion,
              "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
    last = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
            "choices": [], "usage": counts}  # fmt: skip
    frames += [b"data: " + orjson.dumps(last) + b"\n\n", b"data: [DONE]\n\n"]
    return b"".join(frames)


def expected_blocks(drawn: list) -> list[tuple]:
    blocks: list[tuple] = []
    calls = 0
    for segment in drawn:
        if segment[0] == "tool":
            blocks.append(("tool_use", f"call_{calls}", f"f{calls}", segment[1]))
            calls += 1
            continue
        text = "".join(segment[1])
        if not text:
            continue
        if blocks and blocks[-1][0] == segment[0]:
            blocks[-1] = (segment[0], blocks[-1][1] + text)
        else:
            blocks.append((segment[0], text))
    return blocks


def translated(native: bytes, points: list[int]) -> bytes:
    translator = MessagesToChat().response(UPSTREAM, created=1)
    return b"".join(translator.feed(c) for c in cut(native, points)) + translator.finish()


_BODY = [b""]
CLIENT = anthropic.Anthropic(
    api_key="k",
    base_url="http://gateway.test",
    http_client=httpx2.Client(
        transport=httpx2.MockTransport(
            lambda request: httpx2.Response(
                200, headers={"content-type": "text/event-stream"}, content=_BODY[0]
            )
        )
    ),
    max_retries=0,
)


def as_tuple(block: Any) -> tuple:
    if block.type == "tool_use":
        return ("tool_use", block.id, block.name, block.input)
    if block.type == "thinking":
        return ("thinking", block.thinking)
    return ("text", block.text)


@given(
    drawn=segments,
    stop=st.sampled_from(sorted(STOPS)),
    usage=st.tuples(st.integers(0, 10**6), st.integers(0, 10**5), st.integers(0, 10**6)),
    data=st.data(),
)
@REPLAY
def test_translated_events_carry_the_same_blocks_and_usage(
    drawn: list, stop: str, usage: tuple[int, int, int], data: st.DataObject
) -> None:
    native = stream_of(drawn, stop, usage)
    points = data.draw(st.lists(st.integers(1, len(native) - 1), max_size=60))
    body = translated(native, points)
    assert body == translated(native, [])

    _BODY[0] = body
    with CLIENT.messages.stream(model="m", max_tokens=5, messages=[]) as stream:
        message = stream.get_final_message()
    assert [as_tuple(b) for b in message.content] == expected_blocks(drawn)
    assert message.stop_reason == STOPS[stop]
    prompt, cached, completion = usage
    assert message.usage.input_tokens == prompt
    assert message.usage.cache_read_input_tokens == cached
    assert message.usage.output_tokens == completion
