"""An unchanged OpenAI client reaching Anthropic, Gemini and Bedrock models through
aliases (issue 10), through the real Envoy and the mock serving each native API.

The `openai` SDK is the oracle of the client side; the mock's own bytes (read with
readers independent of the gateway's decoders) of the upstream side: the streamed
text equals the mock's, tool calls are assembled equal to the mock's, the finish
reason is mapped, the usage chunk comes only when asked and equals the mock's
figures; a whole answer likewise; upstream refusals arrive as the SDK's errors with
the right status; a part a target cannot take is a 400 naming it and never reaches the
provider; a planted card arrives masked in OpenAI frames; a token limit is charged the
upstream's exact usage; only the provider's own key reaches the mock.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from extproc.dev.devstack import Stack
from tests.conftest import DEV_API_KEY, metric, wait_for
from tests.test_e2e_providers import random_split
from tests.translate_e2e import (
    CARD,
    FORBIDDEN,
    KEYS,
    TOKEN_LIMIT,
    UPSTREAM,
    VERTEX_PATH,
    access_line,
    mock_seen,
    never_reached,
    sent_of,
    start_translate_stack,
    upstream_answer,
)

# Translated (another API), then Azure (the same API on a deployment path).
TRANSLATED = ["my-claude", "my-gemini", "my-nova", "my-vertex"]
TARGETS = [*TRANSLATED, "my-azure"]
PROVIDER = {
    "my-claude": "mock_anthropic",
    "my-gemini": "mock_gemini",
    "my-nova": "mock_bedrock",
    "my-vertex": "mock_vertex",
    "my-azure": "mock_azure",
}
UPSTREAM_FORMAT = {
    "my-claude": "anthropic_messages",
    "my-gemini": "gemini",
    "my-nova": "bedrock_converse",
    "my-vertex": "vertex",
    "my-azure": "azure_chat",
}
STREAM_PATH = {  # what the provider was asked for (path without the query)
    "my-claude": "/v1/messages",
    "my-gemini": "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
    "my-nova": "/model/amazon.nova-lite-v1:0/converse-stream",  # as the mock decoded it
    "my-vertex": f"{VERTEX_PATH}gemini-2.5-pro:streamGenerateContent",
    "my-azure": "/openai/deployments/gpt-4o/chat/completions",
}
FINISH = {  # the mock's finish for a plain answer / a tool call, in OpenAI's words
    "my-claude": {"end_turn": "stop", "tool_use": "tool_calls"},
    "my-gemini": {"STOP": "stop"},
    "my-nova": {"end_turn": "stop", "tool_use": "tool_calls"},
    "my-vertex": {"STOP": "stop"},
    "my-azure": {"stop": "stop", "tool_calls": "tool_calls"},
}
MESSAGES = [{"role": "user", "content": "Tell me about the weather in Paris."}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_translate_stack(tmp_path_factory.mktemp("translate"))
    try:
        yield s
    finally:
        s.stop()


def sdk(stack: Stack, prefix: str = "/v1", key: str = DEV_API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}{prefix}", api_key=key, max_retries=0)


def knobs(rid: str, **more: str) -> dict[str, str]:
    return {"x-mock-request-id": rid, "x-request-id": rid, **more}


def streamed(stream: Any) -> dict[str, Any]:
    """The SDK's chunks, assembled as a client does: text, tool calls, finish, usage."""
    text, calls, finish, usage, chunks = [], {}, None, None, []
    for chunk in stream:
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            text.append(delta.content or "")
            for call in delta.tool_calls or ():
                slot = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                if call.id:
                    slot["id"] = call.id
                if call.function and call.function.name:
                    slot["name"] += call.function.name
                if call.function and call.function.arguments:
                    slot["arguments"] += call.function.arguments
            finish = choice.finish_reason or finish
    return {
        "text": "".join(text),
        "calls": calls,
        "finish": finish,
        "usage": usage,
        "chunks": chunks,
    }


# ------------------------------------------------------------------ streams


