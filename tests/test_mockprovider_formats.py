"""The mock provider speaks every wire format: each provider's own SDK reads it, the
knobs work in each, and the gateway's decoders meter its streams exactly."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import boto3
import httpx
import openai
import orjson
import pytest
from botocore.exceptions import ClientError
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from extproc.dev import mock as mockprovider
from extproc.dev.mock import MockOptions
from extproc.dev.mock import plan as mock_plan
from extproc.providers import (
    AnthropicMessages,
    BedrockConverse,
    Gemini,
    OpenAIChat,
    OpenAIResponses,
    response_decoder,
)
from tests.providers_helpers import cut, replay, running_texts, usage_tuple

REPO = Path(__file__).resolve().parents[1]
CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def mock_url() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.dev.mock", "--port", "0", "--log-level", "WARNING"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        line = proc.stdout.readline().decode()  # type: ignore[union-attr]
        assert "listening on " in line, line
        yield line.split("listening on ")[1].strip()
    finally:
        proc.terminate()
        proc.wait(10)


def sent(base: str, rid: str) -> bytes:
    record = httpx.get(f"{base}/_mock/exchanges/{rid}", timeout=5).json()
    return base64.b64decode(record["sent_b64"])


# ------------------------------------------------------------------ real SDKs


def test_openai_responses_sdk(mock_url):
    client = openai.OpenAI(base_url=mock_url + "/v1", api_key="x", max_retries=0)
    events = list(client.responses.create(
        model="gpt-4.1-mini", input="Say hi", stream=True,
        extra_headers={"x-mock-tokens": "5", "x-mock-cached-tokens": "2",
                       "x-mock-reasoning-tokens": "3"},
    ))  # fmt: skip
    final = events[-1].response
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 5 and final.output_text == "".join(deltas)
    usage = final.usage
    assert (usage.output_tokens, usage.input_tokens_details.cached_tokens) == (8, 2)
    assert usage.output_tokens_details.reasoning_tokens == 3
    whole = client.responses.create(model="gpt-4.1-mini", input="Say hi",
                                    extra_headers={"x-mock-tokens": "5"})  # fmt: skip
    assert whole.output_text == final.output_text
    cut_short = client.responses.create(model="gpt-4.1-mini", input="Say hi", max_output_tokens=2)
    assert cut_short.status == "incomplete"
    assert cut_short.incomplete_details.reason == "max_output_tokens"


def test_anthropic_sdk(mock_url):
    client = anthropic.Anthropic(base_url=mock_url, api_key="x", max_retries=0)
    args = {"model": "claude-test", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    with client.messages.stream(**args, extra_headers={"x-mock-cached-tokens": "3"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 12
    assert final.usage.cache_read_input_tokens == 3
    whole = client.messages.create(**args)
    assert whole.content[0].text == final.content[0].text
    assert client.messages.create(**{**args, "max_tokens": 4}).stop_reason == "max_tokens"
    tools = [{"name": "get_weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip
    with client.messages.stream(**args, tools=tools,
                                extra_headers={"x-mock-tool-call": "1"}) as stream:  # fmt: skip
        called = stream.get_final_message()
    assert called.stop_reason == "tool_use" and set(called.content[0].input) == {"city"}
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(**args, extra_headers={"x-mock-status": "429"})
    partial = {k: args[k] for k in ("model", "messages")}
    missing = httpx.post(mock_url + "/v1/messages", json=partial)
    assert missing.status_code == 400
    assert missing.json()["error"] == {
        "type": "invalid_request_error", "message": "max_tokens: Field required"
    }  # fmt: skip


def gemini_client(base: str, headers: dict[str, str] | None = None) -> genai.Client:
    return genai.Client(
        api_key="k", http_options=genai_types.HttpOptions(base_url=base, headers=headers)
    )


def test_google_genai_sdk(mock_url):
    client = gemini_client(mock_url, {"x-mock-reasoning-tokens": "4"})
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))
    text = "".join(c.text or "" for c in chunks)
    meta = chunks[-1].usage_metadata
    assert len(chunks) == 12 and meta.thoughts_token_count == 4
    assert meta.total_token_count == meta.prompt_token_count + 12 + 4
    assert chunks[-1].candidates[0].finish_reason == genai_types.FinishReason.STOP
    whole = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert whole.text == text
    failing = gemini_client(mock_url, {"x-mock-status": "429"})  # keep it: it owns the pool
    with pytest.raises(genai_errors.ClientError) as info:
        failing.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert info.value.code == 429 and info.value.status == "RESOURCE_EXHAUSTED"


def test_boto3_bedrock_runtime(mock_url):
    client = boto3.client("bedrock-runtime", region_name="us-east-1", endpoint_url=mock_url,
                          aws_access_key_id="a", aws_secret_access_key="b")  # fmt: skip
    args = {"modelId": "us.amazon.nova-lite-v1:0",
            "messages": [{"role": "user", "content": [{"text": "hi"}]}]}  # fmt: skip
    events = list(client.converse_stream(**args)["stream"])
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events
                   if "contentBlockDelta" in e)  # fmt: skip
    assert events[-2] == {"messageStop": {"stopReason": "end_turn"}}
    assert events[-1]["metadata"]["usage"]["outputTokens"] == 12
    whole = client.converse(**args)
    assert whole["output"]["message"]["content"][0]["text"] == text
    client.meta.events.register(
        "before-send.bedrock-runtime.*",
        lambda request, **_: request.headers.__setitem__("x-mock-status", "429"),
    )
    with pytest.raises(ClientError) as info:
        client.converse(**args)
    assert info.value.response["Error"]["Code"] == "ThrottlingException"


def test_azure_openai_sdk(mock_url):
    client = openai.AzureOpenAI(azure_endpoint=mock_url, api_key="k", api_version="2024-10-21",
                                max_retries=0)  # fmt: skip
    chunks = list(client.chat.completions.create(
        model="gpt-4o-prod", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-mock-request-id": "az1"},
    ))  # fmt: skip
    assert chunks[0].prompt_filter_results and chunks[0].choices == []
    assert chunks[-1].usage.completion_tokens == 12
    record = httpx.get(f"{mock_url}/_mock/exchanges/az1").json()
    assert record["path"] == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert b'"model":"gpt-4o-prod"' in sent(mock_url, "az1")


# ------------------------------------------------------------------ knobs per format

PATHS = {
    "responses": ("/v1/responses", {"model": "gpt-4.1-mini", "input": "hi", "stream": True},
                  OpenAIResponses),
    "anthropic": ("/v1/messages", {"model": "claude-test", "max_tokens": 50, "stream": True,
                                   "messages": [{"role": "user", "content": "hi"}]},
                  AnthropicMessages),
    "gemini_sse": ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                   {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, Gemini),
    "gemini_array": ("/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                     {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, Gemini),
    "bedrock": ("/model/us.amazon.nova-lite-v1%3A0/converse-stream",
                {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, BedrockConverse),
}  # fmt: skip


@pytest.mark.parametrize("route", list(PATHS))
def test_split_gzip_and_text_knobs_in_every_format(mock_url, route):
    path, body, fmt = PATHS[route]
    with httpx.Client(base_url=mock_url, timeout=10) as client:
        plain = client.post(path, json=body, headers={"x-mock-request-id": f"{route}-a"})
        assert plain.status_code == 200
        split = client.post(path, json=body, headers={"x-mock-split": "1,2,3,50,51,200"})
        assert split.content == plain.content == sent(mock_url, f"{route}-a")
        gz = client.post(path, json=body, headers={"x-mock-gzip": "1"})
        assert gz.content == plain.content  # httpx decodes the gzip it did not ask for
        planted = client.post(path, json=body, headers={"x-mock-text": f"Card {CARD} ok"})
    dec = response_decoder(fmt, planted.headers["content-type"], stream=True, hide_usage=False,
                           max_frame_bytes=1 << 16)  # fmt: skip
    texts = running_texts(dec, replay(dec, [planted.content]))
    assert texts[("content", 0)] == f"Card {CARD} ok"


@pytest.mark.parametrize("route", list(PATHS))
def test_status_knob_answers_in_the_formats_error_shape(mock_url, route):
    path, body, _ = PATHS[route]
    r = httpx.post(mock_url + path, json=body, headers={"x-mock-status": "503"})
    assert r.status_code == 503
    shape = r.json()
    if route == "anthropic":
        assert shape["type"] == "error" and shape["error"]["type"] == "api_error"
    elif route.startswith("gemini"):
        assert shape["error"]["status"] == "UNAVAILABLE" and shape["error"]["code"] == 503
    elif route == "bedrock":
        assert r.headers["x-amzn-errortype"].startswith("ServiceUnavailableException:")
        assert set(shape) == {"message"}
    else:
        assert shape["error"]["type"] == "server_error"


# ------------------------------------------------------------------ decoders on mock output

CHAT = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Tell me a story about rivers."}]}  # fmt: skip
TOOLS_CHAT = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"q": {"type": "string"}, "n": {"type": "integer"}},
            },
        },
    }
]


def builds(options: MockOptions) -> list[tuple[Any, str, bool, bytes]]:
    """(format, response content type, request stream flag, whole stream) per format."""
    m = mockprovider
    story = CHAT["messages"][0]["content"]
    anthropic_req = {"model": "claude-test", "max_tokens": 100,
                     "messages": [{"role": "user", "content": story}]}  # fmt: skip
    gemini_req = {"contents": [{"role": "user", "parts": [{"text": story}]}]}
    bedrock_req = {"messages": [{"role": "user", "content": [{"text": story}]}]}
    join = b"".join
    return [
        (OpenAIChat, "text/event-stream", True, join(m.build_stream(CHAT, options))),
        (OpenAIResponses, "text/event-stream", True,
         join(m.build_responses_stream({"model": "gpt-4o-mini", "input": story}, options))),
        (AnthropicMessages, "text/event-stream", True,
         join(m.build_anthropic_stream(anthropic_req, options))),
        (Gemini, "text/event-stream", True,
         join(m.build_gemini_stream(gemini_req, "gemini-x", options, sse=True))),
        (Gemini, "application/json", True,
         join(m.build_gemini_stream(gemini_req, "gemini-x", options, sse=False))),
        (BedrockConverse, "application/vnd.amazon.eventstream", True,
         join(m.build_bedrock_stream(bedrock_req, "amazon.nova", options))),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [MockOptions(), MockOptions(tokens=7, cached_tokens=3, reasoning_tokens=5),
     MockOptions(text=f"Your card is {CARD}."), MockOptions(tokens=0)],
    ids=["default", "cached-reasoning", "text", "empty"],
)  # fmt: skip
def test_every_decoder_meters_the_mocks_streams_exactly(options):
    expected_prompt = mockprovider.count_prompt_tokens(CHAT)
    pieces = mock_plan.FRAGMENT_RE.findall(options.text) if options.text else None
    visible = len(pieces) if pieces else options.tokens
    for fmt, kind, stream, body in builds(options):
        dec = response_decoder(fmt, kind, stream=stream, hide_usage=False, max_frame_bytes=1 << 16)
        events = replay(dec, cut(body, list(range(3, len(body), 37))))
        assert b"".join(e.raw for e in events) == body, fmt.name
        got = usage_tuple(dec.usage)
        assert got == (
            expected_prompt, visible + options.reasoning_tokens,
            expected_prompt + visible + options.reasoning_tokens,
            options.cached_tokens, got[4], True,
        ), (fmt.name, kind)  # fmt: skip
        assert dec.finish_reason == "stop", (fmt.name, kind)
        texts = running_texts(dec, events)
        content = "".join(v for (k, _), v in texts.items() if k == "content")
        if options.text:
            assert content == options.text, (fmt.name, kind)
        else:
            assert len(content.split()) == visible or visible == 0


def test_every_decoder_sees_the_mocks_tool_calls_and_no_usage():
    options = MockOptions(tool_call=True, no_usage=True)
    chat = {**CHAT, "tools": TOOLS_CHAT}
    m = mockprovider
    tools_anthropic = [{"name": "lookup", "input_schema": TOOLS_CHAT[0]["function"]["parameters"]}]
    anthropic_req = {"model": "c", "max_tokens": 100, "tools": tools_anthropic,
                     "messages": chat["messages"]}  # fmt: skip
    streams = [
        (OpenAIChat, "text/event-stream", b"".join(m.build_stream(chat, options))),
        (AnthropicMessages, "text/event-stream",
         b"".join(m.build_anthropic_stream(anthropic_req, options))),
    ]  # fmt: skip
    for fmt, kind, body in streams:
        dec = response_decoder(fmt, kind, stream=True, hide_usage=False, max_frame_bytes=1 << 16)
        events = replay(dec, [body])
        assert not dec.usage.reported and dec.finish_reason == "tool_calls"
        args = "".join(v for (k, _), v in running_texts(dec, events).items()
                       if k == "tool_arguments")  # fmt: skip
        assert set(orjson.loads(args)) == {"q", "n"}
