"""Answers the gateway cannot read, through the real Envoy, from a provider that ignores
the gateway's `accept-encoding: identity` and labels its streams as it likes. gzip is
inflated and guarded like identity; a coding the gateway cannot read (br) and SSE
labelled text/plain are 502s before any byte, not streams that pass the mask guard
unread; SSE under a JSON label is read as the stream the SDK reads; a gzip bomb ends
the stream with the error event."""

from __future__ import annotations

import asyncio
import json
import threading
import zlib
from collections.abc import Iterator

import httpx
import pytest
from aiohttp import web

from extproc.dev.devstack import Stack
from tests.conftest import free_port, metric, start_stack, wait_for

KEY = "sk-consumer-encoding"
CARD = "4111 1111 1111 1111"


def frame(content: str | None, finish: str | None = None, usage: dict | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    body = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": usage,
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


FRAMES = [
    frame("Your card is "),
    frame(CARD),
    frame(".", "stop"),
    frame(None, usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}),
    b"data: [DONE]\n\n",
]


async def answer(request: web.Request) -> web.StreamResponse:
    await request.read()
    mode = request.headers.get("x-test-coding", "gzip")
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    headers["x-ai-gateway-cost-usd"] = "0.0"  # spoofed: the gateway's headers are its own
    if mode == "br":
        headers["content-encoding"] = "br"
    elif mode in ("text/plain", "application/json"):
        headers["content-type"] = mode
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    comp = zlib.compressobj(wbits=31)
    if mode == "bomb":
        await response.write(comp.compress(FRAMES[0]) + comp.flush(zlib.Z_SYNC_FLUSH))
        await response.write(comp.compress(b"data: " + b"A" * (64 << 20)) + comp.flush())
    else:  # gzip, or mislabelled: the gateway must not pass it unread
        for piece in FRAMES:
            await response.write(comp.compress(piece) + comp.flush(zlib.Z_SYNC_FLUSH))
            await asyncio.sleep(0.01)
        await response.write(comp.flush())
    await response.write_eof()
    return response


class Provider(threading.Thread):
    """An OpenAI-style provider that compresses whatever the client asked for."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.loop = asyncio.new_event_loop()

    def run(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", answer)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.loop.run_forever()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    Provider(port).start()
    s = start_stack(
        tmp_path_factory.mktemp("encoding"),
        providers={"packed": {"url": f"http://127.0.0.1:{port}", "format": "openai"}},
        consumers={"app": {"keys": [{"value": KEY}]}},
        routes=[{"name": "v1", "prefix": "/v1/", "provider": "packed", "auth": "required"}],
        guards={"rules": [{"name": "pii", "detectors": ["credit_card"]}]},
    )
    try:
        yield s
    finally:
        s.stop()


def post(stack: Stack, mode: str) -> httpx.Response:
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "what is my card?"}],
    }
    headers = {"authorization": f"Bearer {KEY}", "x-test-coding": mode}
    return httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=headers,
                      timeout=60)  # fmt: skip


def test_a_gzip_answer_reaches_the_client_as_identity_and_masked(stack: Stack):
    r = post(stack, "gzip")
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert "x-ai-gateway-cost-usd" not in r.headers
    assert CARD not in r.text and "<CREDIT_CARD>" in r.text
    assert r.text.endswith("data: [DONE]\n\n")


def test_an_answer_in_br_is_a_502_not_an_unguarded_stream(stack: Stack):
    before = metric(stack, "ai_gateway_errors_total", kind="decode_error")
    r = post(stack, "br")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "decode_error"
    assert "br" in r.json()["error"]["message"]
    assert wait_for(
        lambda: metric(stack, "ai_gateway_errors_total", kind="decode_error") == before + 1
    )


def test_a_gzip_bomb_ends_the_stream_with_the_error_event(stack: Stack):
    r = post(stack, "bomb")
    assert r.status_code == 200  # the first frame had gone out
    assert len(r.content) < 1 << 20
    assert '"code":"decode_error"' in r.text and "inflates past" in r.text
    # The sidecar is still serving.
    assert post(stack, "gzip").status_code == 200


def test_sse_labelled_text_plain_is_a_502_not_an_unguarded_stream(stack: Stack):
    r = post(stack, "text/plain")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "decode_error"
    assert "text/plain" in r.json()["error"]["message"]
    assert CARD not in r.text


def test_a_stream_under_a_json_label_is_masked_as_the_sdk_reads_it(stack: Stack):
    """The openai SDK reads the stream it asked for whatever the label says."""
    import openai

    client = openai.OpenAI(
        base_url=f"{stack.base_url}/v1",
        api_key=KEY,
        default_headers={"x-test-coding": "application/json"},
        max_retries=0,
    )
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "what is my card?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert CARD not in text and "<CREDIT_CARD>" in text
    assert usage is not None and usage.completion_tokens == 3