@pytest.mark.parametrize("alias", TARGETS)
def test_stream_text_finish_and_usage_chunk_equal_the_upstreams(stack, alias):
    rid = uuid.uuid4().hex
    got = streamed(
        sdk(stack).chat.completions.create(
            model=alias,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=knobs(rid),
        )
    )
    seen = mock_seen(stack, rid)
    upstream = upstream_answer(UPSTREAM[alias], sent_of(seen))
    assert upstream["text"] and got["text"] == upstream["text"]
    assert got["finish"] == FINISH[alias][upstream["finish"]]
    last = got["chunks"][-1]
    assert last.choices == [] and last.usage is not None  # the usage chunk, last
    assert got["usage"].prompt_tokens == upstream["usage"]["prompt"]
    assert got["usage"].completion_tokens == upstream["usage"]["completion"]
    assert all(c.usage is None for c in got["chunks"][:-1])
    assert {c.model for c in got["chunks"] if c.model} <= {UPSTREAM[alias].model}
    # The provider got its own API and its own key, never the client's.
    assert seen["path"] == STREAM_PATH[alias]
    _, key, header = KEYS[PROVIDER[alias]]
    assert key in seen["headers"][header]
    assert not any(DEV_API_KEY in value for value in seen["headers"].values())
    assert not any(name.startswith("x-ai-gateway-") for name in seen["headers"])


@pytest.mark.parametrize("alias", TARGETS)
def test_no_usage_chunk_unless_the_client_asked(stack, alias):
    rid = uuid.uuid4().hex
    got = streamed(
        sdk(stack).chat.completions.create(
            model=alias, messages=MESSAGES, stream=True, extra_headers=knobs(rid)
        )
    )
    upstream = upstream_answer(UPSTREAM[alias], sent_of(mock_seen(stack, rid)))
    assert got["text"] == upstream["text"]
    assert got["usage"] is None
    assert all(chunk.usage is None for chunk in got["chunks"])
    # Metering still has the upstream's figures (the access log carries them).
    line = access_line(stack, rid)
    assert line["prompt_tokens"] == upstream["usage"]["prompt"]
    assert line["completion_tokens"] == upstream["usage"]["completion"]
    assert line["usage_estimated"] is False
    assert line["provider"] == PROVIDER[alias]
    assert line["upstream_format"] == UPSTREAM_FORMAT[alias]
    assert line["route"] == "v1"


@pytest.mark.parametrize("alias", TARGETS)
def test_stream_in_random_chunkings_reads_the_same(stack, alias):
    rng = random.Random(alias)
    rid = uuid.uuid4().hex
    first = streamed(
        sdk(stack).chat.completions.create(
            model=alias, messages=MESSAGES, stream=True, extra_headers=knobs(rid)
        )
    )
    size = len(sent_of(mock_seen(stack, rid)))
    for _ in range(3):
        split = random_split(rng, size)
        got = streamed(
            sdk(stack).chat.completions.create(
                model=alias,
                messages=MESSAGES,
                stream=True,
                extra_headers=knobs(uuid.uuid4().hex, **{"x-mock-split": split}),
            )
        )
        assert (got["text"], got["finish"]) == (first["text"], first["finish"]), split


@pytest.mark.parametrize("alias", TARGETS)
def test_streamed_tool_call_is_assembled_equal_to_the_upstreams(stack, alias):
    rid = uuid.uuid4().hex
    got = streamed(
        sdk(stack).chat.completions.create(
            model=alias,
            messages=MESSAGES,
            tools=TOOLS,
            stream=True,
            extra_headers=knobs(rid, **{"x-mock-tool-call": "1"}),
        )
    )
    upstream = upstream_answer(UPSTREAM[alias], sent_of(mock_seen(stack, rid)))
    assert upstream["tool"], "the mock answered with a tool call"
    (call,) = got["calls"].values()
    assert call["name"] == upstream["tool"]["name"] == "get_weather"
    assert json.loads(call["arguments"]) == upstream["tool"]["arguments"]
    if "id" in upstream["tool"]:
        assert call["id"] == upstream["tool"]["id"]
    else:
        assert call["id"]  # Gemini gives none: the gateway makes one
    assert got["finish"] == "tool_calls"


# ------------------------------------------------------------------ whole answers


