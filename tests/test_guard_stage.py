"""Guards as a policy stage, driven through the exchange with the real OpenAI decoder:
requests masked or refused before the provider sees them, streams masked or ended in
flight, whole JSON answers checked, per route and per consumer, usage untouched."""

from __future__ import annotations

import random
from dataclasses import replace

import orjson
import pytest

from extproc.config import (
    GuardConfig,
    GuardPatternConfig,
    GuardRejectConfig,
    GuardsConfig,
)
from extproc.policy import Policy, RequestContext, Shared, Stage
from extproc.policy import guards as guards_module
from extproc.policy.guards import detectors as det
from tests.test_exchange import CHAT, CONFIG, Run, body_msg, chunk, headers_msg, metadata

PII = GuardConfig(name="pii", detectors=tuple(det.expand(["pii", "secrets"])))


class Consumer(Stage):
    """Stands in for auth: the consumer is named by a header."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        ctx.consumer = ctx.headers.get("x-consumer", "")


def guarded(*rules: GuardConfig) -> Run:
    run = Run()
    shared = Shared(run.metrics)
    config = replace(CONFIG, guards=GuardsConfig(rules=rules))
    stage = guards_module.build(config, shared, {})
    assert stage is not None
    run.ex.policy = Policy(config, stages=(Consumer(), stage))
    return run


def content_frames(texts: list[str], *, usage: bool = True) -> list[bytes]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    extra = {"usage": None} if usage else {}
    frames = [
        chunk(
            {
                **base,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                **extra,
            }
        )
    ]
    for text in texts:
        frames.append(
            chunk(
                {
                    **base,
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                    **extra,
                }
            )
        )
    frames.append(
        chunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **extra})
    )
    if usage:
        frames.append(
            chunk(
                {
                    **base,
                    "choices": [],
                    "usage": {"prompt_tokens": 5, "completion_tokens": len(texts)},
                }
            )
        )
    frames.append(b"data: [DONE]\n\n")
    return frames


def client_text(body: bytes) -> str:
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            obj = orjson.loads(line[6:])
            for choice in obj.get("choices") or ():
                out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


def split_anywhere(frames: list[bytes], rng: random.Random) -> list[bytes]:
    body = b"".join(frames)
    points = sorted(rng.sample(range(1, len(body)), rng.randint(1, 30)))
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]


# --------------------------------------------------------------------------- streams


def test_card_split_across_frames_is_masked_and_usage_still_metered():
    run = guarded(PII)
    run.request({**CHAT, "stream": True})
    client = run.respond(content_frames(["Your card", " 4111 1111", " 1111 1111", " is on file."]))
    assert client_text(client) == "Your card <CREDIT_CARD> is on file."
    assert b"4111" not in client
    assert client.endswith(b"data: [DONE]\n\n")
    md = metadata(run.last)
    assert md["completion_tokens"] == 4 and md["guard_masked"] == 1
    labels = {"guard": "pii", "phase": "response", "action": "mask", "type": "CREDIT_CARD"}
    assert run.metric("ai_gateway_guard_findings_total", labels) == 1


@pytest.mark.parametrize("seed", range(25))
def test_masking_survives_any_chunking(seed):
    rng = random.Random(seed)
    texts = ["Mail", " jane", ".roe", "@exam", "ple.org", " or call", " +1 (415)", " 555-2671", "."]
    run = guarded(PII)
    run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    client = run.respond(split_anywhere(content_frames(texts), rng))
    assert client_text(client) == "Mail <EMAIL> or call <PHONE>."
    assert client.count(b"data: ") == len(content_frames(texts))  # same frames
    assert b'"usage":{' in client  # the client asked for usage: it gets it


@pytest.mark.parametrize("seed", range(10))
def test_unicode_card_in_a_stream_is_masked_whatever_the_chunking(seed):
    """Full-width digits, a zero-width space and an NBSP arriving in later frames: the
    real decoder's text goes through the normalised view, cut anywhere on the wire."""
    rng = random.Random(seed)
    texts = ["Card", " \uff14\uff11\uff11\uff11", "\u200b 1111", "\u00a01111 ", "1111", " ok."]
    run = guarded(PII)
    run.request({**CHAT, "stream": True})
    client = run.respond(split_anywhere(content_frames(texts), rng))
    assert client_text(client) == "Card <CREDIT_CARD> ok."
    assert "\uff11".encode() not in client and b"1111" not in client
    assert metadata(run.last)["guard_masked"] == 1


