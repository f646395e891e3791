"""Every streamed wire format end to end through the real Envoy (issue 6, "Tests"): the
mock provider replays each format in random chunkings, and for each one

- the tokens metered equal the provider's own figures (read from what the mock sent,
  parsed here independently of the gateway's decoders), and the right decoder counted;
- the client gets the provider's bytes exactly when no policy changes anything;
- a card number planted in the answer (one word per frame, then cut at random byte
  offsets) arrives masked and the stream still reads in that format's SDK;
- a blocked stream ends with that format's own error event and nothing after it.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import boto3
import httpx
import openai
import pytest
from botocore.eventstream import EventStreamBuffer
from google import genai
from google.genai import types as genai_types

from extproc.dev.devstack import Stack
from tests.conftest import DEV_API_KEY, metric, start_stack, wait_for

CARD = "4111 1111 1111 1111"
PLANTED = f"Your card {CARD} is on file."
MASKED = "Your card <CREDIT_CARD> is on file."
FORBIDDEN = "Sure, the launch code is here and many more words follow after it."

GUARDS = {
    "rules": [
        {"name": "cards", "detectors": ["credit_card"]},
        {
            "name": "forbidden-words",
            "action": "reject",
            "keywords": ["launch code"],
            "phases": ["response"],
        },
    ]
}


@dataclass(frozen=True)
class Fmt:
    id: str
    family: str  # how the stream is read here: chat, responses, anthropic, gemini, bedrock
    decoder: str  # the `decoder` label of ai_gateway_responses_decoded_total
    model: str  # as the gateway labels it

    @property
    def sse(self) -> bool:
        return self.id not in ("gemini_array", "bedrock")

    def request(self, prompt: str) -> tuple[str, dict[str, Any], dict[str, str]]:
        """(gateway path, JSON body, headers) of a streamed request."""
        user = [{"role": "user", "content": prompt}]
        gemini = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
        usage = {"include_usage": True}  # the client asks: the gateway changes nothing
        auth = {"authorization": f"Bearer {DEV_API_KEY}"}
        vertex = "/vertex/v1/projects/p/locations/us-central1/publishers/google/models/"
        return {
            "chat": ("/v1/chat/completions",
                     {"model": self.model, "stream": True, "stream_options": usage,
                      "messages": user}, auth),
            "responses": ("/v1/responses",
                          {"model": self.model, "input": prompt, "stream": True}, auth),
            "azure": (f"/azure/openai/deployments/{self.model}/chat/completions"
                      "?api-version=2024-10-21",
                      {"stream": True, "stream_options": usage, "messages": user}, {}),
            "anthropic": ("/anthropic/v1/messages",
                          {"model": self.model, "max_tokens": 256, "stream": True,
                           "messages": user}, {}),
            "gemini_sse": (f"/gemini/v1beta/models/{self.model}:streamGenerateContent?alt=sse",
                           gemini, {}),
            "gemini_array": (f"/gemini/v1beta/models/{self.model}:streamGenerateContent",
                             gemini, {}),
            "vertex": (f"{vertex}{self.model}:streamGenerateContent?alt=sse", gemini, {}),
            "bedrock": (f"/bedrock/model/{self.model.replace(':', '%3A')}/converse-stream",
                        {"messages": [{"role": "user", "content": [{"text": prompt}]}]}, {}),
        }[self.id]  # fmt: skip


FORMATS = [
    Fmt("chat", "chat", "openai_chat_sse", "gpt-4.1-mini"),
    Fmt("responses", "responses", "openai_responses_sse", "gpt-4o"),
    Fmt("azure", "chat", "openai_chat_sse", "e2e-azure-deployment"),
    Fmt("anthropic", "anthropic", "anthropic_sse", "claude-e2e-providers"),
    Fmt("gemini_sse", "gemini", "gemini_sse", "gemini-e2e-sse"),
    Fmt("gemini_array", "gemini", "gemini_json_stream", "gemini-e2e-array"),
    Fmt("vertex", "gemini", "gemini_sse", "gemini-e2e-vertex"),
    Fmt("bedrock", "bedrock", "bedrock_eventstream", "us.amazon.nova-e2e-v1:0"),
]
EACH = pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.id)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("providers-guards"), guards=GUARDS)
    try:
        yield stack
    finally:
        stack.stop()


# ------------------------------------------------------------------ talking to the stack


def post(stack: Stack, fmt: Fmt, prompt: str, **knobs: str) -> tuple[httpx.Response, bytes]:
    """One streamed request through Envoy: (client response, the bytes the provider sent)."""
    path, body, headers = fmt.request(prompt)
    rid = uuid.uuid4().hex
    headers = {**headers, "x-mock-request-id": rid, **knobs}
    r = httpx.post(f"{stack.base_url}{path}", json=body, headers=headers, timeout=30)
    return r, provider_sent(stack, rid)


def provider_sent(stack: Stack, rid: str) -> bytes:
    def fetch():
        r = httpx.get(f"{stack.mock_url}/_mock/exchanges/{rid}", timeout=5)
        return r.json() if r.status_code == 200 else None

    seen = wait_for(fetch)
    assert seen, f"the mock never saw request {rid}"
    return base64.b64decode(seen["sent_b64"])


def random_split(rng: random.Random, size: int) -> str:
    """`x-mock-split` offsets: 1 to 30 random cuts, sometimes single bytes apart."""
    cuts = set(rng.sample(range(1, size), min(size - 1, rng.randint(1, 30))))
    cuts |= {c + 1 for c in list(cuts)[:5] if c + 1 < size}
    return ",".join(map(str, sorted(cuts)))


# ------------------------------------------------------------------ reading each format
# Independent of the gateway's decoders: plain JSON, a minimal SSE reader, botocore's
# own event stream parser (which checks both CRCs).


def sse_events(body: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) per SSE event; the stream must end on an event boundary."""
    text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    assert text.endswith(b"\n\n"), f"stream ends mid-event: {body[-80:]!r}"
    events = []
    for block in text.split(b"\n\n"):
        name, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
        if name is not None or data:
            events.append((name, b"\n".join(data)))
    return events


