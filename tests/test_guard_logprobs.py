"""Log probabilities repeat the answer's tokens (`logprobs.content[].token`, a card
number token by token) where a response guard, which masks the text, does not look:
on a route with a response guard a request that asks for them is refused, in each
API's spelling; elsewhere it passes."""

from __future__ import annotations

import orjson
import pytest

from extproc.config import parse_config
from extproc.policy import Shared, build_policy
from tests.test_exchange import CHAT, Run


def run_with(phases: list[str]) -> Run:
    doc = {
        "providers": {"mock": {"url": "http://127.0.0.1:1"}},
        "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
        "guards": {"rules": [{"name": "pii", "detectors": ["credit_card"], "phases": phases}]},
    }
    config = parse_config(doc, "t.yaml")
    run = Run(config)
    run.ex.policy = build_policy(config, Shared(), {})
    return run


ASKS = [
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "top_logprobs": 5}, "top_logprobs"),
    (
        "/v1/responses",
        {"model": "gpt-4o", "input": "hi", "include": ["message.output_text.logprobs"]},
        "include",
    ),
    (
        "/v1beta/models/gemini-2.0-flash:generateContent",
        {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"responseLogprobs": True}},
        "generationConfig.responseLogprobs",
    ),
    (
        "/v1beta/models/gemini-2.0-flash:generateContent",
        {"contents": [{"parts": [{"text": "hi"}]}], "generation_config": {"logprobs": 3}},
        "generation_config.logprobs",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), ASKS)
def test_asking_for_logprobs_under_a_response_guard_is_a_400(path, body, param):
    run = run_with(["request", "response"])
    _, answer = run.request(body, path=path)
    assert answer.WhichOneof("response") == "immediate_response", answer
    assert answer.immediate_response.status.code == 400
    error = orjson.loads(answer.immediate_response.body)["error"]
    if "details" in error:  # Gemini's google.rpc.Status: the code in ErrorInfo
        assert error["details"][0]["reason"] == "logprobs_unguarded"
        assert param in error["message"]
    else:
        assert (error["code"], error["param"]) == ("logprobs_unguarded", param)


@pytest.mark.parametrize(
    "body", [CHAT, {**CHAT, "logprobs": False}, {**CHAT, "logprobs": False, "top_logprobs": 0}]
)
def test_a_request_that_does_not_ask_passes(body):
    _, answer = run_with(["request", "response"]).request(body)
    assert answer.WhichOneof("response") == "request_body"


def test_without_a_response_guard_logprobs_pass():
    _, answer = run_with(["request"]).request({**CHAT, "logprobs": True, "top_logprobs": 3})
    assert answer.WhichOneof("response") == "request_body"
