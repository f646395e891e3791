"""The `openai` SDK closes its connection right after `data: [DONE]`, racing Envoy's
end of stream to the sidecar (issue 17 item 2): through the real Envoy, every one of
many SDK streams must be metered complete, in the access log as in the metrics."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai

from tests.conftest import DEV_API_KEY, metric, wait_for

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
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    aborted = metric(stack, "ai_gateway_errors_total", kind="stream_aborted")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _one(client), range(STREAMS)))
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
    assert not lacking, f"{len(lacking)} of {STREAMS} access-log lines lack the tokens"
    assert all(entry["usage_estimated"] is False for entry in found.values())
    assert metric(stack, "ai_gateway_errors_total", kind="stream_aborted") == aborted