def eventstream(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """(headers, payload) per event stream message; every byte belongs to a valid one."""
    messages, at = [], 0
    while at < len(body):
        end = at + int.from_bytes(body[at : at + 4], "big")
        assert at + 16 <= end <= len(body), f"truncated message at byte {at}"
        buffer = EventStreamBuffer()  # botocore checks both CRCs
        buffer.add_data(body[at:end])
        (message,) = list(buffer)
        messages.append((message.headers, message.payload))
        at = end
    return messages


def events(fmt: Fmt, body: bytes) -> list[tuple[str | None, Any]]:
    """The stream as (kind, JSON object): the SSE event name, Bedrock's event or
    exception type, None for unnamed ones; OpenAI's `[DONE]` as ("[DONE]", None)."""
    if fmt.id == "gemini_array":
        return [(None, element) for element in json.loads(body)]  # one valid JSON array
    if fmt.id == "bedrock":
        out = []
        for headers, payload in eventstream(body):
            kind = headers.get(":event-type") or headers.get(":exception-type")
            if headers.get(":message-type") == "exception":
                kind = f"exception:{kind}"
            out.append((kind, json.loads(payload)))
        return out
    return [
        ("[DONE]", None) if data == b"[DONE]" else (name, json.loads(data))
        for name, data in sse_events(body)
    ]


def answer_text(fmt: Fmt, evs: list[tuple[str | None, Any]]) -> str:
    out = []
    for kind, obj in evs:
        if fmt.family == "chat" and obj and not obj.get("error"):
            out += [c["delta"].get("content") or "" for c in obj.get("choices") or ()]
        elif fmt.family == "responses" and kind == "response.output_text.delta":
            out.append(obj["delta"])
        elif fmt.family == "anthropic" and kind == "content_block_delta":
            out.append(obj["delta"].get("text", ""))
        elif fmt.family == "gemini" and "candidates" in obj:
            out += [p.get("text", "") for p in obj["candidates"][0]["content"]["parts"]]
        elif fmt.family == "bedrock" and kind == "contentBlockDelta":
            out.append(obj["delta"].get("text", ""))
    return "".join(out)


def provider_usage(fmt: Fmt, evs: list[tuple[str | None, Any]]) -> dict[str, int]:
    """The provider's own figures, as prompt / completion / cached / reasoning tokens."""
    if fmt.family == "chat":
        u = next(obj["usage"] for _, obj in evs if obj and obj.get("usage"))
        return {"prompt": u["prompt_tokens"], "completion": u["completion_tokens"],
                "cached": u["prompt_tokens_details"]["cached_tokens"],
                "reasoning": u["completion_tokens_details"]["reasoning_tokens"]}  # fmt: skip
    if fmt.family == "responses":
        u = next(o["response"]["usage"] for k, o in evs if k == "response.completed")
        return {"prompt": u["input_tokens"], "completion": u["output_tokens"],
                "cached": u["input_tokens_details"]["cached_tokens"],
                "reasoning": u["output_tokens_details"]["reasoning_tokens"]}  # fmt: skip
    if fmt.family == "anthropic":
        u = dict(next(o["message"]["usage"] for k, o in evs if k == "message_start"))
        u.update(next(o["usage"] for k, o in evs if k == "message_delta"))  # set, not added
        cached = u["cache_read_input_tokens"]
        prompt = u["input_tokens"] + u["cache_creation_input_tokens"] + cached
        return {"prompt": prompt, "completion": u["output_tokens"], "cached": cached,
                "reasoning": 0}  # fmt: skip
    if fmt.family == "gemini":
        u = [o["usageMetadata"] for _, o in evs if "usageMetadata" in o][-1]
        thoughts = u.get("thoughtsTokenCount", 0)
        return {"prompt": u["promptTokenCount"],
                "completion": u["candidatesTokenCount"] + thoughts,
                "cached": u.get("cachedContentTokenCount", 0), "reasoning": thoughts}  # fmt: skip
    u = next(o["usage"] for k, o in evs if k == "metadata")
    cached = u.get("cacheReadInputTokens", 0)
    prompt = u["inputTokens"] + cached + u.get("cacheWriteInputTokens", 0)
    return {"prompt": prompt, "completion": u["outputTokens"], "cached": cached, "reasoning": 0}


def is_error_event(fmt: Fmt, kind: str | None, obj: Any) -> bool:
    if fmt.family == "bedrock":
        return (kind or "").startswith("exception:")
    if fmt.family in ("responses", "anthropic"):
        return kind == "error" and obj["type"] == "error"
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict)


