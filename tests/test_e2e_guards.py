"""Guards end to end through the real Envoy, with curl, httpx and the openai SDK: text
planted in the mock provider's answer (`x-mock-text`, streamed word by word, so a card
number spans several frames) arrives masked, a secret ends the stream with an error
event the SDK raises on, requests are masked before the provider sees them or refused
with 403 naming the guard, and the first frame does not wait for the last."""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from extproc.dev.devstack import Stack
from tests.conftest import metric, mock_exchange, sse_payloads, start_stack, wait_for

KEY = "my-secret-key"  # the dev policy's consumer `my-app` (route v1 requires a key)
CARD = "4111 1111 1111 1111"
SECRET = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"

GUARDS = {
    "rules": [
        {"name": "pii", "detectors": ["credit_card", "email", "us_ssn"]},
        {"name": "no-secrets", "action": "reject", "detectors": ["api_key", "aws_access_key"]},
        {
            "name": "my-app-words",
            "action": "reject",
            "keywords": ["codename zephyr"],
            "consumers": ["my-app"],
            "phases": ["request"],
        },
    ]
}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("guards"), guards=GUARDS)
    try:
        yield stack
    finally:
        stack.stop()


def content(body: bytes) -> str:
    text = []
    for p in sse_payloads(body):
        if p.startswith(b"{"):
            for choice in orjson.loads(p).get("choices") or ():
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


def chat(text: str, **extra) -> dict:
    return {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=KEY, max_retries=0)


def test_card_split_across_frames_arrives_masked_with_curl(guarded):
    rid = uuid.uuid4().hex
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"{guarded.base_url}/openai",
            "-H",
            "content-type: application/json",
            "-H",
            f"x-mock-request-id: {rid}",
            "-H",
            f"x-mock-text: Your card {CARD} is on file.",
            "-d",
            json.dumps(chat("What card do I have?")),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    sent = base64.b64decode(mock_exchange(guarded, rid)["sent_b64"])
    # The provider really split it: no single frame carries the whole number.
    assert CARD not in sent.decode() and sum(b"1111" in p for p in sse_payloads(sent)) == 3
    assert content(out) == "Your card <CREDIT_CARD> is on file."
    assert b"4111" not in out and b"1111" not in out
    assert sse_payloads(out)[-1] == b"[DONE]"
    # Same frames as the provider sent (the gateway's usage chunk aside).
    assert len(sse_payloads(out)) == len(
        [p for p in sse_payloads(sent) if b'"choices":[]' not in p]
    )


def test_card_cut_inside_frames_by_the_network_is_masked(guarded):
    rid = uuid.uuid4().hex
    body = chat("x", stream_options={"include_usage": True})
    headers = {"x-mock-text": f"pay with {CARD} today", "x-mock-request-id": rid}
    probe = httpx.post(f"{guarded.base_url}/openai", json=body, headers=headers, timeout=30)
    size = len(base64.b64decode(mock_exchange(guarded, rid)["sent_b64"]))
    rid2 = uuid.uuid4().hex
    headers.update(
        {"x-mock-request-id": rid2, "x-mock-split": ",".join(str(i) for i in range(7, size, 13))}
    )
    r = httpx.post(f"{guarded.base_url}/openai", json=body, headers=headers, timeout=30)
    assert content(r.content) == content(probe.content) == "pay with <CREDIT_CARD> today"
    assert b'"usage":{' in r.content  # asked for, still there, still metered


def test_openai_sdk_stream_is_masked(guarded):
    stream = sdk(guarded).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "contact?"}],
        stream=True,
        extra_headers={"x-mock-text": "Write to jane.roe@example.org or call."},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Write to <EMAIL> or call."


def test_blocked_stream_ends_with_error_event_and_sdk_raises(guarded):
    headers = {"x-mock-text": f"Sure, the key is {SECRET} and more words follow here."}
    r = httpx.post(f"{guarded.base_url}/openai", json=chat("key?"), headers=headers, timeout=30)
    assert r.status_code == 200  # the stream had started: it ends cleanly instead
    assert SECRET.encode() not in r.content and b"abcdefghij" not in r.content
    events = sse_payloads(r.content)
    assert events[-1] == b"[DONE]" and events.count(b"[DONE]") == 1
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == "guard_blocked" and "no-secrets" in error["message"]

    stream = sdk(guarded).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "key?"}],
        stream=True,
        extra_headers=headers,
        timeout=30,
    )
    with pytest.raises(openai.APIError, match="no-secrets"):
        for _ in stream:
            pass
    assert wait_for(lambda: metric(guarded, "ai_gateway_errors_total", kind="guard_blocked") >= 2)
    assert wait_for(lambda: metric(guarded, "ai_gateway_active_streams") == 0)


