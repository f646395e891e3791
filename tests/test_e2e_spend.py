"""Spend end to end, one gateway (real Envoy, sidecar, mock provider), the in-process
budget store and the SQLite ledger: the OpenAI SDK streams against a $ budget until
it is refused, every figure (metric, ledger, header, access log) equals the mock's
usage priced by hand, soft limits call their webhook once, and the budget survives a
restart of the sidecar."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Stack, free_port, metric, wait_for
from tests.spend_helpers import MODEL, hand_price, sqlite_rows, write_policy

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789"
LIMIT_USD = "0.02"
LIMIT = 20_000  # micro-dollars
MAX_TOKENS = 40
KNOBS = {"x-mock-tokens": "30", "x-mock-cached-tokens": "5", "x-mock-reasoning-tokens": "4"}


class Hooks(BaseHTTPRequestHandler):
    calls: list[dict] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        Hooks.calls.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def webhook():
    server = HTTPServer(("127.0.0.1", free_port()), Hooks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/soft"
    server.shutdown()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, webhook):
    directory = tmp_path_factory.mktemp("spend")
    path = write_policy(
        directory,
        consumers={
            "alice": {"keys": [{"value": ALICE}], "teams": ["research"]},
            "bob": {"keys": [{"value": BOB}]},
        },
        budgets={
            "timezone": "Europe/Paris",
            "soft_limit_webhook": {"url": webhook, "timeout_ms": 2000},
            "items": {
                "alice-day": {
                    "scope": "consumer",
                    "match": "alice",
                    "limit_usd": LIMIT_USD,
                    "period": "day",
                },
                "research-month": {
                    "scope": "team",
                    "limit_usd": 5,
                    "period": "month",
                    "soft_limit": 0.002,  # $0.01: crossed on the way to alice's $0.02
                },
            },
        },
        ledger={
            "url": f"sqlite:///{directory / 'ledger.sqlite3'}",
            "journal_dir": str(directory / "journal"),
            "flush_interval_ms": 50,
        },
    )
    stack = Stack(path, directory)
    stack.start()
    stack.ledger = directory / "ledger.sqlite3"
    yield stack
    stack.stop()


def stream_once(client: openai.OpenAI) -> tuple[dict, dict]:
    """One streamed chat completion: (its usage, the response headers)."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count slowly to thirty, please."}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=MAX_TOKENS,
        extra_headers=KNOBS,
    )
    usage = None
    for chunk in raw.parse():
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    assert usage is not None
    return usage, dict(raw.headers)


def refused_once(client: openai.OpenAI) -> openai.APIStatusError:
    with pytest.raises(openai.RateLimitError) as caught:
        stream_once(client)
    return caught.value