# ------------------------------------------------------------------ 1 + 5: usage, decoder


@EACH
def test_usage_metered_equals_the_providers_figures(stack, fmt):
    kinds = ("prompt", "completion", "cached", "reasoning")
    tokens = {k: metric(stack, "ai_gateway_tokens_total", model=fmt.model, kind=k) for k in kinds}
    decoded = metric(stack, "ai_gateway_responses_decoded_total", decoder=fmt.decoder)
    knobs = {"x-mock-tokens": "17", "x-mock-cached-tokens": "3", "x-mock-reasoning-tokens": "5"}
    r, sent = post(stack, fmt, f"usage of {fmt.id}, please", **knobs)
    assert r.status_code == 200
    expected = provider_usage(fmt, events(fmt, sent))
    assert expected["prompt"] > 0 and expected["completion"] >= 17 and expected["cached"] == 3

    assert wait_for(
        lambda: (
            {
                k: metric(stack, "ai_gateway_tokens_total", model=fmt.model, kind=k) - tokens[k]
                for k in kinds
            }
            == expected
        )
    ), "ai_gateway_tokens_total does not match the provider's usage"
    assert wait_for(
        lambda: (
            metric(stack, "ai_gateway_responses_decoded_total", decoder=fmt.decoder) == decoded + 1
        )
    ), f"{fmt.decoder} did not count the response"


# ------------------------------------------------------------------ 2: bytes untouched


@EACH
@pytest.mark.parametrize("seed", range(3))
def test_client_bytes_equal_provider_bytes_for_random_chunkings(stack, fmt, seed):
    rng = random.Random(f"{fmt.id}-{seed}")
    knobs = {"x-mock-tokens": str(rng.randint(1, 30))}
    if fmt.sse:
        knobs["x-mock-line-ending"] = rng.choice(["lf", "crlf", "cr"])
    prompt = f"chunking {fmt.id} {seed}"
    whole, sent = post(stack, fmt, prompt, **knobs)
    assert whole.status_code == 200 and whole.content == sent
    split, sent_again = post(
        stack, fmt, prompt, **knobs, **{"x-mock-split": random_split(rng, len(sent))}
    )
    assert sent_again == sent  # the same answer, only cut differently on the wire
    assert split.content == sent


# ------------------------------------------------------------------ 3: masking


