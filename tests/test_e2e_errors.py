"""Bad input end to end: every failure gets a clear status and an OpenAI-style body
before the response starts, a clean end after, and leaves no state behind."""

from __future__ import annotations

import json
import signal
import subprocess

import httpx
import openai
import orjson
import pytest

from tests.conftest import DEV_API_KEY, metric, start_stack, wait_for

SEED = {
    "stream": True,
    "model": "gpt-3.5-turbo",
    "messages": [{"role": "user", "content": "hello"}],
}
AUTH = {"authorization": f"Bearer {DEV_API_KEY}"}


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b'{"model": "gpt-3.5-turbo", "messages": [', "invalid_json"),
        (b"model=gpt&messages=hi", "invalid_json"),
        (b'{"model": "gpt-3.5-turbo"}', "missing_required_parameter"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "missing_required_parameter"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            "invalid_encoding",
        ),
        (b"", "missing_body"),
    ],
)
def test_bad_request_bodies_get_400(stack, client, content, code):
    before = metric(stack, "ai_gateway_errors_total", kind="bad_request")
    r = client.post(
        "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert_openai_error(r, 400, code)
    assert metric(stack, "ai_gateway_errors_total", kind="bad_request") == before + 1


def test_sdk_raises_bad_request_error(stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-3.5-turbo", messages=[])
    assert "messages" in str(info.value)


def test_body_over_limit_gets_413_json(stack, client):
    limit = stack.config.envoy.max_request_bytes
    big = {**SEED, "messages": [{"role": "user", "content": "x" * (limit + 10)}]}
    r = client.post("/v1/chat/completions", json=big)
    assert_openai_error(r, 413)


def test_unknown_path_gets_404_json(stack, client):
    r = client.post("/no/such/api", json=SEED)
    assert_openai_error(r, 404, "unknown_url")


@pytest.mark.parametrize("status", [429, 500, 503])
def test_provider_error_status_passes_through(stack, client, status):
    before = metric(stack, "ai_gateway_requests_total", route="v1", status=str(status))
    r = client.post("/v1/chat/completions", json=SEED, headers={"x-mock-status": str(status)})
    assert_openai_error(r, status)
    assert wait_for(
        lambda: (
            metric(stack, "ai_gateway_requests_total", route="v1", status=str(status)) == before + 1
        )
    )


def test_sdk_raises_rate_limit_error_from_provider(stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-3.5-turbo",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-mock-status": "429"},
        )


def test_provider_cutting_the_stream_ends_the_client_stream(stack, client):
    """No hang: the client sees the stream end early, the sidecar counts it."""
    before = metric(stack, "ai_gateway_errors_total", kind="stream_aborted")
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream(
            "POST",
            "/v1/chat/completions",
            json=SEED,
            headers={"x-mock-cut-after": "700", "x-mock-delay-ms": "20"},
        ) as r,
    ):
        assert r.status_code == 200
        for _ in r.iter_bytes():
            pass
    assert wait_for(
        lambda: metric(stack, "ai_gateway_errors_total", kind="stream_aborted") == before + 1
    )
    assert wait_for(lambda: metric(stack, "ai_gateway_active_streams") == 0)


def test_client_hanging_up_mid_stream_leaves_no_state(stack):
    before = metric(stack, "ai_gateway_errors_total", kind="stream_aborted")
    with (
        httpx.Client(base_url=stack.base_url, timeout=30, headers=AUTH) as c,
        c.stream(
            "POST",
            "/v1/chat/completions",
            json=SEED,
            headers={"x-mock-tokens": "200", "x-mock-delay-ms": "50"},
        ) as r,
    ):
        it = r.iter_raw()
        first = next(it)
        assert first.startswith(b"data: ")
        assert metric(stack, "ai_gateway_active_streams") >= 1
    # The connection is closed here, mid-stream.
    assert wait_for(lambda: metric(stack, "ai_gateway_active_streams") == 0)
    assert wait_for(
        lambda: metric(stack, "ai_gateway_errors_total", kind="stream_aborted") == before + 1
    )


@pytest.fixture(scope="module")
def tiny_frames_stack(tmp_path_factory):
    """A stack whose limit on an unfinished frame is smaller than one frame."""
    s = start_stack(tmp_path_factory.mktemp("tiny"), streaming={"max_frame_bytes": 64})
    yield s
    s.stop()


