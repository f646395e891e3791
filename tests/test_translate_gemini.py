"""OpenAI chat client -> Gemini upstream: the `openai` SDK reads what the mock's native
Gemini SSE (CRLF-framed, as Gemini sends it) becomes, in random chunkings."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from hypothesis import given

from extproc.dev import mock
from extproc.dev.mock.gemini import gemini_job
from extproc.providers import OpenAIChat, RequestError
from extproc.translate.base import UpstreamRequest
from extproc.translate.chat_to_gemini import ChatToGemini
from tests.providers_helpers import REPLAY, cuts
from tests.translate_helpers import (
    MESSAGES,
    WEATHER,
    Handler,
    assembled,
    openai_sdk,
    translate_with,
)


def translate(body: dict[str, Any]) -> tuple[UpstreamRequest, dict[str, Any]]:
    return translate_with(ChatToGemini(), body)


def sdk(answer: Handler, points: list[int] | None = None) -> openai.OpenAI:
    return openai_sdk(ChatToGemini, answer, points)


def mock_answer(options: mock.MockOptions) -> Handler:
    return lambda upstream: (200, {}, gemini_job(upstream.body, upstream.path, options).frames)


def native(body: dict[str, Any], options: mock.MockOptions) -> dict[str, Any]:
    upstream, gemini = translate(body)
    return mock.build_gemini(gemini, upstream.model, options)


@given(points=cuts(b"x" * 2500))
@REPLAY
def test_sdk_reads_the_translated_stream_in_any_chunking(points: list[int]) -> None:
    options = mock.MockOptions(tokens=7, cached_tokens=4, reasoning_tokens=3)
    body = {"model": "gemini-2.5-flash", "messages": MESSAGES}
    reference = native(body, options)
    stream = sdk(mock_answer(options), points).chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    )
    final, chunks = assembled(stream)
    assert (
        final.choices[0].message.content
        == reference["candidates"][0]["content"]["parts"][0]["text"]
    )
    assert final.choices[0].finish_reason == "stop"
    meta = reference["usageMetadata"]
    usage = chunks[-1].usage
    assert usage.prompt_tokens == meta["promptTokenCount"]
    assert usage.completion_tokens == meta["candidatesTokenCount"] + meta["thoughtsTokenCount"]
    assert usage.prompt_tokens_details.cached_tokens == 4
    assert usage.completion_tokens_details.reasoning_tokens == 3


def test_function_call_is_one_tool_call_with_whole_arguments() -> None:
    options = mock.MockOptions(tool_call=True)
    body = {"model": "gemini-2.5-flash", "messages": MESSAGES, "tools": [WEATHER]}
    call = native(body, options)["candidates"][0]["content"]["parts"][0]["functionCall"]
    final, _ = assembled(
        sdk(mock_answer(options), [3, 100, 400]).chat.completions.create(**body, stream=True)
    )
    (made,) = final.choices[0].message.tool_calls
    assert made.function.name == "get_weather" and made.id
    assert orjson.loads(made.function.arguments) == call["args"]
    assert final.choices[0].finish_reason == "tool_calls"  # Gemini said STOP


def test_whole_answer() -> None:
    options = mock.MockOptions(tokens=5)
    body = {"model": "gemini-2.5-flash", "messages": MESSAGES}
    reference = native(body, options)
    answer = sdk(mock_answer(options)).chat.completions.create(**body)
    assert (
        answer.choices[0].message.content
        == reference["candidates"][0]["content"]["parts"][0]["text"]
    )
    assert answer.usage.prompt_tokens == reference["usageMetadata"]["promptTokenCount"]


def element(parts: list[dict], finish: str | None = None, **extra: Any) -> bytes:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return (
        b"data: "
        + orjson.dumps({"candidates": [candidate], "responseId": "r1", **extra})
        + b"\r\n\r\n"
    )


def frames_answer(frames: list[bytes], status: int = 200, headers: dict | None = None) -> Handler:
    return lambda upstream: (status, headers or {}, frames)


def test_thoughts_two_calls_and_safety() -> None:
    frames = [
        element([{"text": "Pondering", "thought": True}]),
        element([{"text": "Both:"}]),
        element([{"functionCall": {"name": "a", "args": {"x": 1}}},
                 {"functionCall": {"name": "b", "args": {}}}], "STOP"),
    ]  # fmt: skip
    final, chunks = assembled(
        sdk(frames_answer(frames)).chat.completions.create(
            model="g", messages=MESSAGES, stream=True
        )
    )
    extras = [c.choices[0].delta.model_extra.get("reasoning_content") for c in chunks if c.choices]
    assert [e for e in extras if e] == ["Pondering"]
    message = final.choices[0].message
    assert message.content == "Both:"
    calls = [(c.index, c.function.name, c.function.arguments) for c in message.tool_calls]
    assert calls == [(0, "a", '{"x":1}'), (1, "b", "{}")]
    assert len({c.id for c in message.tool_calls}) == 2

    blocked = [element([{"text": "Hm"}], "SAFETY")]
    final, _ = assembled(
        sdk(frames_answer(blocked)).chat.completions.create(
            model="g", messages=MESSAGES, stream=True
        )
    )
    assert final.choices[0].finish_reason == "content_filter"


def test_a_stream_that_closes_without_a_finish_reason_is_an_error() -> None:
    stream = sdk(frames_answer([element([{"text": "Hal"}])])).chat.completions.create(
        model="g", messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError, match="ended before"):
        list(stream)


def test_errors_keep_status_and_retry_after() -> None:
    body = orjson.dumps(
        {"error": {"code": 429, "message": "Quota", "status": "RESOURCE_EXHAUSTED"}}
    )
    client = sdk(frames_answer([body], 429, {"retry-after": "11"}))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="g", messages=MESSAGES)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert info.value.response.headers["retry-after"] == "11"
    mid = orjson.dumps({"error": {"code": 500, "message": "Internal", "status": "INTERNAL"}})
    stream = sdk(frames_answer([element([{"text": "Hal"}]), b"data: " + mid + b"\r\n\r\n"]))
    with pytest.raises(openai.APIError, match="Internal"):
        list(stream.chat.completions.create(model="g", messages=MESSAGES, stream=True))


def test_request_mapping() -> None:
    body = {
        "model": "gemini-2.5-flash",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "Look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "input_audio", "input_audio": {"data": "BBBB", "format": "wav"}},
            ]},
            {"role": "assistant", "tool_calls": [{"id": "call_9", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_9", "content": "rain"},
        ],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 1.5, "top_p": 0.5, "max_tokens": 99, "stop": "END", "seed": 3,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "reasoning_effort": "low",
        "stream": True,
    }  # fmt: skip
    upstream, out = translate(body)
    assert upstream.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert out["systemInstruction"] == {"parts": [{"text": "Be terse."}]}
    assert out["contents"] == [
        {"role": "user", "parts": [
            {"text": "Look"},
            {"inlineData": {"mimeType": "image/png", "data": "AAAA"}},
            {"inlineData": {"mimeType": "audio/wav", "data": "BBBB"}},
        ]},
        {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"result": "rain"}}}]},
    ]  # fmt: skip
    assert out["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    assert out["generationConfig"] == {
        "temperature": 1.5, "topP": 0.5, "seed": 3, "maxOutputTokens": 99, "stopSequences": ["END"],
        "responseMimeType": "application/json", "responseJsonSchema": {"type": "object"},
        "thinkingConfig": {"thinkingLevel": "LOW", "includeThoughts": True},
    }  # fmt: skip
    gemini_job(upstream.body, upstream.path, mock.MockOptions())  # the Gemini mock accepts it


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 3}, "n"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
         "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]},
         "messages[0].tool_call_id"),
    ],
)  # fmt: skip
def test_refusals_name_the_part(extra: dict, param: str) -> None:
    info = OpenAIChat.parse_request(orjson.dumps({"model": "g", "messages": MESSAGES, **extra}))
    with pytest.raises(RequestError) as caught:
        ChatToGemini().request(info.body)
    assert caught.value.param == param


def test_a_guards_version_of_whole_call_arguments_is_what_the_client_gets() -> None:
    upstream = UpstreamRequest("/x", b"{}", True, "g", include_usage=False)
    translator = ChatToGemini().response(upstream, created=1)
    frame = element(
        [{"functionCall": {"name": "pay", "args": {"card": "4111 1111 1111 1111"}}}], "STOP"
    )
    events = translator.decoder.feed(frame)
    texts = [[d.text.replace("4111 1111 1111 1111", "[card]") for d in translator.decoder.texts(e)]
             for e in events]  # fmt: skip
    body = translator.emit(events, texts) + translator.finish()
    assert b"4111" not in body and b'{\\"card\\":\\"[card]\\"}' in body