def test_streams_until_the_budget_refuses_and_every_figure_agrees(gateway, webhook):
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=ALICE, max_retries=0)
    usages, remaining = [], []
    for _ in range(100):
        try:
            usage, headers = stream_once(client)
        except openai.RateLimitError as exc:
            refused = exc
            break
        usages.append(usage)
        remaining.append(int(headers["x-ai-gateway-budget-remaining-usd"].replace(".", "")))
    else:
        raise AssertionError("the budget never refused")
    costs = [hand_price(u) for u in usages]
    assert len(usages) >= 3
    # The refusal: 429, OpenAI's error shape, naming the budget and when it resets.
    assert refused.status_code == 429
    assert refused.code == "budget_exceeded"
    message = refused.message
    assert "'alice-day'" in message and "'alice'" in message and "resets at" in message
    assert int(refused.response.headers["retry-after"]) > 0
    assert "x-ai-gateway-budget-remaining-usd" in refused.response.headers
    # Never past the budget by more than one reservation's error (here: none; the
    # worst case of each request is above its exact cost).
    assert sum(costs) <= LIMIT
    # Every stream saw what was left after its own worst case, going down.
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] >= 0
    # The metric, the ledger and the hand computation agree to the micro-dollar.
    cost = metric(gateway, "ai_gateway_cost_usd_total", consumer="alice", team="research")
    assert round(cost * 1e6) == sum(costs)
    assert metric(gateway, "ai_gateway_price_lookups_total", status="override") == len(usages) + 1

    def alice_rows() -> list[dict]:
        rows = [r for r in sqlite_rows(gateway.ledger) if r["consumer"] == "alice"]
        return rows if len(rows) == len(usages) + 1 else []

    rows = wait_for(alice_rows)
    assert rows, "the ledger never had a row for every exchange"
    completed = [r for r in rows if r["status"] == "completed"]
    assert sorted(r["cost_micros"] for r in completed) == sorted(costs)
    assert all(r["team"] == "research" and r["model"] == MODEL for r in completed)
    assert {r["reason"] for r in completed} == {"stop"}
    [refusal] = [r for r in rows if r["status"] == "refused"]
    assert refusal["reason"] == "budget_exceeded" and refusal["cost_micros"] == 0
    # The team's soft limit ($0.01) was crossed once: one metric tick, one webhook call.
    assert metric(gateway, "ai_gateway_budget_soft_limit_total", budget="research-month") == 1
    assert wait_for(lambda: Hooks.calls)
    [call] = Hooks.calls
    assert call["budget"] == "research-month" and call["subject"] == "research"
    assert call["limit_usd"] == "5.000000"


def test_a_json_answer_carries_its_exact_cost(gateway):
    with httpx.Client(base_url=gateway.base_url, timeout=30) as client:
        r = client.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {BOB}", **KNOBS},
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}]},
        )
    assert r.status_code == 200
    cost = hand_price(r.json()["usage"])
    assert r.headers["x-ai-gateway-cost-usd"] == f"0.{cost:06d}"
    assert "x-ai-gateway-budget-remaining-usd" not in r.headers  # bob has no budget
    request_id = r.headers["x-request-id"]

    def logged() -> dict | None:
        log = Path(gateway.config.envoy.access_log)
        for line in log.read_text().splitlines() if log.exists() else ():
            entry = json.loads(line)
            if entry.get("request_id") == request_id:
                return entry
        return None

    entry = wait_for(logged)
    assert entry and entry["cost_usd"] == f"0.{cost:06d}"


def test_a_model_without_a_price_is_refused_under_unpriced_refuse(gateway):
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=BOB, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="house-model-without-a-price", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "model_not_priced"
    assert metric(gateway, "ai_gateway_price_lookups_total", status="unpriced") >= 1
    row = wait_for(
        lambda: [r for r in sqlite_rows(gateway.ledger) if r["reason"] == "model_not_priced"]
    )
    assert row and row[0]["status"] == "refused" and row[0]["consumer"] == "bob"


def _refused_or_none(client: openai.OpenAI) -> openai.APIStatusError | None:
    """One try: the refusal, or None while Envoy has not reached the new sidecar."""
    try:
        stream_once(client)
    except openai.RateLimitError as exc:
        return exc
    except openai.APIError:
        return None
    raise AssertionError("admitted: the budget was forgotten")


def test_the_budget_survives_a_restart_of_the_sidecar(gateway):
    """SIGTERM flushes the ledger (its journal is empty after); the new process
    rebuilds its in-process budgets from it before it serves: alice is still over."""
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=ALICE, max_retries=0)
    for _ in range(100):  # over budget (already, after the first test)
        try:
            stream_once(client)
        except openai.RateLimitError:
            break
    assert gateway.stop_process("sidecar") == 0
    journal = gateway.ledger.parent / "journal" / "worker-0"
    assert list(journal.glob("ledger-*.jsonl")) == []
    rows = sqlite_rows(gateway.ledger)
    assert len({r["request_id"] for r in rows}) == len(rows)
    gateway.start_sidecar()
    gateway.wait_sidecar(time.monotonic() + 30)
    exc = wait_for(lambda: _refused_or_none(client), timeout=20)
    assert exc is not None and exc.code == "budget_exceeded"
