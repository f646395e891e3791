"""OpenAI chat client -> Bedrock ConverseStream upstream: the `openai` SDK reads what
the mock's binary event stream becomes, cut anywhere (inside headers, CRCs...)."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from hypothesis import given

from extproc.dev import mock
from extproc.dev.mock.bedrock import bedrock_job
from extproc.providers import OpenAIChat, RequestError
from extproc.providers.eventstream import message as eventstream_message
from extproc.translate.base import UpstreamRequest
from extproc.translate.chat_to_bedrock import ChatToBedrock
from tests.providers_helpers import REPLAY, cuts
from tests.translate_helpers import (
    MESSAGES,
    WEATHER,
    Handler,
    assembled,
    openai_sdk,
    translate_with,
)

MODEL = "amazon.nova-lite-v1:0"
MODEL = "amazon.nova-lite-v1:0"


def translate(body: dict[str, Any]) -> tuple[UpstreamRequest, dict[str, Any]]:
    return translate_with(ChatToBedrock(), body)


def sdk(answer: Handler, points: list[int] | None = None) -> openai.OpenAI:
    return openai_sdk(ChatToBedrock, answer, points)


def mock_answer(options: mock.MockOptions) -> Handler:
    return lambda upstream: (200, {}, bedrock_job(upstream.body, upstream.path, options).frames)


def native(body: dict[str, Any], options: mock.MockOptions) -> dict[str, Any]:
    upstream, converse = translate(body)
    return mock.build_bedrock(converse, upstream.model, options)


@given(points=cuts(b"x" * 2500))
@REPLAY
def test_sdk_reads_the_translated_event_stream_in_any_chunking(points: list[int]) -> None:
    options = mock.MockOptions(tokens=7, cached_tokens=4)
    body = {"model": MODEL, "messages": MESSAGES}
    reference = native(body, options)
    stream = sdk(mock_answer(options), points).chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    )
    final, chunks = assembled(stream)
    text = reference["output"]["message"]["content"][0]["text"]
    assert final.choices[0].message.content == text
    assert final.choices[0].finish_reason == "stop"
    up = reference["usage"]
    usage = chunks[-1].usage
    assert usage.prompt_tokens == up["inputTokens"] + up["cacheReadInputTokens"]
    assert usage.completion_tokens == up["outputTokens"]
    assert usage.prompt_tokens_details.cached_tokens == 4
    assert final.model == MODEL


def test_tool_use_is_assembled_as_the_upstream_made_it() -> None:
    options = mock.MockOptions(tool_call=True)
    body = {"model": MODEL, "messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required"}
    use = native(body, options)["output"]["message"]["content"][0]["toolUse"]
    final, _ = assembled(
        sdk(mock_answer(options), [13, 14, 200, 333]).chat.completions.create(**body, stream=True)
    )
    (call,) = final.choices[0].message.tool_calls
    assert (call.id, call.function.name) == (use["toolUseId"], "get_weather")
    assert orjson.loads(call.function.arguments) == use["input"]
    assert final.choices[0].finish_reason == "tool_calls"
    answer = sdk(mock_answer(options)).chat.completions.create(**body)
    assert answer.choices[0].message.tool_calls[0].id == use["toolUseId"]


def test_whole_answer() -> None:
    options = mock.MockOptions(tokens=5)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3}
    reference = native(body, options)
    answer = sdk(mock_answer(options)).chat.completions.create(**body)
    assert answer.choices[0].message.content == reference["output"]["message"]["content"][0]["text"]
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3


@pytest.mark.parametrize("points", [None, []], ids=["frame by frame", "one chunk"])
def test_exception_mid_stream_is_raised_by_the_sdk(points: list[int] | None) -> None:
    frames = mock.build_bedrock_stream(
        {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, MODEL
    )
    exception = eventstream_message(
        [(":exception-type", "throttlingException"), (":content-type", "application/json"),
         (":message-type", "exception")],
        b'{"message":"Too many tokens"}',
    )  # fmt: skip
    # After contentBlockStop: in one chunk the decoder has seen the exception before
    # the translator reads the events ahead of it, which must still pass untouched.
    cut_frames = [*frames[:-2], exception]
    seen: list[str] = []
    stream = sdk(lambda upstream: (200, {}, cut_frames), points).chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError, match="Too many tokens") as info:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert info.value.code == "throttlingException"
    whole = mock.build_bedrock({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, MODEL)
    assert "".join(seen) == whole["output"]["message"]["content"][0]["text"]


def test_refusal_status_and_exception_name() -> None:
    headers = {
        "x-amzn-ErrorType": "ThrottlingException:http://internal.amazon.com/",
        "Retry-After": "2",
    }
    client = sdk(lambda upstream: (429, headers, [b'{"message":"Rate exceeded"}']))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert info.value.code == "ThrottlingException" and "Rate exceeded" in info.value.message
    assert info.value.response.headers["retry-after"] == "2"


def test_request_mapping() -> None:
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": [
                {"type": "text", "text": "Look"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
                {"type": "file", "file": {"filename": "q3_report.pdf",
                                          "file_data": "data:application/pdf;base64,JVBE"}},
            ]},
            {"role": "assistant", "content": "One moment.", "tool_calls": [{"id": "t1",
             "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "rain"},
        ],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_completion_tokens": 50, "temperature": 0.1, "top_p": 0.8, "stop": ["X"],
        "stream": True,
    }  # fmt: skip
    upstream, out = translate(body)
    assert upstream.path == "/model/amazon.nova-lite-v1%3A0/converse-stream"
    assert out["system"] == [{"text": "Be terse."}]
    assert out["messages"] == [
        {"role": "user", "content": [
            {"text": "Look"},
            {"image": {"format": "jpeg", "source": {"bytes": "AAAA"}}},
            {"document": {"format": "pdf", "name": "q3 report", "source": {"bytes": "JVBE"}}},
        ]},
        {"role": "assistant", "content": [
            {"text": "One moment."},
            {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {}}},
        ]},
        {"role": "user", "content": [
            {"toolResult": {"toolUseId": "t1", "content": [{"text": "rain"}]}}]},
    ]  # fmt: skip
    assert out["inferenceConfig"] == {
        "maxTokens": 50,
        "temperature": 0.1,
        "topP": 0.8,
        "stopSequences": ["X"],
    }
    assert out["toolConfig"]["toolChoice"] == {"tool": {"name": "get_weather"}}
    assert out["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"] == {
        "json": WEATHER["function"]["parameters"]
    }


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]},
         "messages[0].content[0].image_url.url"),
        ({"tool_choice": "none", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "t", "type": "function",
             "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "t", "content": "x"}]}, "tool_choice"),
    ],
)  # fmt: skip
def test_refusals_name_the_part(extra: dict, param: str) -> None:
    info = OpenAIChat.parse_request(orjson.dumps({"model": MODEL, "messages": MESSAGES, **extra}))
    with pytest.raises(RequestError) as caught:
        ChatToBedrock().request(info.body)
    assert caught.value.param == param
