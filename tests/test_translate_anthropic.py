"""OpenAI chat client -> Anthropic Messages upstream: the `openai` SDK is the oracle.

The SDK sends its own request through an httpx MockTransport; the handler translates
it, has the mock provider answer it in Anthropic's native bytes, translates that
answer back in random chunks and returns it: the SDK must read what an OpenAI server
would have sent (content, tool calls, finish reason, usage, errors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import given
from openai.lib.streaming.chat import ChatCompletionStreamState

from extproc.dev import mock
from extproc.dev.mock.anthropic import anthropic_job
from extproc.providers import OpenAIChat
from extproc.translate import ChatToAnthropic, client_status
from extproc.translate.base import UpstreamRequest
from tests.providers_helpers import CARD, MASK, REPLAY, cut, cuts, mask_cards

CREATED = 1_700_000_123
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three rivers."},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}


def translate(body: dict[str, Any], **settings: Any) -> tuple[UpstreamRequest, dict[str, Any]]:
    """The client body as the gateway parses it, translated; the upstream body parsed."""
    info = OpenAIChat.parse_request(orjson.dumps(body))
    upstream = ChatToAnthropic(**settings).request(info.body)
    return upstream, orjson.loads(upstream.body)


Handler = Callable[[UpstreamRequest, dict[str, Any]], tuple[int, dict[str, str], list[bytes]]]


def sdk(answer: Handler, points: list[int] | None = None) -> openai.OpenAI:
    """An OpenAI client whose 'server' is translator + mock Anthropic + translator."""

    def handler(request: httpx.Request) -> httpx.Response:
        upstream, body = translate(orjson.loads(request.content))
        status, headers, frames = answer(upstream, body)
        translator = ChatToAnthropic().response(upstream, created=CREATED)
        if status != 200:
            error = translator.error(status, headers, b"".join(frames))
            return httpx.Response(error.status, headers=dict(error.headers), content=error.body)
        if not upstream.stream:
            content = translator.whole(b"".join(frames))
            return httpx.Response(
                200, headers={"content-type": "application/json"}, content=content
            )
        native = b"".join(frames)
        chunks = cut(native, points) if points is not None else frames
        out = b"".join(translator.feed(c) for c in chunks) + translator.finish()
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=out)

    return openai.OpenAI(
        api_key="sk-client",
        base_url="http://gateway.test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )


def mock_answer(options: mock.MockOptions) -> Handler:
    def answer(upstream: UpstreamRequest, body: dict[str, Any]):
        # The mock validates the translated body with Anthropic's own rules.
        job = anthropic_job(upstream.body, upstream.path, options)
        return 200, {}, job.frames

    return answer


def native(body: dict[str, Any], options: mock.MockOptions) -> dict[str, Any]:
    """What the Anthropic upstream says, whole: the reference for every comparison."""
    return mock.build_anthropic(translate(body)[1], options)


def assembled(stream: Any) -> tuple[Any, list[Any]]:
    state = ChatCompletionStreamState()
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        state.handle_chunk(chunk)
    return state.get_final_completion(), chunks


# --------------------------------------------------------------------------- streams


@given(points=cuts(b"x" * 3000))
@REPLAY
def test_sdk_reads_the_translated_text_stream_in_any_chunking(points: list[int]) -> None:
    options = mock.MockOptions(tokens=9, cached_tokens=5)
    body = {"model": "claude-x", "messages": MESSAGES}
    reference = native(body, options)
    client = sdk(mock_answer(options), points)
    stream = client.chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    )
    final, chunks = assembled(stream)
    assert final.choices[0].message.content == reference["content"][0]["text"]
    assert final.choices[0].finish_reason == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    up = reference["usage"]
    prompt = up["input_tokens"] + up["cache_read_input_tokens"] + up["cache_creation_input_tokens"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, up["output_tokens"])
    assert usage.total_tokens == prompt + up["output_tokens"]
    assert usage.prompt_tokens_details.cached_tokens == 5
    assert usage.completion_tokens_details.reasoning_tokens == 0
    assert final.model == "claude-x"


def test_no_usage_chunk_unless_the_client_asked() -> None:
    client = sdk(mock_answer(mock.MockOptions(tokens=4)))
    chunks = list(client.chat.completions.create(model="claude-x", messages=MESSAGES, stream=True))
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sdk_assembles_the_tool_call_the_upstream_made() -> None:
    options = mock.MockOptions(tool_call=True)
    body = {"model": "claude-x", "messages": MESSAGES, "tools": [WEATHER]}
    reference = native(body, options)["content"][0]
    stream = sdk(mock_answer(options), [7, 300, 301, 302, 900]).chat.completions.create(
        **body, stream=True
    )
    final, chunks = assembled(stream)
    (call,) = final.choices[0].message.tool_calls
    assert (call.id, call.function.name) == (reference["id"], "get_weather")
    assert orjson.loads(call.function.arguments) == reference["input"]
    assert final.choices[0].finish_reason == "tool_calls"
    # Exactly as OpenAI emits: the first delta names the call with empty arguments.
    first = next(c for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    head = first.choices[0].delta.tool_calls[0]
    assert (head.index, head.id, head.type, head.function.arguments) == (
        0,
        reference["id"],
        "function",
        "",
    )


def test_whole_answer_is_a_chat_completion() -> None:
    options = mock.MockOptions(tokens=6, cached_tokens=2)
    body = {"model": "claude-x", "messages": MESSAGES}
    reference = native(body, options)
    answer = sdk(mock_answer(options)).chat.completions.create(**body)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == reference["content"][0]["text"]
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens_details.cached_tokens == 2
    assert answer.usage.completion_tokens == reference["usage"]["output_tokens"]

    tools = {**body, "tools": [WEATHER]}
    tooled = native(tools, mock.MockOptions(tool_call=True))["content"][0]
    answer = sdk(mock_answer(mock.MockOptions(tool_call=True))).chat.completions.create(**tools)
    (call,) = answer.choices[0].message.tool_calls
    assert call.id == tooled["id"] and orjson.loads(call.function.arguments) == tooled["input"]
    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.choices[0].message.content is None


def sse(name: str, payload: dict[str, Any]) -> bytes:
    return (
        b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **payload}) + b"\n\n"
    )


def delta(index: int, kind: str, field: str, text: str) -> bytes:
    return sse("content_block_delta", {"index": index, "delta": {"type": kind, field: text}})


def stop(reason: str, output: int) -> bytes:
    usage = {"output_tokens": output}
    return sse("message_delta", {"delta": {"stop_reason": reason}, "usage": usage})


START = sse(
    "message_start",
    {"message": {"id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 3}}},
)


def frames_answer(frames: list[bytes], status: int = 200, headers: dict | None = None) -> Handler:
    return lambda upstream, body: (status, headers or {}, frames)


def test_thinking_is_reasoning_content_and_max_tokens_is_length() -> None:
    frames = [
        START,
        sse("content_block_start", {"index": 0, "content_block": {"type": "thinking"}}),
        delta(0, "thinking_delta", "thinking", "Hm"),
        delta(0, "signature_delta", "signature", "s"),
        sse("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}),
        delta(1, "text_delta", "text", "Nile"),
        stop("max_tokens", 9),
        sse("message_stop", {}),
    ]  # fmt: skip
    chunks = list(
        sdk(frames_answer(frames)).chat.completions.create(
            model="claude-x", messages=MESSAGES, stream=True
        )
    )
    reasoning = [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks]
    assert [r for r in reasoning if r] == ["Hm"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Nile"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_two_tool_calls_after_text_get_indexes_0_and_1() -> None:
    def tool(index: int, ident: str, parts: list[str]) -> list[bytes]:
        block = {"type": "tool_use", "id": ident, "name": f"f{index}", "input": {}}
        return [
            sse("content_block_start", {"index": index, "content_block": block}),
            *[
                sse("content_block_delta", {"index": index,
                    "delta": {"type": "input_json_delta", "partial_json": p}})
                for p in parts
            ],
        ]  # fmt: skip

    frames = [
        START,
        sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "On it."}}),
        *tool(1, "toolu_a", ["", '{"x":', "1}"]),
        *tool(2, "toolu_b", ['{"y":2}']),
        stop("tool_use", 20),
        sse("message_stop", {}),
    ]  # fmt: skip
    final, _ = assembled(
        sdk(frames_answer(frames)).chat.completions.create(
            model="claude-x", messages=MESSAGES, stream=True, tools=[WEATHER]
        )
    )
    message = final.choices[0].message
    assert message.content == "On it."
    calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls]
    assert calls == [("toolu_a", "f1", '{"x":1}'), ("toolu_b", "f2", '{"y":2}')]


# --------------------------------------------------------------------------- errors


def test_overloaded_529_is_503_for_the_sdk() -> None:
    body = orjson.dumps(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    client = sdk(frames_answer([body], 529))
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="claude-x", messages=MESSAGES)
    assert info.value.status_code == 503
    assert info.value.code == "overloaded_error"
    assert "Overloaded" in info.value.message


def test_rate_limit_stays_429_and_keeps_retry_after_only() -> None:
    body = orjson.dumps(
        {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    )
    headers = {"Retry-After": "7", "anthropic-ratelimit-requests-remaining": "0", "request-id": "r"}
    client = sdk(frames_answer([body], 429, headers))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="claude-x", messages=MESSAGES, stream=True)
    assert info.value.response.headers["retry-after"] == "7"
    assert "anthropic-ratelimit-requests-remaining" not in info.value.response.headers
    assert "request-id" not in info.value.response.headers


def test_upstream_auth_failure_is_502_without_the_providers_words() -> None:
    body = orjson.dumps(
        {
            "type": "error",
            "error": {"type": "authentication_error", "message": "bad key sk-ant-xyz"},
        }
    )
    client = sdk(frames_answer([body], 401))
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="claude-x", messages=MESSAGES)
    assert info.value.status_code == 502
    assert "sk-ant" not in info.value.response.text
    assert info.value.code == "upstream_auth_error"


@pytest.mark.parametrize(
    ("upstream", "client"),
    [(400, 400), (404, 404), (413, 413), (429, 429), (500, 500), (529, 503), (401, 502),
     (403, 502), (402, 400), (418, 400), (599, 502)],
)  # fmt: skip
def test_status_map(upstream: int, client: int) -> None:
    assert client_status(upstream) == client


def test_error_event_mid_stream_is_raised_by_the_sdk_after_the_text() -> None:
    frames = [
        START,
        sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Half"}}),
        sse("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}}),
        sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "never"}}),
    ]
    seen = []
    stream = sdk(frames_answer(frames)).chat.completions.create(
        model="claude-x", messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) == "Half"
    assert "Overloaded" in info.value.message


def test_a_stream_cut_before_message_stop_is_an_error_not_a_clean_end() -> None:
    frames = [
        START,
        sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Half"}}),
    ]
    stream = sdk(frames_answer(frames)).chat.completions.create(
        model="claude-x", messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError, match="ended before"):
        list(stream)


def test_an_oversized_upstream_frame_ends_the_stream_with_an_error() -> None:
    upstream, _ = translate({"model": "claude-x", "messages": MESSAGES, "stream": True})
    translator = ChatToAnthropic(max_frame_bytes=512).response(upstream, created=CREATED)
    out = translator.feed(START)
    out += translator.feed(b"event: content_block_delta\ndata: " + b"x" * 4096)
    assert out.endswith(b"data: [DONE]\n\n") and b'"code":"malformed_stream"' in out
    held = translator.buffered
    assert translator.feed(b"y" * 4096 + b"\n\n") == b"" and translator.finish() == b""
    assert translator.buffered == held  # a broken stream is fed nothing more


def test_a_guard_masks_the_upstream_text_before_it_is_translated() -> None:
    """The exchange's path: decode, let a guard replace an event's texts, emit."""
    frames = [
        START,
        sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        delta(0, "text_delta", "text", f"Card {CARD} on file"),
        sse("content_block_start", {"index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "pay", "input": {}}}),
        delta(1, "input_json_delta", "partial_json", f'{{"card":"{CARD}"}}'),
        stop("tool_use", 9),
        sse("message_stop", {}),
    ]  # fmt: skip
    upstream, _ = translate({"model": "claude-x", "messages": MESSAGES, "stream": True})
    translator = ChatToAnthropic().response(upstream, created=CREATED)
    body = b""
    for frame in frames:
        events = translator.decoder.feed(frame)
        texts = [[mask_cards(d.text) for d in translator.decoder.texts(e)] for e in events]
        body += translator.emit(events, texts)
    body += translator.finish()
    assert CARD.encode() not in body

    def served(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    client = openai.OpenAI(
        api_key="k",
        base_url="http://gateway.test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(served)),
    )
    final, _ = assembled(
        client.chat.completions.create(model="claude-x", messages=MESSAGES, stream=True)
    )
    assert final.choices[0].message.content == f"Card {MASK} on file"
    assert final.choices[0].message.tool_calls[0].function.arguments == f'{{"card":"{MASK}"}}'