def test_untouched_frames_pass_byte_for_byte():
    run = guarded(PII)
    run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    frames = content_frames(["Hello", " there,", " friend."])
    assert run.respond(frames) == b"".join(frames)


def test_reject_guard_ends_stream_with_error_event_and_done():
    run = guarded(PII, GuardConfig(name="no-secrets", action="reject", detectors=("api_key",)))
    run.request({**CHAT, "stream": True})
    texts = ["Sure,", " here:", " sk-proj-", "abcdefghijklmnopqrstuvwxyz", " enjoy"]
    client = run.respond(content_frames(texts))
    assert b"sk-proj" not in client
    errors = [orjson.loads(line[6:]) for line in client.split(b"\n") if b'"error"' in line]
    assert errors[0]["error"]["code"] == "guard_blocked"
    assert "no-secrets" in errors[0]["error"]["message"]
    assert client.endswith(b"data: [DONE]\n\n") and client.count(b"[DONE]") == 1
    assert client_text(client) == "Sure, here:"  # decided before the key arrived
    assert metadata(run.last)["guard_blocked"] == "no-secrets"
    assert run.metric("ai_gateway_errors_total", {"kind": "guard_blocked"}) == 1
    assert run.metric("ai_gateway_active_streams") == 0


def test_log_guard_changes_nothing_but_counts():
    run = guarded(GuardConfig(name="watch", action="log", detectors=("email",)))
    run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    frames = content_frames(["write", " to a@example.com", " today"])
    assert run.respond(frames) == b"".join(frames)
    labels = {"guard": "watch", "phase": "response", "action": "log", "type": "EMAIL"}
    assert run.metric("ai_gateway_guard_findings_total", labels) == 1


# --------------------------------------------------------------------------- requests


def test_request_masking_reaches_upstream_with_usage_injection():
    run = guarded(
        replace(
            PII,
            patterns=(GuardPatternConfig(name="employee-id", regex=r"EMP-\d{6}"),),
            keywords=("project falcon",),
        )
    )
    body = {
        **CHAT,
        "stream": True,
        "messages": [
            {"role": "system", "content": "Employee EMP-004217 on Project Falcon."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "My SSN is 123-45-6789, card 4111111111111111"}
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "t1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"email":"a@example.com"}'},
                    }
                ],
            },
        ],
    }
    _, r2 = run.request(body)
    upstream = orjson.loads(r2.request_body.response.body_mutation.body)
    messages = upstream["messages"]
    assert messages[0]["content"] == "Employee <EMPLOYEE_ID> on <KEYWORD>."
    assert messages[1]["content"][0]["text"] == "My SSN is <US_SSN>, card <CREDIT_CARD>"
    args = messages[2]["tool_calls"][0]["function"]["arguments"]
    assert orjson.loads(args) == {"email": "<EMAIL>"}
    assert upstream["stream_options"] == {"include_usage": True}


def test_request_card_split_across_messages_in_unicode_is_masked():
    run = guarded(PII)
    body = {
        **CHAT,
        "user": "\uff14\uff11\uff11\uff11 1111 1111 1111",
        "messages": [
            {"role": "user", "content": "card \uff14\uff11\uff11\uff11 1111"},
            {"role": "user", "content": "\u200b 1111 1111, thanks"},
        ],
    }
    _, r2 = run.request(body)
    upstream = orjson.loads(r2.request_body.response.body_mutation.body)
    assert [m["content"] for m in upstream["messages"]] == ["card <CREDIT_CARD>", ", thanks"]
    assert upstream["user"] == "<CREDIT_CARD>"
    labels = {"guard": "pii", "phase": "request", "action": "mask", "type": "CREDIT_CARD"}
    assert run.metric("ai_gateway_guard_findings_total", labels) == 2


