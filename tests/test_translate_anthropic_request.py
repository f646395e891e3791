"""OpenAI chat request -> Anthropic Messages request: every mapped field, and a 400
naming the part for everything Anthropic cannot take. The mock provider (Anthropic's
rules) accepts each translated body."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.dev.mock import MockOptions
from extproc.dev.mock.anthropic import anthropic_job
from extproc.providers import OpenAIChat, RequestError
from extproc.translate import ChatToAnthropic

PNG = "iVBORw0KGgo="


def translated(body: dict[str, Any], **settings: Any) -> dict[str, Any]:
    info = OpenAIChat.parse_request(orjson.dumps({"model": "claude-x", **body}))
    upstream = ChatToAnthropic(**settings).request(info.body)
    assert upstream.path == "/v1/messages"
    assert ("anthropic-version", "2023-06-01") in upstream.headers
    anthropic_job(upstream.body, upstream.path, MockOptions())  # Anthropic's own checks
    return orjson.loads(upstream.body)


def refused(body: dict[str, Any]) -> RequestError:
    info = OpenAIChat.parse_request(orjson.dumps({"model": "claude-x", **body}))
    with pytest.raises(RequestError) as caught:
        ChatToAnthropic().request(info.body)
    assert caught.value.status == 400
    return caught.value


USER = {"role": "user", "content": "hi"}


def test_system_and_developer_messages_become_system_blocks() -> None:
    out = translated(
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]},
                USER,
            ]
        }
    )
    assert out["system"] == [
        {"type": "text", "text": "Be terse."},
        {"type": "text", "text": "No emoji."},
    ]
    assert out["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


def test_max_tokens_default_is_configurable_and_client_values_win() -> None:
    assert translated({"messages": [USER]})["max_tokens"] == 4096
    assert translated({"messages": [USER]}, default_max_tokens=123)["max_tokens"] == 123
    assert translated({"messages": [USER], "max_tokens": 50})["max_tokens"] == 50
    both = {"messages": [USER], "max_tokens": 50, "max_completion_tokens": 70}
    assert translated(both)["max_tokens"] == 70
    assert refused({"messages": [USER], "max_tokens": 0}).param == "max_tokens"


def test_image_parts_url_and_base64_and_pdf_files() -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "file",
         "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"}},
    ]  # fmt: skip
    blocks = translated({"messages": [{"role": "user", "content": content}]})["messages"][0][
        "content"
    ]
    assert blocks == [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "document", "title": "a.pdf",
         "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}},
         "messages[0].content[1]"),
        ({"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAA"}},
         "messages[0].content[1].image_url.url"),
        ({"type": "file", "file": {"file_id": "file-123"}}, "messages[0].content[1].file"),
    ],
)  # fmt: skip
def test_parts_anthropic_cannot_take_are_400_naming_the_part(part: dict, param: str) -> None:
    content = [{"type": "text", "text": "hi"}, part]
    error = refused({"messages": [{"role": "user", "content": content}]})
    assert error.param == param
    assert param in error.message


def test_tool_calls_and_results_round_trip_as_blocks() -> None:
    messages = [
        USER,
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "sun"}]},
        {"role": "user", "content": "And?"},
    ]  # fmt: skip
    out = translated({"messages": messages})["messages"]
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    assert out[1]["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
    ]
    # Both results and the next user text in one user turn, results first.
    assert out[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "rain"},
        {"type": "tool_result", "tool_use_id": "call_2",
         "content": [{"type": "text", "text": "sun"}]},
        {"type": "text", "text": "And?"},
    ]  # fmt: skip


def test_tool_arguments_that_are_not_a_json_object_are_refused() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1"}}
    error = refused({"messages": [USER, {"role": "assistant", "tool_calls": [call]}]})
    assert error.param == "messages[1].tool_calls[0].function.arguments"


SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}}
TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": SCHEMA}}


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
def test_tools_and_tool_choice(choice: Any, parallel: Any, expected: Any) -> None:
    body: dict[str, Any] = {"messages": [USER], "tools": [TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    out = translated(body)
    assert out["tools"] == [
        {"name": "f", "description": "d",
         "input_schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    ]  # fmt: skip
    assert out.get("tool_choice") == expected


def test_sampling_stop_user_response_format_effort() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    out = translated(
        {
            "messages": [USER],
            "temperature": 0.3,
            "top_p": 0.9,
            "stop": "END",
            "user": "u-42",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": schema},
            },
            "reasoning_effort": "minimal",
            "n": 1,
            "seed": 7,
        }
    )
    assert (out["temperature"], out["top_p"], out["stop_sequences"]) == (0.3, 0.9, ["END"])
    assert out["metadata"] == {"user_id": "u-42"}
    assert out["output_config"] == {
        "format": {"type": "json_schema", "schema": schema},
        "effort": "low",
    }
    assert "seed" not in out and "n" not in out
    assert translated({"messages": [USER], "stop": ["a", "b"]})["stop_sequences"] == ["a", "b"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 1.5}, "temperature"),
        ({"logprobs": True}, "logprobs"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
        ({"stop": [1]}, "stop"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
    ],
)
def test_what_anthropic_cannot_take_is_refused(extra: dict, param: str) -> None:
    error = refused({"messages": [USER], **extra})
    assert error.param == param


def test_harmless_defaults_are_accepted() -> None:
    out = translated(
        {"messages": [USER], "logprobs": False, "presence_penalty": 0, "modalities": ["text"]}
    )
    assert set(out) == {"model", "max_tokens", "messages"}


def test_stream_flag_and_include_usage() -> None:
    info = OpenAIChat.parse_request(
        orjson.dumps(
            {"model": "claude-x", "messages": [USER], "stream": True,
             "stream_options": {"include_usage": True}}
        )
    )  # fmt: skip
    upstream = ChatToAnthropic().request(info.body, model="claude-sonnet-4-5")
    body = orjson.loads(upstream.body)
    assert (upstream.stream, upstream.include_usage, upstream.model) == (
        True,
        True,
        "claude-sonnet-4-5",
    )
    assert body["stream"] is True and body["model"] == "claude-sonnet-4-5"
    assert "stream_options" not in body
