"""The mock provider must stream exactly like OpenAI and honour every test knob."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import signal
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from extproc.dev.mock import (
    MockOptions,
    build_completion,
    build_stream,
    count_prompt_tokens,
    create_app,
    gzip_pieces,
    recording,
    split_at,
)

SEED_PROMPT = "In a couple words, tell me what I should call my first GitHub repo."
REPO = Path(__file__).resolve().parents[1]


def chat(stream: bool = False, usage: bool = False, content: str = SEED_PROMPT, **extra: Any):
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
    }
    if stream:
        body["stream"] = True
    if usage:
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body


def frames_of(raw: bytes, ending: bytes = b"\n") -> list[bytes]:
    """Split a complete SSE body into its `data:` payloads, checking the framing."""
    sep = ending * 2
    assert raw.endswith(sep)
    events = raw[: -len(sep)].split(sep)
    for event in events:
        assert event.startswith(b"data: "), event
        assert ending not in event
    return [e[len(b"data: ") :] for e in events]


def chunks_of(raw: bytes, ending: bytes = b"\n") -> list[dict[str, Any]]:
    payloads = frames_of(raw, ending)
    assert payloads[-1] == b"[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


@pytest.fixture
async def url() -> AsyncIterator[str]:
    server = TestServer(create_app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        yield c


async def post(
    client: httpx.AsyncClient, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return await client.post("/v1/chat/completions", content=data, headers=headers)


async def exchange(client: httpx.AsyncClient, key: str) -> dict[str, Any]:
    r = await client.get(f"/_mock/exchanges/{key}")
    assert r.status_code == 200
    return r.json()


# ---------------------------------------------------------------- stream shape


async def test_stream_with_usage_has_openai_shape(client: httpx.AsyncClient) -> None:
    r = await post(client, chat(stream=True, usage=True))
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert r.headers["transfer-encoding"] == "chunked"
    raw = r.content
    # Compact JSON, OpenAI's key order.
    assert raw.startswith(b'data: {"id":"chatcmpl-')
    assert b'"object":"chat.completion.chunk","created":' in raw
    chunks = chunks_of(raw)
    for c in chunks:
        assert list(c) == [
            "id", "object", "created", "model", "system_fingerprint", "choices", "usage",
        ]  # fmt: skip
        assert c["id"] == chunks[0]["id"] and c["created"] == chunks[0]["created"]
    first, *tokens, finish, usage = chunks
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert len(tokens) == 12
    for c in tokens:
        (choice,) = c["choices"]
        assert list(choice["delta"]) == ["content"] and choice["finish_reason"] is None
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert usage["choices"] == []
    u = usage["usage"]
    assert u["completion_tokens"] == len(tokens)
    assert u["prompt_tokens"] == count_prompt_tokens(chat())
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert u["completion_tokens_details"] == {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }
    text = "".join(c["choices"][0]["delta"]["content"] for c in tokens)
    assert "hello-world" in text


async def test_stream_without_include_usage_has_no_usage_key(client: httpx.AsyncClient) -> None:
    r = await post(client, chat(stream=True))
    chunks = chunks_of(r.content)
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_no_usage_knob_ignores_include_usage(client: httpx.AsyncClient) -> None:
    r = await post(client, chat(stream=True, usage=True), {"x-mock-no-usage": "1"})
    chunks = chunks_of(r.content)
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)
    r = await post(client, chat(), {"x-mock-no-usage": "1"})
    assert "usage" not in r.json()


async def test_non_stream_matches_stream_content(client: httpx.AsyncClient) -> None:
    r = await post(client, chat())
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == [
        "id", "object", "created", "model", "choices", "usage", "system_fingerprint",
    ]  # fmt: skip
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["refusal"] is None
    assert choice["logprobs"] is None and choice["finish_reason"] == "stop"
    streamed = chunks_of((await post(client, chat(stream=True))).content)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed)
    assert choice["message"]["content"] == text
    assert body["usage"]["completion_tokens"] == len(streamed) - 2


async def test_same_request_gives_same_bytes(client: httpx.AsyncClient) -> None:
    a = await post(client, chat(stream=True, usage=True))
    b = await post(client, chat(stream=True, usage=True))
    c = await post(client, chat(stream=True, usage=True, content="something else"))
    assert a.content == b.content
    assert chunks_of(a.content)[0]["id"] != chunks_of(c.content)[0]["id"]
    assert b"".join(build_stream(chat(stream=True, usage=True))) == a.content


# ---------------------------------------------------------------- token knobs


async def test_tokens_knob_and_max_tokens_length(client: httpx.AsyncClient) -> None:
    other = "Tell me about rivers."
    full = chunks_of((await post(client, chat(True, True, other), {"x-mock-tokens": "30"})).content)
    assert len(full) == 30 + 3
    assert full[-2]["choices"][0]["finish_reason"] == "stop"
    full_text = "".join(c["choices"][0]["delta"].get("content") or "" for c in full[:-1])
    assert full_text.endswith(".")

    cut = await post(client, chat(True, True, other, max_tokens=7), {"x-mock-tokens": "30"})
    chunks = chunks_of(cut.content)
    assert len(chunks) == 7 + 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    cut_text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert full_text.startswith(cut_text)

    body = (await post(client, chat(content=other, max_completion_tokens=3))).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


async def test_zero_tokens_still_well_formed(client: httpx.AsyncClient) -> None:
    chunks = chunks_of((await post(client, chat(True, True), {"x-mock-tokens": "0"})).content)
    assert len(chunks) == 3
    assert chunks[-1]["usage"]["completion_tokens"] == 0


async def test_cached_and_reasoning_knobs(client: httpx.AsyncClient) -> None:
    headers = {"x-mock-cached-tokens": "5", "x-mock-reasoning-tokens": "4", "x-mock-tokens": "6"}
    u = chunks_of((await post(client, chat(True, True), headers)).content)[-1]["usage"]
    assert u["prompt_tokens_details"]["cached_tokens"] == 5
    assert u["completion_tokens_details"]["reasoning_tokens"] == 4
    # OpenAI counts reasoning inside completion_tokens.
    assert u["completion_tokens"] == 6 + 4
    assert u["total_tokens"] == u["prompt_tokens"] + 10
    # The reasoning spends the max_tokens budget too.
    body = (await post(client, chat(max_tokens=7), headers)).json()
    assert body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["finish_reason"] == "length"


def test_prompt_tokens_grow_with_the_prompt() -> None:
    short = count_prompt_tokens(chat(content="hi"))
    assert short == 3 + 3 + 1
    long = count_prompt_tokens(chat(content="hi, how are you today?"))
    assert long == 3 + 3 + 7
    parts = chat(content=[{"type": "text", "text": "hi, how are you today?"}])
    assert count_prompt_tokens(parts) == long


# ---------------------------------------------------------------- tool calls


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]


async def test_tool_call_stream(client: httpx.AsyncClient) -> None:
    body = chat(True, True, "weather in Paris?", tools=TOOLS)
    chunks = chunks_of((await post(client, body, {"x-mock-tool-call": "1"})).content)
    first = chunks[0]["choices"][0]["delta"]
    (call,) = first["tool_calls"]
    assert first["role"] == "assistant" and first["content"] is None
    assert call["index"] == 0 and call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": ""}
    fragments = [c["choices"][0]["delta"]["tool_calls"][0]["function"] for c in chunks[1:-2]]
    arguments = json.loads("".join(f["arguments"] for f in fragments))
    assert set(arguments) == {"location", "days"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == len(fragments)

    plain = (await post(client, chat(tools=TOOLS, content="weather in Paris?"),
                        {"x-mock-tool-call": "1"})).json()  # fmt: skip
    message = plain["choices"][0]["message"]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == arguments
    assert plain["choices"][0]["finish_reason"] == "tool_calls"
    # Without the header, tools do not change the kind of answer.
    text = chunks_of((await post(client, body)).content)
    assert "content" in text[1]["choices"][0]["delta"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "type_", "code"),
    [
        (400, "invalid_request_error", None),
        (401, "invalid_request_error", "invalid_api_key"),
        (403, "request_forbidden", "unsupported_country_region_territory"),
        (404, "invalid_request_error", "model_not_found"),
        (429, "requests", "rate_limit_exceeded"),
        (500, "server_error", None),
        (503, "server_error", None),
    ],
)
async def test_status_knob(
    client: httpx.AsyncClient, status: int, type_: str, code: str | None
) -> None:
    r = await post(client, chat(stream=True), {"x-mock-status": str(status)})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert (err["type"], err["code"]) == (type_, code)
    assert err["message"] and "param" in err


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"not json", None, None),
        (b"[]", None, "invalid_type"),
        (orjson.dumps({"model": "gpt-4o-mini"}), "messages", "missing_required_parameter"),
        (orjson.dumps({"messages": [{"role": "user"}]}), "model", "missing_required_parameter"),
        (orjson.dumps(chat(max_tokens=0)), "max_tokens", "integer_below_min_value"),
        (orjson.dumps(chat(stream_options={"include_usage": True})), "stream_options",
         "invalid_value"),
    ],
)  # fmt: skip
async def test_invalid_requests_get_openai_400(
    client: httpx.AsyncClient, body: bytes, param: str | None, code: str | None
) -> None:
    r = await post(client, body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code)


async def test_bad_knob_is_named(client: httpx.AsyncClient) -> None:
    r = await post(client, chat(), {"x-mock-tokens": "many"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "x-mock-tokens"


async def test_unknown_path_models_health(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/x", content=b"{}")
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": "Invalid URL (POST /v1/x)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "Invalid URL (GET /v1/chat/completions)"
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    ids = {m["id"] for m in models["data"]}
    assert {"gpt-3.5-turbo", "gpt-4o-mini"} <= ids
    assert all(set(m) == {"id", "object", "created", "owned_by"} for m in models["data"])
    r = await client.get("/healthz")
    assert (r.status_code, r.text) == (200, "ok")


# ---------------------------------------------------------------- wire knobs


async def test_split_knob_delivers_identical_bytes(client: httpx.AsyncClient) -> None:
    body = chat(True, True)
    expected = (await post(client, body)).content
    for split in ("1,7,8,100,101,102,500,4000", "all", "3"):
        r = await post(client, body, {"x-mock-split": split, "x-mock-request-id": "s"})
        assert r.content == expected
        assert base64.b64decode((await exchange(client, "s"))["sent_b64"]) == expected
    r = await post(client, chat(), {"x-mock-split": "1,2,3"})
    assert r.content == (await post(client, chat())).content


def test_split_at_cuts_exactly() -> None:
    assert split_at(b"abcdef", [2, 2, 0, 4, 99]) == [b"ab", b"cd", b"ef"]
    assert split_at(b"abc", []) == [b"abc"]


async def test_gzip_knob(client: httpx.AsyncClient) -> None:
    headers = {"x-mock-gzip": "1", "x-mock-request-id": "gz", "accept-encoding": "identity"}
    async with client.stream(
        "POST", "/v1/chat/completions", content=orjson.dumps(chat(True, True)), headers=headers
    ) as r:
        assert r.headers["content-encoding"] == "gzip"
        wire = b"".join([chunk async for chunk in r.aiter_raw()])
    sent = base64.b64decode((await exchange(client, "gz"))["sent_b64"])
    assert gzip.decompress(wire) == sent
    chunks_of(sent)

    r = await post(client, chat(), headers)
    assert r.json()["object"] == "chat.completion"  # httpx decoded it


def test_gzip_pieces_decode_one_by_one() -> None:
    frames = build_stream(chat(True, True))
    d = zlib.decompressobj(31)
    assert [d.decompress(p) for p in gzip_pieces(frames)] == frames
    assert d.eof


@pytest.mark.parametrize("mode", ["reset", "close"])
async def test_cut_after_truncates_and_drops_connection(
    client: httpx.AsyncClient, mode: str
) -> None:
    headers = {"x-mock-cut-after": "150", "x-mock-cut-mode": mode, "x-mock-request-id": "cut"}
    received = b""
    with pytest.raises(httpx.TransportError):
        async with client.stream(
            "POST", "/v1/chat/completions", content=orjson.dumps(chat(True)), headers=headers
        ) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_raw():
                received += chunk
    sent = base64.b64decode((await exchange(client, "cut"))["sent_b64"])
    assert received == sent[:150]
    # The mock keeps serving after a cut.
    assert (await client.get("/healthz")).status_code == 200


async def test_line_endings(client: httpx.AsyncClient) -> None:
    for name, ending in (("crlf", b"\r\n"), ("cr", b"\r"), ("lf", b"\n")):
        r = await post(client, chat(True, True), {"x-mock-line-ending": name})
        chunks = chunks_of(r.content, ending)
        assert chunks[-1]["choices"] == []
    assert b"\r" not in b"".join(build_stream(chat(True), MockOptions()))


async def test_delay_knob_keeps_bytes(client: httpx.AsyncClient) -> None:
    fast = await post(client, chat(True), {"x-mock-tokens": "3"})
    slow = await post(client, chat(True), {"x-mock-tokens": "3", "x-mock-delay-ms": "2"})
    assert fast.content == slow.content


# ---------------------------------------------------------------- exchanges


async def test_exchanges_record_request_and_response(client: httpx.AsyncClient) -> None:
    raw = b'{"model": "gpt-4o-mini",  "messages": [{"role": "user", "content": "hi"}]}'
    r = await client.post(
        "/v1/chat/completions?a=1",
        content=raw,
        headers={"X-Mock-Request-Id": "ex1", "X-Custom": "Yes", "authorization": "Bearer k"},
    )
    rec = await exchange(client, "ex1")
    assert rec["method"] == "POST" and rec["path"] == "/v1/chat/completions"
    assert rec["query"] == "a=1" and rec["status"] == 200
    assert base64.b64decode(rec["body_b64"]) == raw
    assert base64.b64decode(rec["sent_b64"]) == r.content
    assert rec["headers"]["x-custom"] == "Yes"
    assert rec["headers"]["authorization"] == "Bearer k"
    assert all(k == k.lower() for k in rec["headers"])

    await post(client, chat(), {"x-mock-status": "429", "x-mock-request-id": "ex2"})
    assert (await exchange(client, "ex2"))["status"] == 429
    assert {"ex1", "ex2"} <= set((await client.get("/_mock/exchanges")).json()["ids"])
    assert (await client.get("/_mock/exchanges/nope")).status_code == 404
    assert (await client.delete("/_mock/exchanges")).status_code == 200
    assert (await client.get("/_mock/exchanges")).json()["ids"] == []


async def test_exchange_log_is_bounded(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recording, "MAX_EXCHANGES", 3)
    for i in range(5):
        await post(client, chat(), {"x-mock-request-id": f"b{i}"})
    assert (await client.get("/_mock/exchanges")).json()["ids"] == ["b2", "b3", "b4"]


# ---------------------------------------------------------------- real clients


async def test_openai_sdk_streams_with_usage(url: str) -> None:
    sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": SEED_PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + 12
    done = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": SEED_PROMPT}]
    )
    assert done.choices[0].message.content == text
    with pytest.raises(openai.RateLimitError):
        await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-mock-status": "429"},
        )
    await sdk.close()


def test_pure_builders_agree() -> None:
    for options in (MockOptions(), MockOptions(tokens=40, reasoning_tokens=2, cached_tokens=1)):
        chunks = chunks_of(b"".join(build_stream(chat(True, True), options)))
        completion = build_completion(chat(), options)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
        assert completion["choices"][0]["message"]["content"] == text
        assert completion["usage"] == chunks[-1]["usage"]


async def test_cli_serves_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "extproc.dev.mock", "--port", "0", "--tokens", "4",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()  # type: ignore[union-attr]
        assert "listening on http://127.0.0.1:" in line
        base = line.split("listening on ")[1].strip()
        async with httpx.AsyncClient(base_url=base) as c:
            r = await post(c, chat(True, True))
            assert chunks_of(r.content)[-1]["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        err = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
        assert "POST /v1/chat/completions -> 200" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
