"""Failover through the real Envoy: an alias's targets tried in order (or by weight),
each attempt credentialed and given its model by the upstream ext_proc filter, with
small switchable providers (tests/failover_helpers.py) standing in for the targets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from extproc.dev.devstack import Stack
from tests.conftest import DEV_API_KEY, metric, start_stack, wait_for
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


def _chat(stack: Stack, model: str, stream: bool = False, **extra) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        headers={"authorization": f"Bearer {DEV_API_KEY}"},
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
            fstack, "ai_gateway_failover_attempts_total", alias=alias, target=label, reason="answered"
        )
        == 1
    )

    def logged():
        return [line for line in _access_lines(fstack) if line.get("alias") == alias]

    lines = wait_for(logged)
    assert lines and lines[-1]["target"] == label and str(lines[-1]["attempts"]) == "2"
