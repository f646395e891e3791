"""Property, Gemini and Bedrock upstreams: random answers (text, thoughts and tool
calls in any order, any text), in each format's native bytes (Gemini SSE with CRLF,
Bedrock's binary event stream), cut into random chunks, translate to an OpenAI stream
from which the `openai` SDK assembles the same text, reasoning, tool calls, finish
reason and usage; the bytes do not depend on the chunking."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
from hypothesis import given
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState

from extproc.providers.eventstream import message as eventstream_message
from extproc.translate.base import UpstreamRequest
from extproc.translate.chat_to_bedrock import ChatToBedrock
from extproc.translate.chat_to_gemini import ChatToGemini
from tests.providers_helpers import REPLAY, cut

UPSTREAM = UpstreamRequest("/x", b"{}", True, "model-x", include_usage=True)
fragments = st.lists(st.text(max_size=10), min_size=1, max_size=4)
arguments = st.dictionaries(st.text("xyz", min_size=1, max_size=3), st.integers(0, 9), max_size=3)
segments = st.lists(
    st.one_of(
        st.tuples(st.just("text"), fragments),
        st.tuples(st.just("reasoning"), fragments),
        st.tuples(st.just("tool"), arguments, st.sampled_from(["a", "b_c"])),
    ),
    max_size=5,
)
counts = st.integers(0, 10**6)

_BODY = [b""]
CLIENT = openai.OpenAI(
    api_key="k",
    base_url="http://gateway.test/v1",
    http_client=httpx.Client(
        transport=httpx.MockTransport(
            lambda request: httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=_BODY[0]
            )
        )
    ),
    max_retries=0,
)


def read(body: bytes) -> tuple[Any, list[Any]]:
    _BODY[0] = body
    state = ChatCompletionStreamState()
    chunks = list(CLIENT.chat.completions.create(model="m", messages=[], stream=True))
    for chunk in chunks:
        state.handle_chunk(chunk)
    return state.current_completion_snapshot, chunks


def check(drawn: list, final: Any, chunks: list[Any], finish: str) -> None:
    message = final.choices[0].message
    assert (message.content or "") == "".join("".join(s[1]) for s in drawn if s[0] == "text")
    reasoning = "".join(
        c.choices[0].delta.model_extra.get("reasoning_content", "") for c in chunks if c.choices
    )
    assert reasoning == "".join("".join(s[1]) for s in drawn if s[0] == "reasoning")
    calls = [
        (c.function.name, orjson.loads(c.function.arguments)) for c in message.tool_calls or []
    ]
    assert calls == [(s[2], s[1]) for s in drawn if s[0] == "tool"]
    assert len({c.id for c in message.tool_calls or []}) == len(calls)
    if finish == "stop" and calls:
        finish = "tool_calls"
    assert final.choices[0].finish_reason == finish
    assert chunks[-1].choices == []


def translated(translator: Any, native: bytes, points: list[int]) -> bytes:
    return b"".join(translator.feed(c) for c in cut(native, points)) + translator.finish()


# --------------------------------------------------------------------------- Gemini

GEMINI_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter"}


def gemini_stream(drawn: list, finish: str, usage: tuple[int, ...]) -> bytes:
    parts: list[list[dict]] = []
    for segment in drawn:
        if segment[0] == "tool":
            parts.append([{"functionCall": {"name": segment[2], "args": segment[1]}}])
        else:
            thought = {"thought": True} if segment[0] == "reasoning" else {}
            parts += [[{"text": piece, **thought}] for piece in segment[1]]
    parts = parts or [[{"text": ""}]]
    prompt, cached, visible, thoughts = usage
    out = []
    for i, element_parts in enumerate(parts):
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": element_parts}}
        element: dict[str, Any] = {"candidates": [candidate], "responseId": "r"}
        if i == len(parts) - 1:
            candidate["finishReason"] = finish
            element["usageMetadata"] = {
                "promptTokenCount": prompt, "cachedContentTokenCount": cached,
                "candidatesTokenCount": visible, "thoughtsTokenCount": thoughts,
            }  # fmt: skip
        out.append(b"data: " + orjson.dumps(element) + b"\r\n\r\n")
    return b"".join(out)


@given(drawn=segments, finish=st.sampled_from(sorted(GEMINI_FINISH)),
       usage=st.tuples(counts, counts, counts, counts), data=st.data())  # fmt: skip
@REPLAY
def test_gemini(drawn: list, finish: str, usage: tuple[int, ...], data: st.DataObject) -> None:
    native = gemini_stream(drawn, finish, usage)
    points = data.draw(st.lists(st.integers(1, len(native) - 1), max_size=60))
    body = translated(ChatToGemini().response(UPSTREAM, created=1), native, points)
    assert body == translated(ChatToGemini().response(UPSTREAM, created=1), native, [])
    final, chunks = read(body)
    check(drawn, final, chunks, GEMINI_FINISH[finish])
    prompt, cached, visible, thoughts = usage
    reported = chunks[-1].usage
    assert (reported.prompt_tokens, reported.completion_tokens) == (prompt, visible + thoughts)
    assert reported.prompt_tokens_details.cached_tokens == cached
    assert reported.completion_tokens_details.reasoning_tokens == thoughts


# --------------------------------------------------------------------------- Bedrock

BEDROCK_FINISH = {"end_turn": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                  "guardrail_intervened": "content_filter"}  # fmt: skip


def event(kind: str, payload: dict[str, Any]) -> bytes:
    headers = [(":event-type", kind), (":content-type", "application/json"),
               (":message-type", "event")]  # fmt: skip
    return eventstream_message(headers, orjson.dumps({**payload, "p": "abc"}))


def bedrock_stream(drawn: list, stop: str, usage: tuple[int, ...]) -> bytes:
    out = [event("messageStart", {"role": "assistant"})]
    for index, segment in enumerate(drawn):
        if segment[0] == "tool":
            start = {"toolUse": {"toolUseId": f"tooluse_{index}", "name": segment[2]}}
            out.append(event("contentBlockStart", {"contentBlockIndex": index, "start": start}))
            text = orjson.dumps(segment[1]).decode()
            pieces = [text[: len(text) // 2], text[len(text) // 2 :]]
            deltas = [{"toolUse": {"input": piece}} for piece in pieces]
        elif segment[0] == "text":
            deltas = [{"text": piece} for piece in segment[1]]
        else:
            deltas = [{"reasoningContent": {"text": piece}} for piece in segment[1]]
        out += [
            event("contentBlockDelta", {"contentBlockIndex": index, "delta": d}) for d in deltas
        ]
        out.append(event("contentBlockStop", {"contentBlockIndex": index}))
    out.append(event("messageStop", {"stopReason": stop}))
    inputs, read, write, output = usage
    numbers = {"inputTokens": inputs, "cacheReadInputTokens": read,
               "cacheWriteInputTokens": write, "outputTokens": output}  # fmt: skip
    out.append(event("metadata", {"usage": numbers, "metrics": {"latencyMs": 5}}))
    return b"".join(out)


@given(drawn=segments, stop=st.sampled_from(sorted(BEDROCK_FINISH)),
       usage=st.tuples(counts, counts, counts, counts), data=st.data())  # fmt: skip
@REPLAY
def test_bedrock(drawn: list, stop: str, usage: tuple[int, ...], data: st.DataObject) -> None:
    native = bedrock_stream(drawn, stop, usage)
    points = data.draw(st.lists(st.integers(1, len(native) - 1), max_size=60))
    body = translated(ChatToBedrock().response(UPSTREAM, created=1), native, points)
    assert body == translated(ChatToBedrock().response(UPSTREAM, created=1), native, [])
    final, chunks = read(body)
    check(drawn, final, chunks, BEDROCK_FINISH[stop])
    ids = [c.id for c in final.choices[0].message.tool_calls or []]
    assert ids == [f"tooluse_{i}" for i, s in enumerate(drawn) if s[0] == "tool"]
    inputs, read_, write, output = usage
    reported = chunks[-1].usage
    assert reported.prompt_tokens == inputs + read_ + write
    assert reported.completion_tokens == output
    assert reported.prompt_tokens_details.cached_tokens == read_
