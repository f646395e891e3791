"""An Anthropic Messages client (the `anthropic` SDK, as coding agents send) reaching a
model served by an OpenAI-format provider (issue 10), through the real Envoy: the
alias `my-gpt` on the Anthropic route is translated to OpenAI chat for the mock and
the answer back to Messages. The SDK is the oracle of the client side, the mock's own
OpenAI chunks of the upstream side."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import anthropic
import pytest

from extproc.dev.devstack import Stack
from tests.translate_e2e import (
    CARD,
    FORBIDDEN,
    KEYS,
    UPSTREAM,
    access_line,
    mock_seen,
    never_reached,
    sent_of,
    start_translate_stack,
    upstream_answer,
)

CLIENT_KEY = "sk-ant-client-key-never-forwarded"
MESSAGES = [{"role": "user", "content": "Tell me about the weather in Paris."}]
TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_translate_stack(tmp_path_factory.mktemp("translate-messages"))
    try:
        yield s
    finally:
        s.stop()


def sdk(stack: Stack, prefix: str = "/anthropic") -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"{stack.base_url}{prefix}", api_key=CLIENT_KEY, max_retries=0
    )


def knobs(rid: str, **more: str) -> dict[str, str]:
    return {"x-mock-request-id": rid, "x-request-id": rid, **more}


def test_stream_reads_in_the_anthropic_sdk_equal_to_the_openai_upstream(stack):
    rid = uuid.uuid4().hex
    with sdk(stack).messages.stream(
        model="my-gpt", max_tokens=256, messages=MESSAGES, extra_headers=knobs(rid)
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    seen = mock_seen(stack, rid)
    upstream = upstream_answer(UPSTREAM["my-gpt"], sent_of(seen))
    assert upstream["text"] and text == upstream["text"]
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == upstream["usage"]["prompt"]
    assert final.usage.output_tokens == upstream["usage"]["completion"]
    # The OpenAI provider got OpenAI chat with its own key, never the client's.
    assert seen["path"] == "/v1/chat/completions"
    _, key, header = KEYS["mock"]
    assert seen["headers"][header] == f"Bearer {key}"
    assert not any(CLIENT_KEY in value for value in seen["headers"].values())
    line = access_line(stack, rid)
    assert (line["provider"], line["upstream_format"]) == ("mock", "openai_chat")
    assert line["completion_tokens"] == upstream["usage"]["completion"]


def test_whole_message_translated(stack):
    rid = uuid.uuid4().hex
    message = sdk(stack).messages.create(
        model="my-gpt", max_tokens=256, messages=MESSAGES, extra_headers=knobs(rid)
    )
    stream_rid = uuid.uuid4().hex
    with sdk(stack).messages.stream(
        model="my-gpt", max_tokens=256, messages=MESSAGES, extra_headers=knobs(stream_rid)
    ) as stream:
        stream.until_done()
    upstream = upstream_answer(UPSTREAM["my-gpt"], sent_of(mock_seen(stack, stream_rid)))
    assert message.type == "message" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == upstream["text"]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == upstream["usage"]["completion"]


def test_streamed_tool_use_equals_the_upstreams_tool_call(stack):
    rid = uuid.uuid4().hex
    with sdk(stack).messages.stream(
        model="my-gpt",
        max_tokens=256,
        messages=MESSAGES,
        tools=TOOLS,
        extra_headers=knobs(rid, **{"x-mock-tool-call": "1"}),
    ) as stream:
        final = stream.get_final_message()
    (use,) = [block for block in final.content if block.type == "tool_use"]
    sent = sent_of(mock_seen(stack, rid))
    calls = [
        call
        for line in sent.split(b"\n")
        if line.startswith(b"data: {")
        for choice in json.loads(line[6:]).get("choices") or ()
        for call in choice["delta"].get("tool_calls") or ()
    ]
    name = next(c["function"]["name"] for c in calls if c.get("function", {}).get("name"))
    arguments = "".join(c["function"].get("arguments") or "" for c in calls)
    assert use.name == name == "get_weather"
    assert use.input == json.loads(arguments)
    assert use.id == next(c["id"] for c in calls if c.get("id"))
    assert final.stop_reason == "tool_use"


def test_upstream_503_is_anthropics_overloaded_529(stack):
    with pytest.raises(anthropic.APIStatusError) as info:
        sdk(stack).messages.create(
            model="my-gpt",
            max_tokens=64,
            messages=MESSAGES,
            extra_headers=knobs(uuid.uuid4().hex, **{"x-mock-status": "503"}),
        )
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"


def test_upstream_429_keeps_retry_after(stack):
    with pytest.raises(anthropic.RateLimitError) as info:
        sdk(stack).messages.create(
            model="my-gpt",
            max_tokens=64,
            messages=MESSAGES,
            extra_headers=knobs(
                uuid.uuid4().hex, **{"x-mock-status": "429", "x-mock-retry-after": "3"}
            ),
        )
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.body["type"] == "error"


def test_a_block_openai_has_no_part_for_is_a_400_naming_it(stack):
    rid = uuid.uuid4().hex
    with pytest.raises(anthropic.BadRequestError) as info:
        sdk(stack).messages.create(
            model="my-gpt",
            max_tokens=64,
            messages=MESSAGES,
            extra_body={"top_k": 5},
            extra_headers=knobs(rid),
        )
    assert "top_k" in info.value.message
    assert never_reached(stack, rid)


def test_a_card_arrives_masked_and_a_block_ends_with_an_error_event(stack):
    rid = uuid.uuid4().hex
    with sdk(stack, "/guarded_messages").messages.stream(
        model="my-gpt",
        max_tokens=256,
        messages=MESSAGES,
        extra_headers=knobs(rid, **{"x-mock-text": f"Your card {CARD} is on file."}),
    ) as stream:
        text = "".join(stream.text_stream)
    assert CARD in upstream_answer(UPSTREAM["my-gpt"], sent_of(mock_seen(stack, rid)))["text"]
    assert text == "Your card <CREDIT_CARD> is on file."
    got: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError),
        sdk(stack, "/guarded_messages").messages.stream(
            model="my-gpt",
            max_tokens=256,
            messages=MESSAGES,
            extra_headers=knobs(uuid.uuid4().hex, **{"x-mock-text": FORBIDDEN}),
        ) as stream,
    ):
        for piece in stream.text_stream:
            got.append(piece)
    assert "launch code" not in "".join(got)