@pytest.mark.parametrize("alias", TARGETS)
def test_whole_answer_translated(stack, alias):
    rid = uuid.uuid4().hex
    raw = sdk(stack).chat.completions.with_raw_response.create(
        model=alias, messages=MESSAGES, extra_headers=knobs(rid)
    )
    answer = raw.parse()
    assert raw.headers["content-type"] == "application/json"
    stream_rid = uuid.uuid4().hex  # the same request streamed: the mock's words
    sdk(stack).chat.completions.create(
        model=alias, messages=MESSAGES, stream=True, extra_headers=knobs(stream_rid)
    ).close()
    upstream = upstream_answer(UPSTREAM[alias], sent_of(mock_seen(stack, stream_rid)))
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content == upstream["text"]
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens == upstream["usage"]["prompt"]
    assert answer.usage.completion_tokens == upstream["usage"]["completion"]
    line = access_line(stack, rid)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
    )
    assert line["usage_estimated"] is False


@pytest.mark.parametrize("alias", TARGETS)
def test_whole_tool_call_translated(stack, alias):
    rid = uuid.uuid4().hex
    answer = sdk(stack).chat.completions.create(
        model=alias,
        messages=MESSAGES,
        tools=TOOLS,
        extra_headers=knobs(rid, **{"x-mock-tool-call": "1"}),
    )
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    assert answer.choices[0].finish_reason == "tool_calls"


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("alias", TARGETS)
def test_upstream_429_is_the_sdks_rate_limit_error_with_retry_after(stack, alias):
    rid = uuid.uuid4().hex
    with pytest.raises(openai.RateLimitError) as info:
        sdk(stack).chat.completions.create(
            model=alias,
            messages=MESSAGES,
            stream=True,
            extra_headers=knobs(rid, **{"x-mock-status": "429", "x-mock-retry-after": "7"}),
        )
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.response.headers["content-type"] == "application/json"
    assert isinstance(info.value.body, dict) and info.value.body.get("message")
    if alias in TRANSLATED:  # only Retry-After is kept of the provider's headers
        assert "request-id" not in info.value.response.headers
        assert "x-amzn-errortype" not in info.value.response.headers
    assert mock_seen(stack, rid)["status"] == 429


def test_anthropic_overloaded_529_is_503(stack):
    with pytest.raises(openai.InternalServerError) as info:
        sdk(stack).chat.completions.create(
            model="my-claude",
            messages=MESSAGES,
            extra_headers=knobs(uuid.uuid4().hex, **{"x-mock-status": "529"}),
        )
    assert info.value.status_code == 503
    assert info.value.code == "overloaded_error"