def test_request_reject_is_403_naming_the_guard_not_the_text():
    run = guarded(GuardConfig(name="no-cards", action="reject", detectors=("credit_card",)))
    _, r2 = run.request({**CHAT, "messages": [{"role": "user", "content": "4111 1111 1111 1111"}]})
    imm = r2.immediate_response
    assert imm.status.code == 403
    error = orjson.loads(imm.body)["error"]
    assert error["code"] == "guard_blocked" and "no-cards" in error["message"]
    assert b"4111" not in imm.body
    headers = {h.header.key: h.header.raw_value for h in imm.headers.set_headers}
    assert headers["x-ai-gateway-guard"] == b"no-cards"


def test_reject_status_message_code_are_configurable():
    reject = GuardRejectConfig(status=422, message="No personal data, please.", code="pii")
    run = guarded(GuardConfig(name="g", action="reject", detectors=("email",), reject=reject))
    _, r2 = run.request({**CHAT, "messages": [{"role": "user", "content": "a@example.com"}]})
    assert r2.immediate_response.status.code == 422
    error = orjson.loads(r2.immediate_response.body)["error"]
    assert (error["message"], error["code"]) == ("No personal data, please.", "pii")


def test_per_route_and_per_consumer():
    rule = GuardConfig(name="g", action="reject", detectors=("email",), routes=("v1",))
    email = {**CHAT, "messages": [{"role": "user", "content": "a@example.com"}]}
    run = guarded(rule)
    assert run.request(email, path="/openai", route="openai")[1].WhichOneof("response") == (
        "request_body"
    )
    run = guarded(rule)
    assert run.request(email)[1].HasField("immediate_response")

    def as_consumer(consumer: str, rule: GuardConfig):
        run = guarded(rule)
        run.send(
            headers_msg(
                {":method": "POST", ":path": "/v1/chat/completions", "x-consumer": consumer},
                route="v1",
            )
        )
        return run.send(body_msg(orjson.dumps(email)))

    only = replace(rule, consumers=("team-a",))
    assert as_consumer("team-a", only).HasField("immediate_response")
    assert not as_consumer("team-b", only).HasField("immediate_response")
    assert not as_consumer("", only).HasField("immediate_response")
    exempt = replace(rule, except_consumers=("team-a",))
    assert not as_consumer("team-a", exempt).HasField("immediate_response")
    assert as_consumer("team-b", exempt).HasField("immediate_response")


def test_request_phase_only_guard_leaves_responses_alone():
    run = guarded(replace(PII, phases=("request",)))
    run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    frames = content_frames(["mail a@example.com"])
    assert run.respond(frames) == b"".join(frames)


# --------------------------------------------------------------------------- JSON answers


def completion(text: str) -> bytes:
    return orjson.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }
    )


def test_json_answer_is_masked():
    run = guarded(PII)
    run.request(CHAT)
    client = run.respond(
        [completion("IBAN DE89 3704 0044 0532 0130 00.")], {"content-type": "application/json"}
    )
    assert orjson.loads(client)["choices"][0]["message"]["content"] == "IBAN <IBAN>."
    assert metadata(run.last)["completion_tokens"] == 4


def test_json_answer_is_refused():
    run = guarded(GuardConfig(name="keys", action="reject", detectors=("secrets",)))
    run.request(CHAT)
    run.send(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    last = run.send(body_msg(completion("key AKIAIOSFODNN7EXAMPLE"), response=True))
    assert last.immediate_response.status.code == 403
    assert b"AKIA" not in last.immediate_response.body
    assert b"keys" in last.immediate_response.body


def test_no_rules_no_stage():
    assert guards_module.build(CONFIG, Shared(), {}) is None
