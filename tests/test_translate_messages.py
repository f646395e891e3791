"""Anthropic Messages client -> OpenAI chat upstream: the `anthropic` SDK is the oracle.

The SDK's own request is translated to Chat Completions, the mock provider answers it
in OpenAI's exact bytes, and the answer is translated back in random chunks: the SDK's
stream accumulator must build the message the upstream meant (text, tool use, stop
reason, usage) and raise on errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from hypothesis import given

from extproc.dev import mock
from extproc.dev.mock.openai_chat import chat_job
from extproc.providers import AnthropicMessages, RequestError
from extproc.translate import MessagesToChat
from extproc.translate.base import UpstreamRequest
from tests.providers_helpers import REPLAY, cut, cuts

MESSAGES = [{"role": "user", "content": "Name three rivers."}]
TOOL = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def translate(body: dict[str, Any], **settings: Any) -> tuple[UpstreamRequest, dict[str, Any]]:
    info = AnthropicMessages.parse_request(orjson.dumps(body))
    upstream = MessagesToChat(**settings).request(info.body)
    return upstream, orjson.loads(upstream.body)


Handler = Callable[[UpstreamRequest], tuple[int, dict[str, str], list[bytes]]]


def sdk(answer: Handler, points: list[int] | None = None) -> anthropic.Anthropic:
    def handler(request: httpx2.Request) -> httpx2.Response:
        upstream, _ = translate(orjson.loads(request.content))
        status, headers, frames = answer(upstream)
        translator = MessagesToChat().response(upstream, created=1)
        if status != 200:
            error = translator.error(status, headers, b"".join(frames))
            return httpx2.Response(error.status, headers=dict(error.headers), content=error.body)
        if not upstream.stream:
            body = translator.whole(b"".join(frames))
            return httpx2.Response(200, headers={"content-type": "application/json"}, content=body)
        native = b"".join(frames)
        chunks = cut(native, points) if points is not None else frames
        out = b"".join(translator.feed(c) for c in chunks) + translator.finish()
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=out)

    return anthropic.Anthropic(
        api_key="sk-ant-client",
        base_url="http://gateway.test",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )


def mock_answer(options: mock.MockOptions) -> Handler:
    def answer(upstream: UpstreamRequest):
        return 200, {}, chat_job(upstream.body, upstream.path, options).frames

    return answer


def reference(body: dict[str, Any], options: mock.MockOptions) -> dict[str, Any]:
    return mock.build_completion(translate(body)[1], options)


@given(points=cuts(b"x" * 3000))
@REPLAY
def test_sdk_accumulates_the_translated_text_stream(points: list[int]) -> None:
    options = mock.MockOptions(tokens=8, cached_tokens=3)
    body = {"model": "gpt-4o", "max_tokens": 256, "messages": MESSAGES}
    expected = reference(body, options)
    with sdk(mock_answer(options), points).messages.stream(**body) as stream:
        kinds = [event.type for event in stream]
        message = stream.get_final_message()
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == expected["choices"][0]["message"]["content"]
    assert message.stop_reason == "end_turn"
    usage = expected["usage"]
    assert message.usage.input_tokens == usage["prompt_tokens"] - 3
    assert message.usage.cache_read_input_tokens == 3
    assert message.usage.output_tokens == usage["completion_tokens"]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert message.model == "gpt-4o"


def test_sdk_accumulates_the_tool_use_the_upstream_made() -> None:
    options = mock.MockOptions(tool_call=True)
    body = {"model": "gpt-4o", "max_tokens": 256, "messages": MESSAGES, "tools": [TOOL]}
    call = reference(body, options)["choices"][0]["message"]["tool_calls"][0]
    with sdk(mock_answer(options), [5, 200, 201, 640]).messages.stream(**body) as stream:
        message = stream.get_final_message()
    (block,) = message.content
    assert (block.type, block.id, block.name) == ("tool_use", call["id"], "get_weather")
    assert block.input == orjson.loads(call["function"]["arguments"])
    assert message.stop_reason == "tool_use"


def test_whole_answer_is_a_message() -> None:
    options = mock.MockOptions(tokens=5)
    body = {"model": "gpt-4o", "max_tokens": 3, "messages": MESSAGES}
    expected = reference(body, options)
    message = sdk(mock_answer(options)).messages.create(**body)
    assert message.content[0].text == expected["choices"][0]["message"]["content"]
    assert message.stop_reason == "max_tokens"  # the mock stops at max_tokens: "length"
    assert message.usage.output_tokens == 3


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip
    return b"data: " + orjson.dumps(obj) + b"\n\n"


COUNTS = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}
USAGE = orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                      "choices": [], "usage": COUNTS})  # fmt: skip


def frames_answer(frames: list[bytes], status: int = 200, headers: dict | None = None) -> Handler:
    return lambda upstream: (status, headers or {}, frames)


def test_reasoning_then_text_then_two_tools_are_four_blocks() -> None:
    def call(index: int, ident: str, parts: list[str]) -> list[bytes]:
        first = {"index": index, "id": ident, "type": "function",
                 "function": {"name": f"f{index}", "arguments": ""}}  # fmt: skip
        rest = [{"index": index, "function": {"arguments": p}} for p in parts]
        return [chunk({"tool_calls": [c]}) for c in (first, *rest)]

    frames = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning_content": "Think"}),
        chunk({"content": "Sure."}),
        *call(0, "call_a", ['{"x"', ":1}"]),
        *call(1, "call_b", ['{"y":2}']),
        chunk({}, "tool_calls"),
        b"data: " + USAGE + b"\n\n",
        b"data: [DONE]\n\n",
    ]
    with sdk(frames_answer(frames)).messages.stream(
        model="m", max_tokens=10, messages=MESSAGES
    ) as stream:
        message = stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[0].thinking == "Think" and message.content[1].text == "Sure."
    assert [(b.id, b.name, b.input) for b in message.content[2:]] == [
        ("call_a", "f0", {"x": 1}),
        ("call_b", "f1", {"y": 2}),
    ]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (10, 4)


def drain(frames: list[bytes]) -> list[str]:
    """The event types the SDK yields before it raises (or the stream ends)."""
    stream = sdk(frames_answer(frames)).messages.create(
        model="m", max_tokens=10, messages=MESSAGES, stream=True
    )
    return [event.type for event in stream]


def test_error_mid_stream_is_raised_by_the_sdk() -> None:
    error = orjson.dumps({"error": {"message": "boom", "type": "server_error", "code": None}})
    frames = [chunk({"role": "assistant", "content": "Hal"}), b"data: " + error + b"\n\n"]
    with pytest.raises(anthropic.APIStatusError) as info:
        drain(frames)
    assert "boom" in str(info.value.body)


def test_truncated_stream_is_an_error_event() -> None:
    with pytest.raises(anthropic.APIStatusError, match="ended before"):
        drain([chunk({"content": "Hal"})])


@pytest.mark.parametrize(
    ("status", "exception", "shown"),
    [
        (503, anthropic.InternalServerError, 529),
        (429, anthropic.RateLimitError, 429),
        (401, anthropic.InternalServerError, 502),
        (400, anthropic.BadRequestError, 400),
    ],
)
def test_upstream_errors_in_anthropics_shape(status: int, exception: type, shown: int) -> None:
    body = orjson.dumps({"error": {"message": "upstream says sk-secret", "type": "x"}})
    client = sdk(frames_answer([body], status, {"retry-after": "3", "x-request-id": "r"}))
    with pytest.raises(exception) as info:
        client.messages.create(model="m", max_tokens=10, messages=MESSAGES)
    assert info.value.status_code == shown
    assert info.value.body["type"] == "error"
    assert info.value.response.headers["retry-after"] == "3"
    assert "x-request-id" not in info.value.response.headers
    assert ("sk-secret" in info.value.response.text) is (status not in (401, 403))


# --------------------------------------------------------------------------- request


def test_request_mapping() -> None:
    body = {
        "model": "claude-alias",
        "max_tokens": 300,
        "system": [{"type": "text", "text": "Be terse."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "AAAA"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hidden", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Oslo"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain"},
                {"type": "text", "text": "And tomorrow?"},
            ]},
        ],
        "tools": [TOOL],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "metadata": {"user_id": "u1"},
        "stream": True,
    }  # fmt: skip
    upstream, out = translate(body, max_tokens_field="max_tokens")
    assert upstream.path == "/v1/chat/completions" and upstream.stream
    assert out["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "rain"},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
    ]  # fmt: skip
    assert out["tools"] == [
        {"type": "function", "function": {"name": "get_weather",
         "description": "Weather in a city", "parameters": TOOL["input_schema"]}}
    ]  # fmt: skip
    assert (out["tool_choice"], out["parallel_tool_calls"]) == ("required", False)
    assert (out["stop"], out["temperature"], out["user"], out["max_tokens"]) == (
        ["END"],
        0.2,
        "u1",
        300,
    )
    assert out["stream_options"] == {"include_usage": True}
    chat_job(upstream.body, upstream.path, mock.MockOptions())  # OpenAI's rules accept it


def test_max_completion_tokens_by_default() -> None:
    _, out = translate({"model": "m", "max_tokens": 9, "messages": MESSAGES})
    assert out["max_completion_tokens"] == 9 and "max_tokens" not in out


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": 5}, "top_k"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"messages": [{"role": "user", "content": [
            {"type": "search_result", "source": "x", "title": "t", "content": []}]}]},
         "messages[0].content[0]"),
    ],
)  # fmt: skip
def test_refused_parts_name_themselves(extra: dict, param: str) -> None:
    info = AnthropicMessages.parse_request(
        orjson.dumps({"model": "m", "max_tokens": 9, "messages": MESSAGES, **extra})
    )
    with pytest.raises(RequestError) as caught:
        MessagesToChat().request(info.body)
    assert caught.value.param == param and caught.value.status == 400


def test_an_openai_refusal_is_text_with_stop_reason_refusal() -> None:
    frames = [
        chunk({"role": "assistant", "content": "", "refusal": None}),
        chunk({"refusal": "I can't"}),
        chunk({"refusal": " help with that."}),
        chunk({}, "stop"),
        b"data: " + USAGE + b"\n\n",
        b"data: [DONE]\n\n",
    ]
    with sdk(frames_answer(frames)).messages.stream(
        model="m", max_tokens=10, messages=MESSAGES
    ) as stream:
        message = stream.get_final_message()
    assert [(b.type, b.text) for b in message.content] == [("text", "I can't help with that.")]
    assert message.stop_reason == "refusal"

    whole = orjson.dumps(
        {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
         "choices": [{"index": 0, "finish_reason": "stop", "message": {
             "role": "assistant", "content": None, "refusal": "No."}}], "usage": COUNTS}
    )  # fmt: skip
    message = sdk(frames_answer([whole])).messages.create(
        model="m", max_tokens=10, messages=MESSAGES
    )
    assert message.content[0].text == "No." and message.stop_reason == "refusal"


def test_a_guard_masks_the_upstream_text_before_it_is_translated() -> None:
    card = "4111 1111 1111 1111"
    frames = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": f"Card {card}."}),
        chunk({}, "stop"),
        b"data: " + USAGE + b"\n\n",
        b"data: [DONE]\n\n",
    ]
    translator = MessagesToChat().response(UPSTREAM_STREAM, created=1)
    body = b""
    for frame in frames:
        events = translator.decoder.feed(frame)
        texts = [
            [d.text.replace(card, "[card]") for d in translator.decoder.texts(e)] for e in events
        ]
        body += translator.emit(events, texts)
    assert card.encode() not in body and b"Card [card]." in body
    assert body.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


UPSTREAM_STREAM = UpstreamRequest("/v1/chat/completions", b"{}", True, "m", include_usage=True)
