"""End to end through the real Envoy: curl, httpx and the openai SDK against the dev
stack (mock provider + sidecar + Envoy as separate processes)."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import uuid

import openai
import orjson
import pytest

from tests.conftest import DEV_API_KEY, metric, mock_exchange, sse_payloads, wait_for

SEED = {
    "stream": True,
    "model": "gpt-3.5-turbo",
    "messages": [
        {
            "role": "user",
            "content": "In a couple words, tell me what I should call my first GitHub repo.",
        }
    ],
}


def expected_client_bytes(sent: bytes) -> bytes:
    """What the client asked for: the provider's stream minus the usage-only chunk that
    usage injection added (the `"usage":null` of the others stays, as OpenAI sends it)."""
    frames = [f + b"\n\n" for f in sent.split(b"\n\n") if f]
    keep = [f for f in frames if not (b'"choices":[]' in f and b'"usage":{' in f)]
    return b"".join(keep)


def test_seed_curl_streams_chunks_then_done(stack):
    """The README's curl, as written, against the Gloo-style /openai route."""
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"{stack.base_url}/openai",
            "-H",
            "content-type:application/json",
            "-d",
            json.dumps(SEED),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    payloads = sse_payloads(out)
    assert payloads[-1] == b"[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert len(chunks) >= 3
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip()
    # The client did not ask for usage, so it sees none (no usage chunk, no figure in
    # any chunk), yet the gateway metered it.
    assert all(c["choices"] and c.get("usage") is None for c in chunks)


def test_openai_sdk_streams_through_v1(stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    before = metric(stack, "ai_gateway_tokens_total", model="gpt-4o-mini", kind="completion")
    rid = uuid.uuid4().hex
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-request-id": rid},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    # The gateway's meter agrees with the provider's own figure.
    after = wait_for(
        lambda: (
            metric(stack, "ai_gateway_tokens_total", model="gpt-4o-mini", kind="completion")
            - before
            == usage.completion_tokens
        )
    )
    assert after


def test_openai_sdk_gets_same_stream_with_and_without_include_usage(stack):
    """Usage injection leaves the `"usage":null` of each chunk (as OpenAI sends it) and
    drops only the usage-only chunk: the SDK sees the same content either way, and no
    usage unless it asked, while the gateway meters the provider's exact figure."""
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Same twice"}]}
    with_usage = list(
        client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    )
    reported = with_usage[-1].usage
    assert reported is not None and not with_usage[-1].choices
    before = metric(stack, "ai_gateway_tokens_total", model="gpt-4o-mini", kind="completion")
    rid = uuid.uuid4().hex
    plain = list(
        client.chat.completions.create(**ask, stream=True, extra_headers={"x-mock-request-id": rid})
    )
    sent = base64.b64decode(mock_exchange(stack, rid)["sent_b64"])
    assert b'"choices":[],"usage":{' in sent  # the provider was asked for usage

    def content(chunks: list) -> list[tuple[str | None, str | None]]:
        return [
            (c.choices[0].delta.content, c.choices[0].finish_reason) for c in chunks if c.choices
        ]

    assert content(plain) == content(with_usage) and len(content(plain)) >= 3
    assert all(c.choices and c.usage is None for c in plain)
    assert wait_for(
        lambda: (
            metric(stack, "ai_gateway_tokens_total", model="gpt-4o-mini", kind="completion")
            - before
            == reported.completion_tokens
        )
    )


def test_non_streaming_returns_json_completion(stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hi"}],
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_usage_is_added_upstream_and_hidden_from_client(stack, client):
    rid = uuid.uuid4().hex
    before = metric(stack, "ai_gateway_tokens_total", model="gpt-3.5-turbo", kind="completion")
    r = client.post("/v1/chat/completions", json=SEED, headers={"x-mock-request-id": rid})
    assert r.status_code == 200
    seen = mock_exchange(stack, rid)
    upstream = orjson.loads(base64.b64decode(seen["body_b64"]))
    assert upstream["stream_options"] == {"include_usage": True}
    sent = base64.b64decode(seen["sent_b64"])
    assert r.content == expected_client_bytes(sent)
    usage = orjson.loads(next(p for p in sse_payloads(sent) if b'"usage":{' in p))["usage"]
    assert wait_for(
        lambda: (
            metric(stack, "ai_gateway_tokens_total", model="gpt-3.5-turbo", kind="completion")
            - before
            == usage["completion_tokens"]
        )
    )


@pytest.mark.parametrize("seed", range(12))
def test_client_bytes_equal_provider_bytes_for_random_chunkings(stack, client, seed):
    """No policy changes anything: the client gets the provider's bytes exactly."""
    rng = random.Random(seed)
    ending = rng.choice(["lf", "crlf", "cr"])
    body = {
        **SEED,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"chunking test {seed}"}],
    }
    # Learn the stream's length first, then cut it at random places.
    probe_id = uuid.uuid4().hex
    client.post(
        "/v1/chat/completions",
        json=body,
        headers={"x-mock-request-id": probe_id, "x-mock-line-ending": ending},
    )
    size = len(base64.b64decode(mock_exchange(stack, probe_id)["sent_b64"]))
    cuts = sorted(rng.sample(range(1, size), min(size - 1, rng.randint(1, 25))))
    rid = uuid.uuid4().hex
    r = client.post(
        "/v1/chat/completions",
        json=body,
        headers={
            "x-mock-request-id": rid,
            "x-mock-line-ending": ending,
            "x-mock-split": ",".join(map(str, cuts)),
        },
    )
    sent = base64.b64decode(mock_exchange(stack, rid)["sent_b64"])
    assert r.content == sent