def sdk_text(stack: Stack, fmt: Fmt, headers: dict[str, str]) -> str | None:
    """The answer as the format's own SDK reads it through the gateway (None: no SDK
    reads it over plain HTTP, the array form or Vertex's credentials; the stream parsed
    by the test is the check)."""
    base = stack.base_url
    if fmt.id in ("chat", "azure"):
        if fmt.id == "chat":
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=DEV_API_KEY, max_retries=0)
        else:
            client = openai.AzureOpenAI(azure_endpoint=f"{base}/azure", api_key="unused",
                                        api_version="2024-10-21", max_retries=0)  # fmt: skip
        chunks = list(client.chat.completions.create(
            model=fmt.model, messages=[{"role": "user", "content": "card?"}], stream=True,
            stream_options={"include_usage": True}, extra_headers=headers,
        ))  # fmt: skip
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if fmt.id == "responses":
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=DEV_API_KEY, max_retries=0)
        evs = list(client.responses.create(model=fmt.model, input="card?", stream=True,
                                           extra_headers=headers))  # fmt: skip
        assert evs[-1].type == "response.completed"
        assert evs[-1].response.output_text == MASKED
        return "".join(e.delta for e in evs if e.type == "response.output_text.delta")
    if fmt.id == "anthropic":
        client = anthropic.Anthropic(base_url=f"{base}/anthropic", api_key="unused",
                                     max_retries=0)  # fmt: skip
        with client.messages.stream(
            model=fmt.model,
            max_tokens=256,
            extra_headers=headers,
            messages=[{"role": "user", "content": "card?"}],
        ) as stream:
            final = stream.get_final_message()
        assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
        return "".join(block.text for block in final.content)
    if fmt.id == "gemini_sse":
        client = genai.Client(
            api_key="unused",
            http_options=genai_types.HttpOptions(base_url=f"{base}/gemini", headers=headers),
        )
        chunks = list(client.models.generate_content_stream(model=fmt.model, contents="card?"))
        assert chunks[-1].usage_metadata.candidates_token_count > 0
        return "".join(c.text or "" for c in chunks)
    if fmt.id == "bedrock":
        client = boto3.client(
            "bedrock-runtime", region_name="us-east-1", endpoint_url=f"{base}/bedrock",
            aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="unused",
        )  # fmt: skip
        client.meta.events.register(
            "before-send.bedrock-runtime.*", lambda request, **_: request.headers.update(headers)
        )
        answer = client.converse_stream(
            modelId=fmt.model, messages=[{"role": "user", "content": [{"text": "card?"}]}]
        )
        evs = list(answer["stream"])
        assert evs[-1]["metadata"]["usage"]["outputTokens"] > 0
        return "".join(
            e["contentBlockDelta"]["delta"].get("text", "") for e in evs if "contentBlockDelta" in e
        )
    return None


@EACH
def test_planted_card_arrives_masked(guarded, fmt):
    rng = random.Random(f"mask-{fmt.id}")
    r, sent = post(guarded, fmt, "what card do I have?", **{"x-mock-text": PLANTED})
    assert r.status_code == 200 and b"4111" in sent
    if fmt.family != "responses":  # (Responses repeats the whole text in its .done events)
        assert CARD.encode() not in sent  # the provider spread the number over frames
    split = {"x-mock-text": PLANTED, "x-mock-split": random_split(rng, len(sent))}
    r_split, _ = post(guarded, fmt, "what card do I have?", **split)
    for client_bytes in (r.content, r_split.content):
        assert b"4111" not in client_bytes and b"1111" not in client_bytes
        evs = events(fmt, client_bytes)  # still a well-formed stream of this format
        assert answer_text(fmt, evs) == MASKED
        assert provider_usage(fmt, evs)["completion"] > 0  # the usage frame survived
        assert not any(is_error_event(fmt, kind, obj) for kind, obj in evs)
    assert sdk_text(guarded, fmt, split) in (MASKED, None)


# ------------------------------------------------------------------ 4: blocked streams


@EACH
def test_blocked_stream_ends_with_the_formats_own_error_event(guarded, fmt):
    rng = random.Random(f"block-{fmt.id}")
    probe, sent = post(guarded, fmt, "tell me", **{"x-mock-text": FORBIDDEN})
    assert b"launch" in sent and b" code" in sent  # the provider did say it
    split = {"x-mock-text": FORBIDDEN, "x-mock-split": random_split(rng, len(sent))}
    r, _ = post(guarded, fmt, "tell me", **split)
    for client_bytes in (probe.content, r.content):
        assert b"launch" not in client_bytes and b"follow" not in client_bytes
        evs = events(fmt, client_bytes)  # parses whole: valid SSE, JSON array, CRCs
        if fmt.family == "chat":  # the error chunk, then [DONE], then nothing
            assert evs[-1] == ("[DONE]", None) and evs.count(("[DONE]", None)) == 1
            evs = evs[:-1]
        kind, obj = evs[-1]
        assert is_error_event(fmt, kind, obj), f"last event is not an error: {evs[-1]}"
        assert "forbidden-words" in json.dumps(obj)
        assert not any(is_error_event(fmt, k, o) for k, o in evs[:-1])
        assert FORBIDDEN.startswith(answer_text(fmt, evs[:-1]))  # what came before, intact
        if fmt.id == "gemini_array":
            assert client_bytes.rstrip().endswith(b"]")
    assert wait_for(lambda: metric(guarded, "ai_gateway_active_streams") == 0)