def test_frame_over_limit_ends_stream_with_error_event(tiny_frames_stack):
    """A frame still unfinished past the limit is refused, the stream ends cleanly."""
    s = tiny_frames_stack
    split = "x-mock-split: 300,600"  # cuts inside frames: held bytes exceed 64
    # Pieces 150 ms apart: 5 ms (the default) can coalesce on a loaded machine, and a
    # frame that arrives whole is within the limit.
    pause = "x-mock-delay-ms: 150"
    out = subprocess.run(
        [
            "curl",
            "-sN",
            f"{s.base_url}/v1/chat/completions",
            "-H",
            "content-type:application/json",
            "-H",
            split,
            "-H",
            pause,
            "-H",
            f"Authorization: Bearer {DEV_API_KEY}",
            "-d",
            json.dumps(SEED),
        ],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    frames = [f for f in out.split(b"\n\n") if f]
    assert frames[-1] == b"data: [DONE]"
    error = orjson.loads(frames[-2][6:])["error"]
    assert error["code"] == "frame_too_large"
    client = openai.OpenAI(base_url=f"{s.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    with pytest.raises(openai.APIError, match="exceeds"):
        list(
            client.chat.completions.create(
                model="gpt-3.5-turbo",
                stream=True,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-mock-split": "300,600", "x-mock-delay-ms": "150"},
            )
        )
    assert wait_for(lambda: metric(s, "ai_gateway_active_streams") == 0)


def test_sidecar_down_fails_closed_with_json_500(tmp_path):
    s = start_stack(tmp_path)
    try:
        s.stop_process("sidecar")
        r = httpx.post(f"{s.base_url}/v1/chat/completions", json=SEED, headers=AUTH, timeout=30)
        assert_openai_error(r, 500)
        # Nothing reached the provider unchecked.
        assert httpx.get(f"{s.mock_url}/_mock/exchanges", timeout=5).json() == {"ids": []}
    finally:
        s.stop()


def envoy_ext_proc_stats(stack) -> dict[str, int]:
    """Envoy's own ext_proc counters: the sidecar cannot count its own hang or absence."""
    text = httpx.get(f"{stack.admin_url}/stats", params={"filter": "ext_proc"}, timeout=5).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            out[name.rsplit(".", 1)[-1]] = int(value)
    return out


def access_entry(stack, request_id: str) -> dict | None:
    path = stack.workdir / "access.log"
    lines = path.read_text().splitlines() if path.exists() else []
    found = [e for e in map(json.loads, lines) if e["request_id"] == request_id]
    return found[-1] if found else None


def test_slow_sidecar_gets_504_down_sidecar_500_and_both_are_told_apart(tmp_path):
    """docs/errors.md: a sidecar that hangs (stopped, stuck loop) is a timeout, 504
    `gateway_timeout`; one that is gone is a gRPC error, 500 `gateway_error`. Envoy
    counts each in its own stat and names it in the access log."""
    s = start_stack(tmp_path, envoy={"message_timeout_ms": 500})
    sidecar = s.procs["sidecar"]
    try:
        sidecar.send_signal(signal.SIGSTOP)  # hung: connections open, nothing answers
        try:
            r = httpx.post(
                f"{s.base_url}/openai", json=SEED, headers={"x-request-id": "slow"}, timeout=30
            )
        finally:
            sidecar.send_signal(signal.SIGCONT)
        error = assert_openai_error(r, 504, "gateway_timeout")
        assert "ext_proc_error_per-message_timeout_exceeded" in error["message"]
        stats = envoy_ext_proc_stats(s)
        assert stats["message_timeouts"] == 1 and stats.get("streams_failed", 0) == 0

        s.stop_process("sidecar", signal.SIGKILL)  # down: connections refused
        r = httpx.post(
            f"{s.base_url}/openai", json=SEED, headers={"x-request-id": "down"}, timeout=30
        )
        error = assert_openai_error(r, 500, "gateway_error")
        assert "ext_proc_error_gRPC_error_14" in error["message"]
        stats = envoy_ext_proc_stats(s)
        assert stats["message_timeouts"] == 1 and stats["streams_failed"] == 1
        # Nothing reached the provider unchecked, either way.
        assert httpx.get(f"{s.mock_url}/_mock/exchanges", timeout=5).json() == {"ids": []}
        slow = wait_for(lambda: access_entry(s, "slow"))
        down = wait_for(lambda: access_entry(s, "down"))
        assert slow and slow["status"] == 504
        assert slow["response_code_details"] == "ext_proc_error_per-message_timeout_exceeded"
        assert down and down["status"] == 500
        assert down["response_code_details"].startswith("ext_proc_error_gRPC_error_14")
    finally:
        s.stop()


def test_failure_mode_allow_lets_traffic_through(tmp_path):
    s = start_stack(tmp_path, envoy={"failure_mode_allow": True})
    try:
        s.stop_process("sidecar")
        r = httpx.post(f"{s.base_url}/v1/chat/completions", json=SEED, headers=AUTH, timeout=30)
        assert r.status_code == 200 and b"[DONE]" in r.content
    finally:
        s.stop()


def test_provider_down_gets_503_json_and_no_leak(tmp_path):
    s = start_stack(tmp_path)
    try:
        s.stop_process("mock")
        r = httpx.post(f"{s.base_url}/v1/chat/completions", json=SEED, headers=AUTH, timeout=30)
        assert_openai_error(r, 503, "upstream_unavailable")
        assert wait_for(lambda: metric(s, "ai_gateway_active_streams") == 0)
    finally:
        s.stop()
