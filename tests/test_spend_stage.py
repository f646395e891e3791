"""The spend stage against the exchange state machine (no I/O): what is reserved, what
settles when a stream is cut short, refused or failed, the headers, the 402/429 body
and the ledger row of each ending."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

from extproc.config import parse_config
from extproc.policy import Refusal, RequestContext, Shared, Stage, build_policy
from extproc.policy.spend import SpendStage, usd
from extproc.spend.budgets import Subject
from extproc.usage import Usage, estimate_prompt_tokens
from tests.test_exchange import CHAT, Run, body_msg, headers_msg, metadata, stream_frames

RATES = {"input": 10, "cached_input": 2, "output": 30, "reasoning": 40}  # micro-$ per token


def config(tmp_path: Path, **budgets: object):
    return parse_config(
        {
            "providers": {"mock": {"url": "http://127.0.0.1:1"}},
            "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
            "prices": {"models": [{"model": CHAT["model"], **RATES}]},
            "budgets": {
                "items": {"all": {"scope": "global", "limit_usd": "0.01", "period": "day"}},
                **budgets,
            },
            "ledger": {
                "url": f"sqlite:///{tmp_path / 'l.sqlite3'}",
                "journal_dir": str(tmp_path / "journal"),
            },
        },
        "test.yaml",
    )


class Refuser(Stage):
    """A later stage (a rate limit, say) that refuses after spend reserved."""

    async def on_request(self, ctx: RequestContext) -> None:
        raise Refusal(429, "no", "rate_limit_exceeded", kind="rate_limited")


def run_for(tmp_path: Path, *extra: Stage, **budgets: object) -> tuple[Run, SpendStage, Shared]:
    cfg = config(tmp_path, **budgets)
    shared = Shared()
    policy = build_policy(cfg, shared)
    if extra:
        policy = type(policy)(cfg, stages=(*policy.stages, *extra))
    run = Run(cfg)
    run.metrics = shared.metrics  # the stage counts into the worker's registry
    run.ex.policy = policy
    [stage] = [s for s in policy.stages if isinstance(s, SpendStage)]
    return run, stage, shared


def spent(stage: SpendStage) -> int:
    store = stage.store
    [check] = stage.planner.checks(Subject())
    return store.spent(check)


def rows(shared: Shared) -> list:
    return [row for row, _ in shared.spend.ledger._queue]


def test_a_stream_cut_short_is_charged_for_what_streamed(tmp_path):
    run, stage, shared = run_for(tmp_path)
    run.request({**CHAT, "stream": True, "max_tokens": 50})
    prompt = estimate_prompt_tokens(["hello there"])
    worst = prompt * 10 + 50 * 40  # the dearest input and output rates
    assert spent(stage) == worst
    run.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    for frame in stream_frames(8, usage=True)[:5]:  # role + 4 content deltas, then gone
        run.send(body_msg(frame, end=False, response=True))
    run.ex.close(1.0)
    exact = prompt * 10 + 4 * 30  # estimated: the prompt, one token per content delta
    assert spent(stage) == exact
    [row] = rows(shared)
    assert (row.status, row.reason, row.cost_micros) == ("aborted", "stream_aborted", exact)
    assert run.metric("ai_gateway_cost_usd_total", {
        "consumer": "anonymous", "team": "none", "model": CHAT["model"], "provider": "mock"
    }) == pytest.approx(exact / 1e6)  # fmt: skip


def test_a_complete_stream_settles_at_the_reported_usage_and_names_its_cost(tmp_path):
    run, stage, shared = run_for(tmp_path)
    run.request({**CHAT, "stream": True, "max_tokens": 50})
    run.respond(stream_frames(3, usage=True))
    # usage: prompt 11 (2 cached), completion 3 (1 reasoning)
    exact = 9 * 10 + 2 * 2 + 2 * 30 + 1 * 40
    assert spent(stage) == exact
    assert metadata(run.last)["cost_usd"] == usd(exact)
    sets = run.response_headers.response_headers.response.header_mutation.set_headers
    remaining = {h.header.key: h.header.raw_value for h in sets}
    left = int(remaining["x-ai-gateway-budget-remaining-usd"].replace(b".", b""))
    assert left == 10_000 - spent_worst(50)
    [row] = rows(shared)
    assert (row.status, row.reason, row.cost_micros, row.cached_tokens) == (
        "completed",
        "stop",
        exact,
        2,
    )


def spent_worst(max_tokens: int) -> int:
    return estimate_prompt_tokens(["hello there"]) * 10 + max_tokens * 40


def test_a_request_refused_after_the_reservation_is_refunded(tmp_path):
    run, stage, shared = run_for(tmp_path, Refuser())
    _, answer = run.request({**CHAT, "stream": True})
    assert answer.immediate_response.status.code == 429
    run.ex.close(1.0)
    assert spent(stage) == 0
    [row] = rows(shared)
    assert (row.status, row.cost_micros) == ("refused", 0)


def test_a_provider_error_costs_nothing(tmp_path):
    run, stage, shared = run_for(tmp_path)
    run.request({**CHAT, "stream": True, "max_tokens": 50})
    assert spent(stage) > 0
    run.send(headers_msg({":status": "503", "content-type": "application/json"}, response=True))
    run.send(body_msg(b'{"error": {}}', end=True, response=True))
    run.ex.close(1.0)
    assert spent(stage) == 0
    [row] = rows(shared)
    assert (row.status, row.reason, row.cost_micros) == ("error", "upstream_503", 0)


def test_over_budget_is_402_when_configured_naming_the_budget_and_reset(tmp_path):
    run, stage, shared = run_for(tmp_path, over_budget_status=402)
    _, answer = run.request({**CHAT, "max_tokens": 1000})  # worst case $0.04 > $0.01
    imm = answer.immediate_response
    assert imm.status.code == 402
    error = orjson.loads(imm.body)["error"]
    assert error["code"] == "budget_exceeded"
    assert "'all'" in error["message"] and "resets at" in error["message"]
    assert "more than the whole budget" in error["message"] and error["param"] == "max_tokens"
    sets = {h.header.key: h.header.raw_value for h in imm.headers.set_headers}
    assert int(sets["retry-after"]) > 0
    assert sets["x-ai-gateway-budget-remaining-usd"] == b"0.010000"
    run.ex.close(1.0)
    assert spent(stage) == 0
    assert rows(shared)[0].reason == "budget_exceeded"
    assert run.metric("ai_gateway_budget_decisions_total", {"budget": "all", "outcome": "exceeded"})


def test_a_json_answer_is_buffered_and_its_last_chunk_sets_the_cost_header(tmp_path):
    run, _, shared = run_for(tmp_path)
    run.request({**CHAT, "max_tokens": 20})
    answer = run.send(
        headers_msg({":status": "200", "content-type": "application/json"}, response=True)
    )
    assert answer.mode_override.response_body_mode == ProcessingMode.BUFFERED
    body = orjson.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 20, "total_tokens": 27},
        }
    )
    last = run.send(body_msg(body, end=True, response=True))
    common = last.response_body.response
    sets = {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers}
    assert sets["x-ai-gateway-cost-usd"] == usd(7 * 10 + 20 * 30).encode()
    assert not common.HasField("body_mutation")  # the body goes on as it came
    assert rows(shared)[0].reason == "length"


def test_jwt_team_claim_names_the_teams(tmp_path):
    cfg = parse_config(
        {
            "providers": {"mock": {"url": "http://127.0.0.1:1"}},
            "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
            "consumers": {"alice": {"keys": [{"value": "k" * 20}], "teams": ["research"]}},
            "auth": {"jwt": {"shared_secret_env": "S", "team_claim": "grp"}},
            "budgets": {
                "items": {"t": {"scope": "team", "match": "ops", "limit_usd": 1, "period": "day"}}
            },
        },
        "test.yaml",
    )
    stage = next(
        s for s in build_policy(cfg, Shared(), {"S": "x" * 32}).stages if isinstance(s, SpendStage)
    )
    run = Run(cfg)
    run.request(CHAT)
    ctx = run.ex.ctx
    ctx.consumer = "alice"
    assert stage._teams(ctx) == ("research",)  # no claim: the consumer's teams
    ctx.claims = {"grp": ["ops", "ops", 7, "sre"]}
    assert stage._teams(ctx) == ("ops", "sre")
    ctx.claims = {"grp": "ops"}
    assert stage._teams(ctx) == ("ops",)


def test_usd_is_exact():
    assert [usd(0), usd(1), usd(1_234_567), usd(-5)] == [
        "0.000000",
        "0.000001",
        "1.234567",
        "-0.000005",
    ]
    assert Usage().prompt_tokens == 0 and asyncio.iscoroutinefunction(SpendStage.on_request)


def test_a_hanging_soft_limit_webhook_never_holds_a_request():
    """notify() returns at once; the call gives up at its timeout and is counted."""
    from extproc.metrics import Metrics
    from extproc.policy.guards.webhook import _new_session
    from extproc.spend.runtime import SpendShared

    async def scenario() -> float:
        accepted = asyncio.Event()

        async def hang(reader, writer) -> None:
            accepted.set()
            await asyncio.sleep(30)

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        runtime = SpendShared(Metrics())
        session = _new_session()
        runtime.http = lambda: session
        runtime.notify(f"http://127.0.0.1:{port}/hook", 0.2, {"budget": "b"})
        assert len(runtime._tasks) == 1  # running beside, not awaited by the caller
        await accepted.wait()
        await asyncio.wait(set(runtime._tasks))
        await session.close()
        server.close()
        sample = runtime.metrics.registry.get_sample_value
        return sample("ai_gateway_budget_webhook_calls_total", {"outcome": "timeout"})

    assert asyncio.run(scenario()) == 1


DEAR = {"input": 20, "cached_input": 4, "output": 60, "reasoning": 80}  # the backup's rates


class FailsOver(Stage):
    """As the failover stage does: the first target named at the request, another one
    that may answer instead, and the answer's target replacing the provider and model."""

    def __init__(self, backup) -> None:
        self.backup = backup

    async def on_request(self, ctx: RequestContext) -> None:
        ctx.alternatives = (("backup", "dear-model"),)

    def on_response_headers(self, ctx: RequestContext) -> None:
        ctx.provider = self.backup
        ctx.info.model = "dear-model"


