"""Time to first token is the first content delta of a stream (not a role chunk, not a
whole JSON answer), and time per output token counts from there."""

from __future__ import annotations

import orjson

from tests.test_exchange import CHAT, Run, body_msg, headers_msg

SSE = {":status": "200", "content-type": "text/event-stream"}


def frame(delta: dict, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def samples(run: Run, name: str) -> dict[str, float]:
    """`_count` and `_sum` of a histogram, over all its labels."""
    out = {"count": 0.0, "sum": 0.0}
    for family in run.metrics.registry.collect():
        for sample in family.samples:
            for part in ("count", "sum"):
                if sample.name == f"{name}_{part}":
                    out[part] += sample.value
    return out


def test_ttft_is_the_first_content_delta_not_the_role_chunk():
    run = Run()
    run.request({**CHAT, "stream": True})
    run.send(headers_msg(SSE, response=True))
    role_at = run.t + 0.01
    run.send(body_msg(frame({"role": "assistant", "content": ""}), end=False, response=True))
    run.send(body_msg(frame({}), end=False, response=True))  # a keep-alive-like empty delta
    content_at = run.t + 0.01
    run.send(body_msg(frame({"content": "Hello"}), end=False, response=True))
    run.send(body_msg(frame({"content": " there"}), end=False, response=True))
    end_at = run.t + 0.01
    run.send(body_msg(frame({}, "stop") + b"data: [DONE]\n\n", end=True, response=True))
    ttft = samples(run, "ai_gateway_time_to_first_token_seconds")
    assert ttft["count"] == 1
    assert abs(ttft["sum"] - content_at) < 1e-9 and abs(ttft["sum"] - role_at) > 1e-3
    tpot = samples(run, "ai_gateway_time_per_output_token_seconds")
    assert tpot["count"] == 1  # (end - first content) / (tokens - 1), tokens estimated: 2
    assert abs(tpot["sum"] - (end_at - content_at)) < 1e-9


def test_a_tool_call_delta_is_a_first_token():
    run = Run()
    run.request({**CHAT, "stream": True})
    run.send(headers_msg(SSE, response=True))
    run.send(body_msg(frame({"role": "assistant"}), end=False, response=True))
    call_at = run.t + 0.01
    call = {
        "tool_calls": [{"index": 0, "id": "t1", "function": {"name": "f", "arguments": '{"a"'}}]
    }
    run.send(body_msg(frame(call), end=False, response=True))
    run.send(body_msg(frame({}, "tool_calls") + b"data: [DONE]\n\n", end=True, response=True))
    ttft = samples(run, "ai_gateway_time_to_first_token_seconds")
    assert ttft["count"] == 1 and abs(ttft["sum"] - call_at) < 1e-9


def test_a_whole_json_answer_has_no_time_to_first_token():
    run = Run()
    run.request(CHAT)
    run.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    answer = {
        "id": "c1",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }
    run.send(body_msg(orjson.dumps(answer), end=True, response=True))
    assert samples(run, "ai_gateway_time_to_first_token_seconds")["count"] == 0
    assert samples(run, "ai_gateway_time_per_output_token_seconds")["count"] == 0
    assert samples(run, "ai_gateway_stream_duration_seconds")["count"] == 1