def test_split_frames_without_client_usage_still_match(stack, client):
    rid = uuid.uuid4().hex
    r = client.post(
        "/v1/chat/completions",
        json=SEED,
        headers={
            "x-mock-request-id": rid,
            "x-mock-split": ",".join(str(i) for i in range(3, 900, 7)),
        },
    )
    sent = base64.b64decode(mock_exchange(stack, rid)["sent_b64"])
    assert r.content == expected_client_bytes(sent)


def test_gzip_provider_does_not_blind_inspection(stack, client):
    rid = uuid.uuid4().hex
    before = metric(stack, "ai_gateway_usage_estimated_total")
    r = client.post(
        "/v1/chat/completions", json=SEED, headers={"x-mock-request-id": rid, "x-mock-gzip": "1"}
    )
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    sent = base64.b64decode(mock_exchange(stack, rid)["sent_b64"])
    assert r.content == expected_client_bytes(sent)
    assert metric(stack, "ai_gateway_usage_estimated_total") == before


def test_provider_without_usage_is_estimated(stack, client):
    before = metric(stack, "ai_gateway_usage_estimated_total", model="gpt-3.5-turbo")
    r = client.post("/v1/chat/completions", json=SEED, headers={"x-mock-no-usage": "1"})
    assert r.status_code == 200 and sse_payloads(r.content)[-1] == b"[DONE]"
    assert wait_for(
        lambda: (
            metric(stack, "ai_gateway_usage_estimated_total", model="gpt-3.5-turbo") == before + 1
        )
    )


def test_access_log_carries_sidecar_metadata(stack, client):
    rid = uuid.uuid4().hex
    client.post(
        "/v1/chat/completions",
        json={**SEED, "model": "gpt-4o-mini"},
        headers={"x-mock-request-id": rid, "x-request-id": rid},
    )
    sent = base64.b64decode(mock_exchange(stack, rid)["sent_b64"])
    usage = orjson.loads(next(p for p in sse_payloads(sent) if b'"usage":{' in p))["usage"]

    def entry():
        for line in (stack.workdir / "access.log").read_text().splitlines():
            if rid in line:
                return json.loads(line)
        return None

    found = wait_for(entry)
    assert found, "no access log line for the request"
    # The fields themselves: a number somewhere in the line (a timestamp, an id) proves
    # nothing.
    assert found["model"] == "gpt-4o-mini" and found["route"] == "v1"
    assert found["consumer"] == "my-app" and found["usage_estimated"] is False
    assert (found["prompt_tokens"], found["completion_tokens"], found["total_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
    )


def test_mock_sees_gateway_headers_not_internal_state(stack, client):
    rid = uuid.uuid4().hex
    client.post("/v1/chat/completions", json=SEED, headers={"x-mock-request-id": rid})
    seen = mock_exchange(stack, rid)
    assert seen["headers"].get("accept-encoding") == "identity"
