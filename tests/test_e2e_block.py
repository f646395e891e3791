"""A guard blocks a long stream early, through the real Envoy: what the client gets and
whether the provider keeps generating, for `streaming.on_block: drain` and `close`.

The mock provider streams a long answer slowly (`x-mock-text`: the blocked words come
first, about 400 more tokens follow, 100 for drain, `x-mock-delay-ms: 20`) and records
whether Envoy went away before it finished (`client_went_away` in /_mock/exchanges/{id}), so the
provider side is checked without timing anything.

- drain: the client gets the error event, `[DONE]` and a clean end (curl exit 0), but
  only once the provider has finished its whole answer.
- close: the client gets the complete error event and `[DONE]` first; the next provider
  chunk makes Envoy close the provider's stream and reset the client's: HTTP/1.1 ends
  without the last chunk (curl exit 18), HTTP/2 with RST_STREAM (curl exit 92).
"""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from extproc.dev.devstack import Stack
from tests.conftest import metric, sse_payloads, start_stack, wait_for

GUARDS = {
    "rules": [
        {
            "name": "no-fruit",
            "action": "reject",
            "keywords": ["forbidden fruit"],
            "phases": ["response"],
        }
    ]
}
# The blocked words early, then a long tail the provider keeps generating.
TEXT = "Here is the forbidden fruit you asked for" + " and more" * 200
SLOW = {"x-mock-delay-ms": "20", "x-mock-text": TEXT}
# Drain waits for the provider's whole answer: a shorter tail (2 s, not 8) shows it as
# well. The close tests keep the long one (the provider is stopped within its first half).
DRAIN_TEXT = "Here is the forbidden fruit you asked for" + " and more" * 50
KEY = "my-secret-key"  # the dev policy's consumer (route /v1/ requires a key)
CURL_PARTIAL_FILE = 18  # HTTP/1.1: connection closed before the terminating chunk
CURL_HTTP2_STREAM = 92  # HTTP/2: stream reset (RST_STREAM) before END_STREAM


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    """One stack per mode. Started one after the other: two Envoys starting at once can
    pick the same dynamic base id, and then one takes the other over (hot restart)."""
    base: Path = tmp_path_factory.mktemp("block")
    started: dict[str, Stack] = {}
    try:
        for mode in ("drain", "close"):
            started[mode] = start_stack(base / mode, guards=GUARDS, streaming={"on_block": mode})
        yield started
    finally:
        for stack in started.values():
            stack.stop()


def chat_body() -> str:
    return json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "messages": [{"role": "user", "content": "Tell me about fruit."}],
        }
    )


def curl(
    stack: Stack, request_id: str, *options: str, text: str = TEXT
) -> subprocess.CompletedProcess:
    headers = {**SLOW, "x-mock-text": text, "content-type": "application/json"}
    headers["x-mock-request-id"] = request_id
    argv = ["curl", "-sN", *options, f"{stack.base_url}/openai", "-d", chat_body()]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    return subprocess.run(argv, capture_output=True, timeout=60)


def provider_side(stack: Stack, request_id: str) -> dict:
    """The mock's record once its stream is over (finished, or the peer went away)."""

    def settled():
        r = httpx.get(f"{stack.mock_url}/_mock/exchanges/{request_id}", timeout=5)
        record = r.json() if r.status_code == 200 else {}
        return record if record.get("completed") or record.get("client_went_away") else None

    record = wait_for(settled, timeout=30)
    assert record, f"the mock's stream {request_id} never ended"
    return record


def assert_error_event_then_done(body: bytes) -> None:
    """The client has the whole error event and `[DONE]`, and nothing of the block."""
    events = sse_payloads(body)
    assert body.endswith(b"data: [DONE]\n\n") and events.count(b"[DONE]") == 1
    error = orjson.loads(events[-2])["error"]
    assert error["code"] == "guard_blocked" and "no-fruit" in error["message"]
    assert b"forbidden" not in body and b"more" not in body


def test_drain_ends_the_client_cleanly_but_the_provider_finishes(stacks):
    stack = stacks["drain"]
    rid = uuid.uuid4().hex
    out = curl(stack, rid, text=DRAIN_TEXT)
    assert out.returncode == 0, out.stderr
    assert_error_event_then_done(out.stdout)
    provider = provider_side(stack, rid)
    assert provider["completed"] and not provider["client_went_away"]
    assert metric(stack, "ai_gateway_upstream_closed_total") == 0


def test_close_stops_the_provider_after_the_error_event_http1(stacks):
    stack = stacks["close"]
    rid = uuid.uuid4().hex
    out = curl(stack, rid, "--http1.1")
    assert out.returncode == CURL_PARTIAL_FILE, out.stderr
    assert_error_event_then_done(out.stdout)
    provider = provider_side(stack, rid)
    assert provider["client_went_away"] and not provider["completed"]
    assert provider["bytes_written"] < len(base64.b64decode(provider["sent_b64"])) / 2
    labels = {"kind": "guard_blocked"}
    assert wait_for(lambda: metric(stack, "ai_gateway_upstream_closed_total", **labels) >= 1)
    # Envoy's access log says why the stream ended, with the exchange's figures.
    log = stack.workdir / "access.log"

    def closed_line():
        lines = log.read_text().splitlines() if log.exists() else []
        found = [orjson.loads(x) for x in lines if "ai_gateway_upstream_closed" in x]
        return found[-1] if found else None

    line = wait_for(closed_line)
    assert line and line["status"] == 200 and line["model"] == "gpt-4o-mini"


def test_close_over_http2_resets_after_the_error_event(stacks):
    stack = stacks["close"]
    rid = uuid.uuid4().hex
    out = curl(stack, rid, "--http2-prior-knowledge")
    assert out.returncode == CURL_HTTP2_STREAM, out.stderr
    assert_error_event_then_done(out.stdout)
    provider = provider_side(stack, rid)
    assert provider["client_went_away"] and not provider["completed"]


def test_close_sdk_raises_the_guard_error_not_a_connection_error(stacks):
    """The OpenAI SDK stops at the error event: the reset that follows is never seen."""
    stack = stacks["close"]
    rid = uuid.uuid4().hex
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Tell me about fruit."}],
        stream=True,
        extra_headers={**SLOW, "x-mock-request-id": rid},
        timeout=30,
    )
    with pytest.raises(openai.APIError, match="no-fruit") as info:
        for _ in stream:
            pass
    assert not isinstance(info.value, openai.APIConnectionError)
    assert provider_side(stack, rid)["client_went_away"]