@pytest.mark.parametrize(
    ("alias", "extra", "param"),
    [
        ("my-claude", {"n": 2}, "n"),
        ("my-claude", {"temperature": 1.5}, "temperature"),
        ("my-gemini", {"logprobs": True}, "logprobs"),
        ("my-nova", {"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_a_part_the_target_cannot_take_is_a_400_naming_it(stack, alias, extra, param):
    rid = uuid.uuid4().hex
    with pytest.raises(openai.BadRequestError) as info:
        sdk(stack).chat.completions.create(
            model=alias, messages=MESSAGES, extra_headers=knobs(rid), **extra
        )
    assert info.value.status_code == 400
    assert info.value.param == param
    assert never_reached(stack, rid)


@pytest.mark.parametrize("alias", TARGETS)
def test_upstream_cut_mid_stream_is_an_error_the_sdk_raises(stack, alias):
    size = len(sent_of(mock_seen(stack, _stream_id(stack, alias))))
    text: list[str] = []
    rid = uuid.uuid4().hex
    cut = {"x-mock-cut-after": str(size // 2), "x-mock-cut-mode": "close"}
    with pytest.raises(openai.APIError):
        stream = sdk(stack).chat.completions.create(
            model=alias, messages=MESSAGES, stream=True, extra_headers=knobs(rid, **cut)
        )
        for chunk in stream:
            text += [c.delta.content or "" for c in chunk.choices]
    upstream = upstream_answer(UPSTREAM[alias], sent_of(mock_seen(stack, _stream_id(stack, alias))))
    assert upstream["text"].startswith("".join(text))


def _stream_id(stack: Stack, alias: str) -> str:
    """A request id whose answer (the plain stream) the mock recorded."""
    rid = uuid.uuid4().hex
    streamed(
        sdk(stack).chat.completions.create(
            model=alias, messages=MESSAGES, stream=True, extra_headers=knobs(rid)
        )
    )
    return rid


@pytest.mark.parametrize("alias", TARGETS)
def test_a_guard_block_ends_the_translated_stream_with_an_openai_error(stack, alias):
    rid = uuid.uuid4().hex
    text: list[str] = []
    with pytest.raises(openai.APIError) as info:
        stream = sdk(stack, "/guarded/v1", key="x").chat.completions.create(
            model=alias,
            messages=MESSAGES,
            stream=True,
            extra_headers=knobs(rid, **{"x-mock-text": FORBIDDEN}),
        )
        for chunk in stream:
            text += [c.delta.content or "" for c in chunk.choices]
    assert not isinstance(info.value, openai.APIConnectionError)  # our frame, not a reset
    assert "launch code" not in "".join(text)
    assert FORBIDDEN.startswith("".join(text))
    assert access_line(stack, rid)["reason"] == "guard_blocked"


# ------------------------------------------------------------------ guards, limits, metrics


@pytest.mark.parametrize("alias", TARGETS)
def test_a_card_in_the_upstream_text_arrives_masked_in_openai_frames(stack, alias):
    planted = f"Your card {CARD} is on file."
    rng = random.Random(f"mask-{alias}")
    for split in (None, "all", *(random_split(rng, 900) for _ in range(2))):
        rid = uuid.uuid4().hex
        extra = {"x-mock-text": planted, **({"x-mock-split": split} if split else {})}
        got = streamed(
            sdk(stack, "/guarded/v1", key="client-key-never-forwarded").chat.completions.create(
                model=alias,
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=knobs(rid, **extra),
            )
        )
        upstream = upstream_answer(UPSTREAM[alias], sent_of(mock_seen(stack, rid)))
        assert CARD in upstream["text"]  # the provider did send it
        assert got["text"] == "Your card <CREDIT_CARD> is on file.", split
        assert got["finish"] == "stop"
        assert got["usage"].completion_tokens == upstream["usage"]["completion"]


@pytest.mark.parametrize("alias", TARGETS)
def test_token_limit_is_charged_the_upstreams_usage(stack, alias):
    before = metric(stack, "ai_gateway_ratelimit_tokens_total", limit=TOKEN_LIMIT, phase="settled")
    translations = metric(
        stack,
        "ai_gateway_translations_total",
        **{"from": "openai_chat", "to": UPSTREAM_FORMAT[alias]},
    )
    rid = uuid.uuid4().hex
    streamed(
        sdk(stack, "/limited/v1", key="anything").chat.completions.create(
            model=alias, messages=MESSAGES, stream=True, extra_headers=knobs(rid)
        )
    )
    usage = upstream_answer(UPSTREAM[alias], sent_of(mock_seen(stack, rid)))["usage"]
    total = usage["prompt"] + usage["completion"]

    def settled() -> float:
        return metric(
            stack, "ai_gateway_ratelimit_tokens_total", limit=TOKEN_LIMIT, phase="settled"
        )

    assert wait_for(lambda: settled() - before == total), (settled() - before, total)
    assert (
        metric(
            stack,
            "ai_gateway_translations_total",
            **{"from": "openai_chat", "to": UPSTREAM_FORMAT[alias]},
        )
        == translations + 1
    )
    line = access_line(stack, rid)
    assert line["total_tokens"] == total
    assert line["route"] == "limited"


def test_internal_headers_sent_by_a_client_do_not_pick_the_route_or_skip_auth(stack):
    spoofed = {"x-ai-gateway-provider": "mock_anthropic", "x-ai-gateway-translated": "1"}
    rid = uuid.uuid4().hex
    with pytest.raises(openai.AuthenticationError):  # /v1/ requires a key: still asked
        sdk(stack, key="wrong").chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={**knobs(rid), **spoofed}
        )
    assert never_reached(stack, rid)
    rid = uuid.uuid4().hex
    answer = sdk(stack).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={**knobs(rid), **spoofed}
    )
    seen = mock_seen(stack, rid)
    assert seen["path"] == "/v1/chat/completions"  # served natively by the route's provider
    assert answer.model == "gpt-4o-mini"
    assert not any(name.startswith("x-ai-gateway-") for name in seen["headers"])
    assert access_line(stack, rid)["route"] == "v1"
