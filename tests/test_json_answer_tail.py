"""A whole JSON answer larger than `streaming.max_json_response_bytes` is not kept, but
it is still metered from the provider's own figures: every API writes its usage after
the texts, so the answer's last bytes hold it. (It used to settle with 0 completion
tokens: an answer of many long choices spent without a budget seeing it.)"""

from __future__ import annotations

import orjson
import pytest

from extproc.config import parse_config
from extproc.providers._json import usage_in_tail
from extproc.providers.anthropic import AnthropicMessages
from extproc.providers.bedrock import BedrockConverse
from extproc.providers.gemini import Gemini
from extproc.providers.openai_chat import OpenAIChat
from tests.test_exchange import CHAT, Run

LIMIT = 4096


def openai_answer(choices: int, text: str, completion: int) -> bytes:
    return orjson.dumps({
        "id": "x", "object": "chat.completion", "model": "m",
        "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"} for i in range(choices)],
        "usage": {"prompt_tokens": 9, "completion_tokens": completion,
                  "total_tokens": 9 + completion},
        "system_fingerprint": "fp",
    })  # fmt: skip


def small_limit_run() -> Run:
    doc = {
        "providers": {"mock": {"url": "http://127.0.0.1:1"}},
        "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
        "streaming": {"max_json_response_bytes": LIMIT},
    }
    return Run(parse_config(doc, "t.yaml"))


@pytest.mark.parametrize("piece", [1000, 4096, 70000])
def test_an_answer_too_large_to_keep_is_metered_from_its_own_usage(piece):
    body = openai_answer(8, "word " * 4000, completion=32000)
    assert len(body) > 16 * LIMIT
    run = small_limit_run()
    run.request(CHAT)
    chunks = [body[i : i + piece] for i in range(0, len(body), piece)]
    client = run.respond(chunks, {"content-type": "application/json"})
    assert client == body  # passed on untouched
    usage = run.ex.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (9, 32000)
    assert usage.reported and not usage.estimated
    assert run.ex.json is None and len(run.ex.json_tail) <= 64 << 10  # bounded


def test_an_answer_too_large_whose_end_has_no_usage_is_estimated():
    body = orjson.dumps({"choices": [{"message": {"content": "z " * 5000}}]})
    run = small_limit_run()
    run.request(CHAT)
    run.respond([body], {"content-type": "application/json"})
    assert run.ex.usage.estimated and not run.ex.usage.reported


@pytest.mark.parametrize(
    ("fmt", "answer", "expected"),
    [
        (
            AnthropicMessages,
            {"id": "m", "type": "message", "content": [{"type": "text", "text": "a " * 3000}],
             "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 3000}},
            (5, 3000),
        ),
        (
            Gemini,
            {"candidates": [{"content": {"parts": [{"text": "b " * 3000}]}}],
             "usageMetadata": {"promptTokenCount": 6, "candidatesTokenCount": 3001,
                               "totalTokenCount": 3007}, "modelVersion": "gemini-x"},
            (6, 3001),
        ),
        (
            BedrockConverse,
            {"output": {"message": {"role": "assistant", "content": [{"text": "c " * 3000}]}},
             "stopReason": "end_turn",
             "usage": {"inputTokens": 7, "outputTokens": 3002, "totalTokens": 3009},
             "metrics": {"latencyMs": 10}},
            (7, 3002),
        ),
        (OpenAIChat, orjson.loads(openai_answer(3, "d " * 3000, 3003)), (9, 3003)),
    ],
)  # fmt: skip
def test_each_apis_usage_is_read_from_the_tail_as_from_the_whole(fmt, answer, expected):
    body = orjson.dumps(answer)
    tail = body[-2048:]  # the texts cut mid-way, as a tail is
    usage = usage_in_tail(tail, fmt.completion_usage)
    whole = fmt.completion_usage(body)
    assert (usage.prompt_tokens, usage.completion_tokens) == expected
    assert (whole.prompt_tokens, whole.completion_tokens) == expected


def test_a_usage_key_inside_a_text_is_not_taken_for_the_answers():
    """Inside a JSON string every quote is escaped: the model writing `"usage":{...}`
    in its answer cannot set the figure."""
    fake = '"usage":{"prompt_tokens":1,"completion_tokens":1}'
    body = openai_answer(1, "x" * 3000 + fake, completion=777)
    usage = usage_in_tail(body[-4000:], OpenAIChat.completion_usage)
    assert usage.completion_tokens == 777
    only_fake = orjson.dumps({"choices": [{"message": {"content": fake}}]})
    assert usage_in_tail(only_fake, OpenAIChat.completion_usage) is None


def test_a_translated_answer_too_large_to_translate_is_refused_but_charged():
    from tests.test_exchange import body_msg, headers_msg
    from tests.test_exchange_translated import DOC, post, run_of

    run = run_of({**DOC, "streaming": {"max_json_response_bytes": LIMIT}})
    post(run, {"model": "my-claude", "messages": [{"role": "user", "content": "hi"}]})
    answer = {"id": "m", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
              "content": [{"type": "text", "text": "a " * 5000}], "stop_reason": "end_turn",
              "usage": {"input_tokens": 5, "output_tokens": 5000}}  # fmt: skip
    run.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    refused = run.send(body_msg(orjson.dumps(answer), end=True, response=True))
    assert refused.immediate_response.status.code == 502
    usage = run.ex.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 5000) and usage.reported
