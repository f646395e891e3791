"""Webhook guards over JSON/HTTP and over gRPC: pass, mask, reject, and what a failure
does (open: through unchanged; closed: 503), against real servers on loopback."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import orjson
import pytest
from aiohttp import web

from extproc._gen import guard_pb2, guard_pb2_grpc
from extproc.config import GuardConfig, GuardsConfig, GuardWebhookConfig
from extproc.metrics import Metrics
from extproc.policy import Refusal, RequestContext, Shared
from extproc.policy import guards as guards_module
from extproc.policy.guards import detectors as det
from extproc.providers import format_for
from tests.conftest import free_port
from tests.test_exchange import CONFIG

BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My email is a@example.com, say hi"},
    ],
}


class Checker:
    """A webhook service whose answer the test sets."""

    def __init__(self) -> None:
        self.answer: dict = {"action": "pass"}
        self.status = 200
        self.delay = 0.0
        self.seen: list[dict] = []
        self.headers: list[dict] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(await request.json())
        self.headers.append(dict(request.headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response(self.answer, status=self.status)


@pytest.fixture
async def checker():
    check = Checker()
    app = web.Application()
    app.router.add_post("/check", check.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    check.url = f"http://127.0.0.1:{port}/check"
    yield check
    await runner.cleanup()


class GrpcChecker(guard_pb2_grpc.GuardServiceServicer):
    def __init__(self) -> None:
        self.answer = guard_pb2.CheckResponse(action=guard_pb2.CheckResponse.PASS)
        self.delay = 0.0
        self.seen: list[guard_pb2.CheckRequest] = []
        self.metadata: list[dict] = []

    async def Check(self, request, context):  # the generated method name
        self.seen.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answer


@pytest.fixture
async def grpc_checker():
    check = GrpcChecker()
    server = grpc.aio.server()
    guard_pb2_grpc.add_GuardServiceServicer_to_server(check, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    check.url = f"grpc://127.0.0.1:{port}"
    yield check
    await server.stop(None)


class Harness:
    def __init__(self, *rules: GuardConfig, environ: dict[str, str] | None = None) -> None:
        self.metrics = Metrics()
        self.shared = Shared(self.metrics)
        config = replace(CONFIG, guards=GuardsConfig(rules=rules))
        self.stage = guards_module.build(config, self.shared, environ or {})
        self.config = config

    async def request(self, body: dict = BODY, consumer: str = "team-a") -> RequestContext:
        route = self.config.routes[1]
        fmt = format_for("openai")
        ctx = RequestContext(
            route=route,
            provider=self.config.providers["mock"],
            format=fmt,
            method="POST",
            path="/v1/chat/completions",
            upstream_path="/v1/chat/completions",
            headers={},
            consumer=consumer,
        )
        ctx.info = fmt.parse_request(orjson.dumps(body))
        await self.stage.on_request(ctx)
        return ctx

    async def close(self) -> None:
        session = self.shared.guards_http
        if session is not None:
            await session.close()

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def hook(url: str, **kw) -> GuardConfig:
    # The default timeout (500 ms) includes the first connect: on a loaded machine a
    # test of a working service must not turn into a timeout test. Those set 50 ms.
    kw.setdefault("timeout_ms", 10_000)
    return GuardConfig(
        name="moderation", webhook=GuardWebhookConfig(url=url, **kw), phases=("request",)
    )


async def test_http_pass_sends_the_contract(checker):
    h = Harness(hook(checker.url, api_key_env="HOOK_KEY"), environ={"HOOK_KEY": "s3cret"})
    ctx = await h.request()
    await h.close()
    assert not ctx.body_dirty
    assert checker.seen == [
        {
            "guard": "moderation",
            "phase": "request",
            "route": "v1",
            "consumer": "team-a",
            "model": "gpt-4o-mini",
            "texts": ["Be brief.", "My email is a@example.com, say hi"],
        }
    ]
    assert checker.headers[0]["Authorization"] == "Bearer s3cret"
    assert h.metric("ai_gateway_guard_webhook_calls_total", guard="moderation", outcome="pass") == 1


async def test_http_mask_rewrites_the_request(checker):
    checker.answer = {"action": "mask", "texts": ["Be brief.", "My email is [hidden], say hi"]}
    h = Harness(hook(checker.url))
    ctx = await h.request()
    await h.close()
    assert ctx.body_dirty
    assert ctx.info.body["messages"][1]["content"] == "My email is [hidden], say hi"


async def test_local_guards_run_first_and_the_webhook_sees_masked_text(checker):
    local = GuardConfig(name="pii", detectors=tuple(det.expand(["email"])))
    h = Harness(local, hook(checker.url))
    ctx = await h.request()
    await h.close()
    assert checker.seen[0]["texts"][1] == "My email is <EMAIL>, say hi"
    assert ctx.info.body["messages"][1]["content"] == "My email is <EMAIL>, say hi"


async def test_http_reject_refuses_with_the_guard_settings(checker):
    checker.answer = {"action": "reject", "reason": "toxic"}
    h = Harness(hook(checker.url))
    with pytest.raises(Refusal) as refused:
        await h.request()
    await h.close()
    assert refused.value.status == 403 and refused.value.code == "guard_blocked"
    assert "moderation" in refused.value.message and "toxic" not in refused.value.message


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        ({"action": "mask", "texts": ["only one"]}, 200),  # wrong count
        ({"action": "maybe"}, 200),
        ({"action": "pass"}, 500),
        ([1, 2], 200),
    ],
)
async def test_bad_answers_fail_closed_by_default(checker, answer, status):
    checker.answer, checker.status = answer, status
    h = Harness(hook(checker.url))
    with pytest.raises(Refusal) as refused:
        await h.request()
    await h.close()
    assert refused.value.status == 503 and refused.value.code == "guard_unavailable"
    assert h.metric("ai_gateway_guard_webhook_calls_total", guard="moderation", outcome="error")


async def test_timeout_fails_open_or_closed(checker):
    checker.delay = 1.0
    h = Harness(hook(checker.url, timeout_ms=50, failure="open"))
    ctx = await h.request()
    assert not ctx.body_dirty
    assert h.metric("ai_gateway_guard_webhook_calls_total", guard="moderation", outcome="timeout")
    await h.close()
    h = Harness(hook(checker.url, timeout_ms=50))
    with pytest.raises(Refusal) as refused:
        await h.request()
    await h.close()
    assert refused.value.status == 503


async def test_unreachable_service_fails_per_mode():
    url = f"http://127.0.0.1:{free_port()}/check"
    h = Harness(hook(url, failure="open"))
    ctx = await h.request()
    await h.close()
    assert not ctx.body_dirty


async def test_grpc_mask_reject_and_deadline(grpc_checker):
    grpc_checker.answer = guard_pb2.CheckResponse(
        action=guard_pb2.CheckResponse.MASK, texts=["Be brief.", "hidden"]
    )
    h = Harness(hook(grpc_checker.url, api_key_env="K"), environ={"K": "tok"})
    ctx = await h.request()
    assert ctx.info.body["messages"][1]["content"] == "hidden"
    sent = grpc_checker.seen[0]
    assert (sent.guard, sent.route, sent.consumer, sent.model) == (
        "moderation",
        "v1",
        "team-a",
        "gpt-4o-mini",
    )
    assert list(sent.texts) == ["Be brief.", "My email is a@example.com, say hi"]
    assert grpc_checker.metadata[0]["authorization"] == "Bearer tok"

    grpc_checker.answer = guard_pb2.CheckResponse(action=guard_pb2.CheckResponse.REJECT)
    with pytest.raises(Refusal) as refused:
        await h.request()
    assert refused.value.status == 403

    grpc_checker.delay = 1.0
    h = Harness(hook(grpc_checker.url, timeout_ms=50))
    with pytest.raises(Refusal) as refused:
        await h.request()
    assert refused.value.status == 503
    assert h.metric("ai_gateway_guard_webhook_calls_total", guard="moderation", outcome="timeout")


def test_documented_contract_matches_the_proto_and_what_is_sent():
    from pathlib import Path

    import yaml

    doc = yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "docs" / "guard-webhook.openapi.yaml").read_text()
    )
    schemas = doc["components"]["schemas"]
    request_fields = set(guard_pb2.CheckRequest.DESCRIPTOR.fields_by_name)
    assert set(schemas["CheckRequest"]["properties"]) == request_fields
    assert set(schemas["CheckRequest"]["required"]) == request_fields
    assert set(schemas["CheckResponse"]["properties"]) == set(
        guard_pb2.CheckResponse.DESCRIPTOR.fields_by_name
    )
    actions = {v.name.lower() for v in guard_pb2.CheckResponse.Action.DESCRIPTOR.values}
    assert set(schemas["CheckResponse"]["properties"]["action"]["enum"]) == actions - {
        "action_unspecified"
    }