def test_request_masking_is_what_the_provider_sees(guarded):
    rid = uuid.uuid4().hex
    r = httpx.post(
        f"{guarded.base_url}/openai",
        json=chat("My SSN is 123-45-6789 and mail a.b@example.com"),
        headers={"x-mock-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 200
    upstream = orjson.loads(base64.b64decode(mock_exchange(guarded, rid)["body_b64"]))
    assert upstream["messages"][0]["content"] == "My SSN is <US_SSN> and mail <EMAIL>"
    assert upstream["stream_options"] == {"include_usage": True}


def test_request_reject_is_403_naming_the_guard(guarded):
    rid = uuid.uuid4().hex
    r = httpx.post(
        f"{guarded.base_url}/openai",
        json=chat("use AKIAIOSFODNN7EXAMPLE please"),
        headers={"x-mock-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["code"] == "guard_blocked" and "no-secrets" in error["message"]
    assert "AKIA" not in r.text
    assert r.headers["x-ai-gateway-guard"] == "no-secrets"
    assert httpx.get(f"{guarded.mock_url}/_mock/exchanges/{rid}", timeout=5).status_code == 404
    with pytest.raises(openai.PermissionDeniedError, match="no-secrets"):
        sdk(guarded).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": SECRET}]
        )


def test_non_streaming_answer_is_masked(guarded):
    reply = sdk(guarded).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "card?"}],
        extra_headers={"x-mock-text": f"It is {CARD}."},
    )
    assert reply.choices[0].message.content == "It is <CREDIT_CARD>."
    assert reply.usage.completion_tokens > 0


def test_first_frame_reaches_the_client_while_the_provider_streams(guarded):
    """Guards hold back only what could still become a match: the client reads content
    frames one at a time as the provider writes them, not all at the end."""
    headers = {"x-mock-delay-ms": "150", "x-mock-tokens": "12"}
    reads: list[bytes] = []
    with httpx.stream(
        "POST", f"{guarded.base_url}/openai", json=chat("hi"), headers=headers, timeout=30
    ) as r:
        for piece in r.iter_raw():
            reads.append(piece)
    first_content = next(i for i, p in enumerate(reads) if b'"content":"' in p and b'""' not in p)
    done = next(i for i, p in enumerate(reads) if b"[DONE]" in p)
    assert first_content < done
    # Frames arrived spread over many reads (12 tokens, 150 ms apart), not in one burst.
    assert sum(b'"content":"' in p for p in reads[:done]) >= 6


def test_guard_findings_are_counted(guarded):
    httpx.post(
        f"{guarded.base_url}/openai",
        json=chat("x"),
        headers={"x-mock-text": "mail me at x@example.com"},
        timeout=30,
    )
    labels = {"guard": "pii", "phase": "response", "action": "mask", "type": "EMAIL"}
    assert wait_for(lambda: metric(guarded, "ai_gateway_guard_findings_total", **labels) >= 1)


def test_per_consumer_guard(guarded):
    """`my-app` (its key on route v1) may not say the words; anonymous callers may."""
    r = httpx.post(
        f"{guarded.base_url}/v1/chat/completions",
        json=chat("tell me about codename zephyr"),
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert r.status_code == 403 and "my-app-words" in r.json()["error"]["message"]
    # The same words on the open route (anonymous) go through.
    r = httpx.post(
        f"{guarded.base_url}/openai", json=chat("tell me about codename zephyr"), timeout=30
    )
    assert r.status_code == 200


def test_the_openai_sdk_asking_for_logprobs_under_a_response_guard_gets_a_400(guarded):
    """Log probabilities would repeat a masked card token by token."""
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(guarded).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "contact?"}],
            logprobs=True,
            top_logprobs=2,
        )
    assert refused.value.code == "logprobs_unguarded"
