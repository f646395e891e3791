"""The `openai` SDK closes its connection right after `data: [DONE]`, racing Envoy's
end of stream to the sidecar (issue 17 item 2): through the real Envoy, every one of
many SDK streams must be metered complete, in the access log as in the metrics. With
the mock the race is lost now and then; a provider that lingers after `[DONE]` (its
end of stream comes seconds later) makes the SDK win it every time."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import orjson
import pytest
import yaml
from aiohttp import web

from tests.conftest import DEV_API_KEY, DEV_CONFIG, free_port, metric, start_stack, wait_for

STREAMS = 60


def _one(client: openai.OpenAI) -> tuple[str, int, int]:
    rid = uuid.uuid4().hex
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": rid},
    )
    chunks = list(stream)  # the SDK stops reading at [DONE] and closes
    usage = chunks[-1].usage
    assert usage is not None
    return rid, usage.prompt_tokens, usage.completion_tokens


def test_every_sdk_stream_is_complete_in_the_access_log_and_none_aborted(stack):
    check_sdk_streams(stack, STREAMS)


def check_sdk_streams(stack, count: int, path: str = "/v1") -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}{path}", api_key=DEV_API_KEY, max_retries=0)
    aborted = metric(stack, "ai_gateway_errors_total", kind="stream_aborted")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _one(client), range(count)))
    wanted = {rid: (prompt, completion) for rid, prompt, completion in results}

    def entries() -> dict[str, dict] | None:
        found = {}
        for line in (stack.workdir / "access.log").read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            for rid in wanted:
                if rid in line:
                    found[rid] = entry
        return found if len(found) == len(wanted) else None

    found = wait_for(entries)
    assert found, "an SDK stream has no access-log line"
    lacking = {
        rid: (entry.get("prompt_tokens"), entry.get("completion_tokens"))
        for rid, entry in found.items()
        if (entry.get("prompt_tokens"), entry.get("completion_tokens")) != wanted[rid]
    }
    assert not lacking, f"{len(lacking)} of {count} access-log lines lack the tokens"
    assert all(entry["usage_estimated"] is False for entry in found.values())
    assert metric(stack, "ai_gateway_errors_total", kind="stream_aborted") == aborted


LINGER_S = 3.0


async def _lingering(request: web.Request) -> web.StreamResponse:
    """A chat stream with usage and `[DONE]`, whose end of stream comes LINGER_S later."""
    await request.read()
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    deltas = [{"role": "assistant", "content": ""}, {"content": "Hi"}, {"content": " there"}]
    for delta in deltas:
        choice = {"index": 0, "delta": delta, "finish_reason": None}
        await response.write(b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n")
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    await response.write(
        b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
    )
    await response.write(b"data: [DONE]\n\n")
    await asyncio.sleep(LINGER_S)
    await response.write_eof()
    return response


@pytest.fixture
def lingering_provider() -> Iterator[str]:
    port = free_port()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _lingering)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def test_the_sdk_wins_the_race_every_time_against_a_lingering_provider(
    tmp_path: Path, lingering_provider: str
):
    dev = yaml.safe_load(DEV_CONFIG.read_text())
    route = {"name": "linger", "prefix": "/linger/", "provider": "linger", "rewrite": "/v1/"}
    stack = start_stack(
        tmp_path,
        providers={"linger": {"url": lingering_provider, "format": "openai"}},
        routes=[route, *dev["routes"]],
    )
    try:
        check_sdk_streams(stack, 16, path="/linger")
    finally:
        stack.stop()
