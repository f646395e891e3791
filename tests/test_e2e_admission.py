"""Admission control through the real Envoy (issue 17): a worker limited to 3 open
streams answers a 4th concurrent request with 503 `overloaded` + Retry-After at the
request headers, so the provider never sees it; the 3 admitted streams complete,
readiness reports the saturation and recovers, and the gauges return to 0."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from extproc.dev.devstack import Stack, grpc_serving
from tests.conftest import DEV_API_KEY, metric, mock_exchange, start_stack, wait_for

AUTH = {"authorization": f"Bearer {DEV_API_KEY}"}
CHAT = {
    "model": "gpt-4o-mini",
    "stream": True,
    "messages": [{"role": "user", "content": "hello"}],
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("admission"),
        server={"max_open_streams": 3, "max_queue_delay_ms": 0},
    )
    try:
        yield stack
    finally:
        stack.stop()


@dataclass
class Slow:
    request_id: str
    status: int = 0
    body: bytes = b""
    error: BaseException | None = None


def slow_stream(stack: Stack, result: Slow, started: threading.Event) -> None:
    """50 tokens 100 ms apart: open long enough for the refusal and the readiness check
    (once a second) to happen while all three are open."""
    headers = {
        **AUTH,
        "x-mock-request-id": result.request_id,
        "x-mock-tokens": "50",
        "x-mock-delay-ms": "100",
    }
    try:
        with httpx.stream(
            "POST", f"{stack.base_url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60
        ) as r:
            result.status = r.status_code
            for piece in r.iter_raw():
                result.body += piece
                started.set()
    except BaseException as exc:  # reported by the test
        result.error = exc
    finally:
        started.set()


def test_fourth_concurrent_request_is_shed_before_the_provider(limited):
    sidecar = limited.sidecar_addresses[0]
    shed_before = metric(limited, "ai_gateway_shed_total", reason="open_streams")
    slows = [Slow(uuid.uuid4().hex) for _ in range(3)]
    started = [threading.Event() for _ in slows]
    threads = [
        threading.Thread(target=slow_stream, args=(limited, s, e), daemon=True)
        for s, e in zip(slows, started, strict=True)
    ]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(30)
    assert all(s.error is None and s.status == 200 for s in slows), slows

    shed_id = uuid.uuid4().hex
    refused = httpx.post(
        f"{limited.base_url}/v1/chat/completions",
        json=CHAT,
        headers={**AUTH, "x-mock-request-id": shed_id},
        timeout=30,
    )
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    # At its limit the worker reports saturation (readiness, checked once a second).
    assert wait_for(lambda: metric(limited, "ai_gateway_worker_saturated") == 1)
    assert wait_for(lambda: not grpc_serving(sidecar), timeout=4)

    for t in threads:
        t.join(60)
    for s in slows:
        assert s.error is None, s.error
        assert s.status == 200
        assert s.body.rstrip().endswith(b"data: [DONE]"), s.body[-200:]
        assert mock_exchange(limited, s.request_id)  # the admitted ones reached it

    assert metric(limited, "ai_gateway_shed_total", reason="open_streams") == shed_before + 1
    assert metric(limited, "ai_gateway_errors_total", kind="overloaded") >= 1
    assert wait_for(lambda: metric(limited, "ai_gateway_active_streams") == 0)
    assert wait_for(lambda: grpc_serving(sidecar), timeout=15)
    assert wait_for(lambda: metric(limited, "ai_gateway_worker_saturated") == 0)
    # The provider never saw the shed request.
    seen = httpx.get(f"{limited.mock_url}/_mock/exchanges/{shed_id}", timeout=5)
    assert seen.status_code == 404

    # Below the limit again: the next request is admitted.
    again = httpx.post(
        f"{limited.base_url}/v1/chat/completions",
        json={**CHAT, "stream": False},
        headers=AUTH,
        timeout=30,
    )
    assert again.status_code == 200, again.text
