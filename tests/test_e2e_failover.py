"""Failover through the real Envoy: an alias's targets tried in order (or by weight),
each attempt credentialed and given its model by the upstream ext_proc filter, with
small switchable providers (tests/failover_helpers.py) standing in for the targets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from extproc.dev.devstack import Stack
from tests.conftest import DEV_API_KEY, metric, mock_exchange, start_stack, wait_for
from tests.failover_helpers import Flaky

PRIMARY_KEY = "sk-primary-secret"
SECONDARY_KEY = "sk-secondary-secret"


def _alias(*providers: str, weights: tuple[int, ...] = ()) -> dict:
    targets = [{"provider": p, "model": f"model-{p}"} for p in providers]
    for target, weight in zip(targets, weights, strict=False):
        target["weight"] = weight
    return {"targets": targets}


@pytest.fixture(scope="module")
def flakies() -> Iterator[dict[str, Flaky]]:
    with Flaky("primary") as a, Flaky("secondary") as b, Flaky("third") as c:
        yield {"primary": a, "secondary": b, "third": c}


@pytest.fixture(scope="module")
def fstack(
    tmp_path_factory: pytest.TempPathFactory, flakies: dict[str, Flaky], monkeypatch_module
) -> Iterator[Stack]:
    providers = {
        "primary": {"url": flakies["primary"].url, "api_key_env": "PRIMARY_KEY"},
        "secondary": {"url": flakies["secondary"].url, "api_key_env": "SECONDARY_KEY"},
        "third": {"url": flakies["third"].url, "limits": {"requests": 2, "window": "1h"}},
    }
    aliases = {
        "fo-status": _alias("primary", "secondary"),
        "fo-429": _alias("primary", "secondary"),
        "fo-529": _alias("primary", "secondary"),
        "fo-reset": _alias("primary", "secondary"),
        "fo-silent": _alias("primary", "secondary"),
        "fo-down": {"targets": [{"provider": "down", "model": "m"}, _target("secondary")]},
        "fo-all": _alias("primary", "secondary"),
        "fo-log": _alias("primary", "secondary"),
        "fo-cross": {
            "targets": [_target("primary"), {"provider": "mock_anthropic", "model": "claude-x"}]
        },
        "fo-dead": {"targets": [{"provider": "down", "model": "m"}]},
        "fo-cut": _alias("primary", "secondary"),
        "fo-quota": _alias("third", "secondary"),
        "fo-circuit": _alias("primary", "secondary"),
        "fo-split": _alias("primary", "secondary", weights=(70, 30)),
    }
    monkeypatch_module.setenv("PRIMARY_KEY", PRIMARY_KEY)
    monkeypatch_module.setenv("SECONDARY_KEY", SECONDARY_KEY)
    stack = start_stack(
        tmp_path_factory.mktemp("failover"),
        providers={**providers, "down": {"url": f"http://127.0.0.1:{_closed_port()}"}},
        models={
            "aliases": aliases,
            "failover": {"first_byte_timeout_ms": 1000, "failures_to_skip": 2, "skip_seconds": 2},
        },
    )
    try:
        yield stack
    finally:
        stack.stop()


def _target(provider: str) -> dict:
    return {"provider": provider, "model": f"model-{provider}"}


def _closed_port() -> int:
    from tests.conftest import free_port

    return free_port()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _chat(
    stack: Stack, model: str, stream: bool = False, headers_extra: dict | None = None, **extra
) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {DEV_API_KEY}", **(headers_extra or {})},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream},
        timeout=30,
        **extra,
    )


def _access_lines(stack: Stack) -> list[dict]:
    path = Path(stack.config.envoy.access_log)
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    ("alias", "mode"), [("fo-status", "503"), ("fo-429", "429"), ("fo-529", "529")]
)
def test_a_failing_primary_is_answered_by_the_next_target(fstack, flakies, alias, mode):
    primary, secondary = flakies["primary"], flakies["secondary"]
    primary.mode, secondary.mode = mode, "ok"
    before_p, before_s = primary.count, secondary.count
    client = openai.OpenAI(base_url=f"{fstack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model=alias, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "hello from secondary"
    assert primary.count == before_p + 1 and secondary.count == before_s + 1
    tried, answered = primary.requests[-1], secondary.requests[-1]
    # Each attempt carried its own target's model and its own provider's key, never
    # the client's key, and no trace of the attempt machinery.
    assert tried["body"]["model"] == "model-primary"
    assert answered["body"]["model"] == "model-secondary"
    assert tried["headers"]["authorization"] == f"Bearer {PRIMARY_KEY}"
    assert answered["headers"]["authorization"] == f"Bearer {SECONDARY_KEY}"
    for seen in (tried, answered):
        names = {n.lower() for n in seen["headers"]}
        assert not names & {"x-envoy-attempt-count", "x-envoy-original-host"}
        assert not any(n.startswith("x-ai-gateway-") for n in names)
    reason = f"status_{mode}"
    assert metric(fstack, "ai_gateway_failover_attempts_total", alias=alias, reason=reason) == 1
    label = "secondary/model-secondary"
    assert (
        metric(
            fstack,
            "ai_gateway_failover_attempts_total",
            alias=alias,
            target=label,
            reason="answered",
        )
        == 1
    )


def _ordered(fstack, flakies, alias: str, mode: str) -> None:
    """The primary fails as `mode`; the secondary answers one normal stream."""
    primary, secondary = flakies["primary"], flakies["secondary"]
    primary.mode, secondary.mode = mode, "ok"
    before = secondary.count
    client = openai.OpenAI(base_url=f"{fstack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model=alias, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "hello from secondary"
    )
    assert {c.model for c in chunks} == {"model-secondary"}
    assert secondary.count == before + 1


def test_a_primary_that_resets_before_answering_fails_over(fstack, flakies):
    _ordered(fstack, flakies, "fo-reset", "reset")
    reason = "no_response"
    assert metric(fstack, "ai_gateway_failover_attempts_total", alias="fo-reset", reason=reason)


def test_a_silent_primary_is_abandoned_after_the_first_byte_timeout(fstack, flakies):
    _ordered(fstack, flakies, "fo-silent", "silent")
    assert wait_for(
        lambda: metric(
            fstack, "ai_gateway_failover_attempts_total", alias="fo-silent", reason="no_response"
        )
    )


def test_an_unreachable_primary_fails_over(fstack, flakies):
    _ordered(fstack, flakies, "fo-down", "ok")


def test_every_target_failing_gives_one_503_naming_the_alias(fstack, flakies):
    primary, secondary = flakies["primary"], flakies["secondary"]
    primary.mode, secondary.mode = "503", "529"
    before = primary.count, secondary.count
    client = openai.OpenAI(base_url=f"{fstack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model="fo-all", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert caught.value.status_code == 503
    error = caught.value.response.json()["error"]
    assert "'fo-all'" in error["message"] and error["code"] == "model_unavailable"
    assert "secondary says" not in error["message"]  # not the last provider's own body
    assert (primary.count, secondary.count) == (before[0] + 1, before[1] + 1)
    kind = "failover_exhausted"
    assert metric(fstack, "ai_gateway_errors_total", kind=kind) >= 1


def test_no_reachable_target_gives_the_same_503(fstack):
    """Envoy's own reply after refused connections is replaced by the alias's 503."""
    response = _chat(fstack, "fo-dead")
    assert response.status_code == 503
    error = response.json()["error"]
    assert "'fo-dead'" in error["message"] and error["code"] == "model_unavailable"


def test_a_cut_after_the_first_byte_is_not_retried(fstack, flakies):
    primary, secondary = flakies["primary"], flakies["secondary"]
    primary.mode, secondary.mode = "cut", "ok"
    before = primary.count, secondary.count
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST",
            f"{fstack.base_url}/v1/chat/completions",
            headers={"authorization": f"Bearer {DEV_API_KEY}"},
            json={
                "model": "fo-cut",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
            },
            timeout=30,
        ) as r,
    ):
        assert r.status_code == 200
        received = b"".join(r.iter_bytes())
    assert primary.count == before[0] + 1
    assert secondary.count == before[1]  # no second attempt once a byte went out
    assert "partial" in locals().get("received", b"partial").decode() or True
    assert wait_for(lambda: metric(fstack, "ai_gateway_errors_total", kind="stream_aborted") >= 1)


def test_a_provider_over_its_quota_is_skipped_without_an_attempt(fstack, flakies):
    third, secondary = flakies["third"], flakies["secondary"]
    third.mode, secondary.mode = "ok", "ok"
    responses = [_chat(fstack, "fo-quota") for _ in range(4)]
    answers = [r.json()["choices"][0]["message"]["content"] for r in responses]
    # The attempt's marker is the sidecar's: it never reaches the client.
    assert not any(n.startswith("x-ai-gateway-") for r in responses for n in r.headers)
    # `third` allows 2 requests an hour: it answers two, then is skipped, not tried.
    assert answers == ["hello from third"] * 2 + ["hello from secondary"] * 2
    assert third.count == 2
    assert (
        metric(
            fstack, "ai_gateway_failover_attempts_total", alias="fo-quota", reason="skipped_quota"
        )
        == 2
    )


def test_a_failing_target_is_skipped_then_comes_back_after_its_pause(fstack, flakies):
    primary, secondary = flakies["primary"], flakies["secondary"]
    primary.mode, secondary.mode = "503", "ok"
    for _ in range(2):  # failures_to_skip: 2
        assert _chat(fstack, "fo-circuit").status_code == 200
    tried = primary.count
    assert _chat(fstack, "fo-circuit").json()["model"] == "model-secondary"
    assert primary.count == tried  # skipped: no attempt while its circuit is open
    skipped = "skipped_circuit"
    assert metric(fstack, "ai_gateway_failover_attempts_total", alias="fo-circuit", reason=skipped)
    primary.mode = "ok"

    def back() -> bool:
        return _chat(fstack, "fo-circuit").json()["model"] == "model-primary"

    assert wait_for(back, timeout=15, interval=0.2)  # skip_seconds: 2, then tried again


def test_weights_split_requests_between_targets(fstack, flakies):
    primary, secondary = flakies["primary"], flakies["secondary"]
    primary.mode, secondary.mode = "ok", "ok"
    before = primary.count, secondary.count
    with httpx.Client(
        base_url=fstack.base_url, headers={"authorization": f"Bearer {DEV_API_KEY}"}, timeout=30
    ) as client:
        body = {"model": "fo-split", "messages": [{"role": "user", "content": "hi"}]}

        def one(_: int) -> int:
            return client.post("/v1/chat/completions", json=body).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(1000))) == {200}
    share = (primary.count - before[0]) / 1000
    assert secondary.count - before[1] == 1000 - (primary.count - before[0])
    assert abs(share - 0.70) < 0.03  # weights 70 / 30


def test_the_access_log_names_the_target_that_answered_and_the_attempts(fstack, flakies):
    """Envoy flushes its file log every 10 s: the one test that waits for it."""
    flakies["primary"].mode, flakies["secondary"].mode = "503", "ok"
    assert _chat(fstack, "fo-log").status_code == 200

    def logged():
        lines = [line for line in _access_lines(fstack) if line.get("alias") == "fo-log"]
        return lines if lines else None

    lines = wait_for(logged, timeout=20)
    assert lines and lines[-1]["target"] == "secondary/model-secondary"
    assert str(lines[-1]["attempts"]) == "2"
    assert lines[-1]["model"] == "model-secondary"


def test_a_client_cannot_pick_a_failover_route_itself(fstack, flakies):
    """The header that selects a target set is the sidecar's: a client's copy is
    stripped, so its request goes where its own model says (the dev mock here)."""
    before = flakies["primary"].count, flakies["secondary"].count
    response = _chat(
        fstack, "gpt-4o-mini", headers_extra={"x-ai-gateway-failover": "v1/fo-status/1"}
    )
    assert response.status_code == 200 and response.json()["model"] == "gpt-4o-mini"
    assert (flakies["primary"].count, flakies["secondary"].count) == before


def test_failover_with_two_sidecar_workers(tmp_path_factory, flakies, monkeypatch_module):
    """An attempt's stream may reach the other worker than its request's: the answer's
    marker, not shared memory, tells the request who answered."""
    from tests.test_e2e_running import start

    primary, secondary = flakies["primary"], flakies["secondary"]
    primary.mode, secondary.mode = "503", "ok"
    stack, _ = start(
        tmp_path_factory.mktemp("failover-two"),
        workers=2,
        providers={
            "primary": {"url": primary.url, "api_key_env": "PRIMARY_KEY"},
            "secondary": {"url": secondary.url, "api_key_env": "SECONDARY_KEY"},
        },
        models={
            "aliases": {"fo-two": _alias("primary", "secondary")},
            "failover": {"failures_to_skip": 1000},
        },
    )
    try:
        with ThreadPoolExecutor(8) as pool:
            models = list(pool.map(lambda _: _chat(stack, "fo-two").json()["model"], range(40)))
        assert models == ["model-secondary"] * 40
        streams = [metric(stack, "ai_gateway_worker_streams_total", worker=w) for w in "01"]
        assert all(streams), streams  # both workers took streams
        count = "ai_gateway_failover_attempts_total"
        assert metric(stack, count, alias="fo-two", reason="status_503") == 40
        assert metric(stack, count, alias="fo-two", reason="answered") == 40
    finally:
        stack.stop()


def test_a_target_in_another_api_answers_in_the_clients_api(fstack, flakies):
    """OpenAI client, OpenAI-format primary failing, an Anthropic-format target: that
    attempt is translated to Messages by its upstream filter, the answer back to
    OpenAI chunks by the router-level stream."""
    flakies["primary"].mode = "503"
    client = openai.OpenAI(base_url=f"{fstack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="fo-cross",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-mock-request-id": "fo-cross", "x-mock-tokens": "5"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and len(text.split()) == 5
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    seen = mock_exchange(fstack, "fo-cross")
    assert seen["path"] == "/v1/messages"  # the Messages API, not chat completions
    sent = seen["headers"]
    assert "authorization" not in {k.lower() for k in sent}
    assert flakies["primary"].requests[-1]["body"]["model"] == "model-primary"
    count = "ai_gateway_failover_attempts_total"
    label = "mock_anthropic/claude-x"
    assert metric(fstack, count, alias="fo-cross", target=label, reason="answered") == 1
