"""Model policy without Envoy: allow-lists (route, consumer, JWT claim), aliases and the
body rewrite, provider switch by alias, default model, the `/v1/models` answer, and the
Envoy routes that let one listener serve several providers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.bootstrap import render_bootstrap
from extproc.config import parse_config
from extproc.policy import Shared, build_policy
from extproc.policy.models import Allow, ModelStage, build, claim_models
from extproc.policy.stage import Refusal, RequestContext
from extproc.providers.base import RequestInfo
from tests.test_bootstrap import hcm_of, render_to, validate
from tests.test_exchange import CHAT, Run, body_msg, headers_msg, metadata

PROVIDERS = {
    "mock": {"url": "http://127.0.0.1:1", "api_key_env": "MOCK_KEY"},
    "backup": {"url": "http://127.0.0.1:2", "api_key_env": "BACKUP_KEY"},
}
ROUTES = [
    {"name": "openai", "prefix": "/openai", "provider": "mock",
     "rewrite": "/v1/chat/completions", "auth": "off", "models": ["gpt-3.5-turbo"]},
    {"name": "v1", "prefix": "/v1/", "provider": "mock"},
]  # fmt: skip
MODELS = {
    "aliases": {
        "my-gpt4-mini": {"provider": "mock", "model": "gpt-4o-mini"},
        "cheap": {"provider": "backup", "model": "llama-3-8b"},
    },
    "catalog": ["gpt-3.5-turbo", "gpt-4o-mini", "gpt-4o"],
}
CONSUMERS = {
    "team-a": {"keys": [{"value": "key-a"}], "models": ["my-gpt4-mini", "gpt-4o*"]},
    "team-b": {"keys": [{"value": "key-b"}]},
}
ENV = {"MOCK_KEY": "sk-mock", "BACKUP_KEY": "sk-backup"}


def config_of(**sections: Any):
    doc = {"providers": PROVIDERS, "routes": ROUTES, "consumers": CONSUMERS, "models": MODELS}
    doc.update(sections)
    return parse_config(doc, "test.yaml")


def run_for(config, key: str | None, path="/v1/chat/completions", route="v1", method="POST"):
    run = Run(config)
    run.ex.policy = build_policy(config, Shared(), ENV)
    headers = {":method": method, ":path": path, "content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    r1 = run.send(headers_msg(headers, route=route))
    return run, r1


def post(config, key: str | None, body: dict[str, Any], **where: str):
    run, r1 = run_for(config, key, **where)
    assert r1.HasField("request_headers"), r1
    return run, run.send(body_msg(orjson.dumps(body)))


def sets_of(mutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def error_of(resp) -> tuple[int, dict[str, Any]]:
    imm = resp.immediate_response
    return imm.status.code, orjson.loads(imm.body)["error"]


def test_alias_rewrites_the_body_for_the_same_provider():
    _, r2 = post(config_of(), "key-a", {**CHAT, "model": "my-gpt4-mini"})
    common = r2.request_body.response
    assert orjson.loads(common.body_mutation.body)["model"] == "gpt-4o-mini"
    sets = sets_of(common.header_mutation)
    assert sets["x-ai-gateway-model"] == "gpt-4o-mini"
    assert sets["x-ai-gateway-provider"] == "mock"
    assert not common.clear_route_cache  # same provider: the route stands
    assert metadata(r2)["model"] == "gpt-4o-mini" and metadata(r2)["consumer"] == "team-a"


def test_alias_on_another_provider_reroutes_with_its_credential():
    run, r2 = post(config_of(), "key-b", {**CHAT, "model": "cheap"})
    common = r2.request_body.response
    assert common.clear_route_cache
    sets = sets_of(common.header_mutation)
    assert sets["x-ai-gateway-provider"] == "backup"
    assert sets["authorization"] == "Bearer sk-backup"
    assert orjson.loads(common.body_mutation.body)["model"] == "llama-3-8b"
    assert run.ex.ctx.provider.name == "backup"
    assert "sk-mock" not in str(r2)


def test_switch_to_a_provider_with_another_header_drops_the_first_credential():
    class AzureLike:
        name = "openai"
        credential_headers = ("api-key",)

        @staticmethod
        def upstream_auth(key: str) -> list[tuple[str, str]]:
            return [("api-key", key)]

    config = config_of()
    stage = ModelStage(config, {"mock": "sk-mock", "backup": "sk-backup"})
    ctx = RequestContext(
        route=config.routes[1],
        provider=config.providers["mock"],
        format=AzureLike,  # type: ignore[arg-type]
        method="POST",
        path="/v1/chat/completions",
        upstream_path="/v1/chat/completions",
        headers={},
        consumer="team-b",
    )
    ctx.info = RequestInfo(model="cheap", stream=False, body={**CHAT, "model": "cheap"})
    asyncio.run(stage.on_request(ctx))
    assert ctx.upstream_headers["api-key"] == "sk-backup"
    assert "authorization" not in ctx.upstream_headers


@pytest.mark.parametrize(
    ("key", "model", "status", "code", "says"),
    [
        ("key-a", "nope", 404, "model_not_found", "The model 'nope' does not exist"),
        ("key-a", "gpt-3.5-turbo", 403, "model_not_allowed",
         "The model 'gpt-3.5-turbo' is not allowed for the consumer 'team-a'"),
        ("key-a", "cheap", 403, "model_not_allowed", "'cheap'"),
        ("key-b", "my-gpt4-mnii", 404, "model_not_found", "'my-gpt4-mnii'"),
    ],
)  # fmt: skip
def test_unknown_and_forbidden_models(key, model, status, code, says):
    _, r2 = post(config_of(), key, {**CHAT, "model": model})
    got, error = error_of(r2)
    assert got == status and error["code"] == code and error["param"] == "model"
    assert says in error["message"]


def test_allow_list_matches_alias_real_name_and_wildcards():
    # team-a may use gpt-4o* and the alias; gpt-4o-mini directly too (the alias's model).
    for model in ("gpt-4o", "gpt-4o-mini", "my-gpt4-mini"):
        _, r2 = post(config_of(), "key-a", {**CHAT, "model": model})
        assert r2.HasField("request_body"), (model, r2)
    assert Allow(["a*", "b"]).allows("abc") and not Allow(["a*"]).allows("ba")


def test_route_allow_list_applies_to_anonymous_callers():
    _, r2 = post(config_of(), None, CHAT, path="/openai", route="openai")
    assert r2.HasField("request_body")
    _, r2 = post(config_of(), None, {**CHAT, "model": "gpt-4o"}, path="/openai", route="openai")
    status, error = error_of(r2)
    assert status == 403 and "anonymous callers" in error["message"]


def test_jwt_models_claim_narrows_access():
    config = config_of(auth={"jwt": {"jwks_file": "/x.json", "models_claim": "models"}})
    stage = ModelStage(config, {})

    def ctx_with(claims: dict[str, Any], consumer: str = "robot") -> RequestContext:
        ctx = RequestContext(
            route=config.routes[1],
            provider=config.providers["mock"],
            format=object,  # type: ignore[arg-type]
            method="POST",
            path="/v1/chat/completions",
            upstream_path="/v1/chat/completions",
            headers={},
            consumer=consumer,
            claims=claims,
        )
        ctx.info = RequestInfo(model="gpt-4o", stream=False, body={**CHAT, "model": "gpt-4o"})
        return ctx

    asyncio.run(stage.on_request(ctx_with({"models": "gpt-4o gpt-4o-mini"})))
    asyncio.run(stage.on_request(ctx_with({})))  # no claim: no claim-based limit
    for claims in ({"models": ["gpt-4o-mini"]}, {"models": 42}):
        with pytest.raises(Refusal) as info:
            asyncio.run(stage.on_request(ctx_with(claims)))
        assert info.value.status == 403
    # A declared consumer's own list still applies on top of the claim.
    ctx = _with_model(ctx_with({"models": ["*"]}, consumer="team-a"), "cheap")
    with pytest.raises(Refusal):
        asyncio.run(stage.on_request(ctx))
    assert claim_models(["a", 3]).exact == {"a"}


def _with_model(ctx: RequestContext, model: str) -> RequestContext:
    assert ctx.info is not None
    ctx.info.model = model
    ctx.info.body["model"] = model
    return ctx


def test_default_model_fills_a_request_without_one():
    routes = [ROUTES[0], {**ROUTES[1], "default_model": "my-gpt4-mini"}]
    config = config_of(routes=routes, models={**MODELS, "default": "gpt-4o"})
    stage = ModelStage(config, {})
    for route, expected in ((config.routes[1], "gpt-4o-mini"), (config.routes[0], "gpt-4o")):
        ctx = RequestContext(
            route=route,
            provider=config.providers["mock"],
            format=object,  # type: ignore[arg-type]
            method="POST",
            path="/x",
            upstream_path="/v1/chat/completions",
            headers={},
            consumer="team-b",
        )
        ctx.info = RequestInfo(model="", stream=False, body={"messages": CHAT["messages"]})
        if route.name == "openai":
            with pytest.raises(Refusal) as info:  # the route's own allow-list still applies
                asyncio.run(stage.on_request(ctx))
            assert info.value.status == 403
            continue
        asyncio.run(stage.on_request(ctx))
        assert ctx.info.body["model"] == expected and ctx.body_dirty


def test_v1_models_lists_only_what_the_caller_may_use():
    run, r1 = run_for(config_of(), "key-a", path="/v1/models", method="GET")
    imm = r1.immediate_response
    assert imm.status.code == 200
    listing = orjson.loads(imm.body)
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["gpt-4o", "gpt-4o-mini", "my-gpt4-mini"]
    assert all(m["object"] == "model" for m in listing["data"])
    run.ex.close(1.0)
    assert run.metric("ai_gateway_errors_total", {"kind": "models"}) == 0

    _, r1 = run_for(config_of(), "key-b", path="/v1/models", method="GET")
    ids = [m["id"] for m in orjson.loads(r1.immediate_response.body)["data"]]
    assert ids == ["cheap", "gpt-3.5-turbo", "gpt-4o", "gpt-4o-mini", "my-gpt4-mini"]

    _, r1 = run_for(config_of(), "key-a", path="/v1/models/my-gpt4-mini", method="GET")
    assert orjson.loads(r1.immediate_response.body)["id"] == "my-gpt4-mini"
    _, r1 = run_for(config_of(), "key-a", path="/v1/models/cheap", method="GET")
    assert error_of(r1)[0] == 404  # exists, but not for this caller: not revealed

    _, r1 = run_for(config_of(), None, path="/v1/models", method="GET")
    assert r1.immediate_response.status.code == 401  # the route requires a key first


def test_alias_of_another_wire_format_without_a_translator_is_not_served_on_this_route():
    providers = {**PROVIDERS, "other": {"url": "http://127.0.0.1:3", "format": "openai"}}
    config = config_of(providers=providers)
    # Pretend "other" speaks another API: a format mismatch makes the alias unknown here
    # when no translator takes the client's API there (OpenAI Responses -> Anthropic).
    object.__setattr__(config.providers["other"], "format", "anthropic")
    object.__setattr__(config.models.aliases["cheap"], "provider", "other")
    _, r2 = post(config, "key-b", {"model": "cheap", "input": "hi"}, path="/v1/responses")
    assert error_of(r2)[0] == 404


def test_no_model_policy_means_no_stage():
    bare = parse_config({"providers": PROVIDERS, "routes": ROUTES[1:]}, "t.yaml")
    assert build(bare, Shared(), {}) is None


# --------------------------------------------------------------------------- Envoy routes


def test_routes_dispatch_on_the_provider_header(tmp_path: Path):
    config = config_of()
    boot = render_bootstrap(config)
    routes = hcm_of(boot)["route_config"]["virtual_hosts"][0]["routes"]
    v1 = [r for r in routes if r.get("name") == "v1"]
    assert [r["route"]["cluster"] for r in v1] == ["provider_backup", "provider_mock"]
    assert v1[0]["match"]["headers"] == [
        {"name": "x-ai-gateway-provider", "string_match": {"exact": "backup"}}
    ]
    assert v1[0]["route"]["host_rewrite_literal"] == "127.0.0.1:2"
    assert "headers" not in v1[1]["match"]
    for route in v1:
        assert set(route["request_headers_to_remove"]) == {
            "x-ai-gateway-provider",
            "x-ai-gateway-consumer",
            "x-ai-gateway-model",
            "x-ai-gateway-translated",
            "x-ai-gateway-exchange",  # the off-path meter's correlation token
        }
    clusters = {c["name"] for c in boot["static_resources"]["clusters"]}
    assert {"provider_mock", "provider_backup"} <= clusters
    validate(render_to(tmp_path, config))


def test_alias_is_not_served_where_the_model_is_in_the_path():
    config = config_of()
    stage = ModelStage(config, {})
    ctx = RequestContext(
        route=config.routes[1],
        provider=config.providers["mock"],
        format=object,  # type: ignore[arg-type]
        method="POST",
        path="/v1/models/my-gpt4-mini:generateContent",
        upstream_path="/v1/models/my-gpt4-mini:generateContent",
        headers={},
        consumer="team-b",
    )
    ctx.info = RequestInfo(model="my-gpt4-mini", stream=False, body={"contents": []})
    with pytest.raises(Refusal) as info:
        asyncio.run(stage.on_request(ctx))
    assert info.value.status == 404 and "model" not in ctx.info.body
    ctx.info = RequestInfo(model="gpt-4o", stream=False, body={"contents": []})
    asyncio.run(stage.on_request(ctx))  # a real name is checked and passes as is
    assert not ctx.body_dirty


def test_catalog_per_provider_leaves_others_open():
    models = {**MODELS, "catalog": {"mock": ["gpt-4o-mini"]}}
    routes = [*ROUTES[1:], {"name": "b", "prefix": "/b/", "provider": "backup"}]
    config = config_of(models=models, routes=routes)
    _, r2 = post(config, "key-b", {**CHAT, "model": "gpt-4o"})
    assert error_of(r2)[0] == 404  # mock has a catalog without it
    _, r2 = post(
        config,
        "key-b",
        {**CHAT, "model": "anything-goes"},
        path="/b/v1/chat/completions",
        route="b",
    )
    assert r2.HasField("request_body")  # backup has none: any name is sent as is
    with pytest.raises(Exception, match="unknown provider 'nope'"):
        config_of(models={"catalog": {"nope": ["x"]}})