def test_failover_reserves_the_dearest_target_and_charges_the_one_that_answered(tmp_path):
    cfg = parse_config(
        {
            "providers": {
                "mock": {"url": "http://127.0.0.1:1"},
                "backup": {"url": "http://127.0.0.1:2"},
            },
            "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
            "prices": {
                "models": [
                    {"model": CHAT["model"], **RATES},
                    {"model": "dear-model", "provider": "backup", **DEAR},
                ]
            },
            "budgets": {
                "items": {"all": {"scope": "global", "limit_usd": "0.01", "period": "day"}}
            },
            "ledger": {
                "url": f"sqlite:///{tmp_path / 'f.sqlite3'}",
                "journal_dir": str(tmp_path / "journal-f"),
            },
        },
        "test.yaml",
    )
    shared = Shared()
    policy = build_policy(cfg, shared)
    policy = type(policy)(cfg, stages=(FailsOver(cfg.providers["backup"]), *policy.stages))
    run = Run(cfg)
    run.metrics = shared.metrics
    run.ex.policy = policy
    [stage] = [s for s in policy.stages if isinstance(s, SpendStage)]
    run.request({**CHAT, "stream": True, "max_tokens": 50})
    prompt = estimate_prompt_tokens(["hello there"])
    assert spent(stage) == prompt * 20 + 50 * 80  # the backup's worst case, not the first's
    run.respond(stream_frames(3, usage=True))
    # usage: prompt 11 (2 cached), completion 3 (1 reasoning), at the backup's rates
    exact = 9 * 20 + 2 * 4 + 2 * 60 + 1 * 80
    assert spent(stage) == exact
    assert metadata(run.last)["cost_usd"] == usd(exact)
    [row] = rows(shared)
    assert (row.provider, row.model, row.cost_micros) == ("backup", "dear-model", exact)
