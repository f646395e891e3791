"""Failover without Envoy running: the config's refusals, the rendered clusters and
routes (checked by Envoy's validate mode), the circuit state, one upstream attempt
message by message, and the provider quota charged to the target that answered."""

from __future__ import annotations

import asyncio
import contextlib
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.bootstrap import render_bootstrap
from extproc.config import ConfigError, parse_config
from extproc.failover.attempt import Attempt
from extproc.failover.plan import (
    TARGET_HEADER,
    Circuits,
    Target,
    cluster_name,
    failover_aliases,
)
from extproc.failover.stage import FailoverStage
from extproc.policy import Shared, build_policy
from extproc.policy.stage import Refusal
from extproc.usage import Usage
from tests.test_bootstrap import render_to, validate
from tests.test_exchange import body_msg, headers_msg
from tests.test_models_policy import ENV, post

PROVIDERS = {
    "mock": {"url": "http://127.0.0.1:1", "api_key_env": "MOCK_KEY"},
    "backup": {
        "url": "http://127.0.0.1:2",
        "api_key_env": "BACKUP_KEY",
        "limits": {"requests": 1, "window": "1h"},
    },
    "cloud": {"url": "https://api.example.com"},
    "claude": {"url": "http://127.0.0.1:3", "format": "anthropic"},
}
ROUTES = [
    {"name": "v1", "prefix": "/v1/", "provider": "mock"},
    {"name": "anthropic", "prefix": "/anthropic/", "provider": "claude", "rewrite": "/"},
]
ORDERED = {
    "targets": [{"provider": "mock", "model": "m-a"}, {"provider": "backup", "model": "m-b"}]
}
SPLIT = {
    "targets": [
        {"provider": "mock", "model": "m-a", "weight": 70},
        {"provider": "cloud", "model": "m-c", "weight": 30},
    ]
}


def config_of(aliases: dict[str, Any] | None = None, **models: Any):
    doc = {
        "providers": PROVIDERS,
        "routes": ROUTES,
        "models": {"aliases": aliases or {"fo": ORDERED, "split": SPLIT}, **models},
    }
    return parse_config(doc, "test.yaml")


def problems(aliases: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_of(aliases)
    return caught.value.lines()


# -- config --------------------------------------------------------------------------


def test_targets_and_provider_model_are_mutually_exclusive():
    lines = problems({"x": {"provider": "mock", "model": "m", "targets": ORDERED["targets"]}})
    assert lines == [
        "test.yaml: models.aliases.x.provider: set provider/model or targets, not both "
        "(targets name their own provider and model)"
    ]


@pytest.mark.parametrize(
    ("alias", "where", "says"),
    [
        ({}, "models.aliases.x", "set provider and model, or targets"),
        ({"provider": "mock"}, "models.aliases.x", "set provider and model, or targets"),
        ({"targets": []}, "models.aliases.x.targets", "non-empty list"),
        (
            {"targets": [{"provider": "mock", "model": "a", "weight": 2},
                         {"provider": "mock", "model": "b"}]},
            "models.aliases.x.targets[1]",
            "set weight on every target or on none",
        ),
        ({"targets": [{"provider": "mock", "model": "a"}] * 5},
         "models.aliases.x.targets", "at most 4"),
        (
            {"targets": [{"provider": "nope", "model": "a"}]},
            "models.aliases.x.targets[0].provider",
            "unknown provider 'nope'",
        ),
    ],
)  # fmt: skip
def test_bad_targets_are_refused_where_they_are(alias, where, says):
    lines = problems({"x": alias})
    assert any(line.startswith(f"test.yaml: {where}: ") and says in line for line in lines), lines


def test_failover_settings_and_provider_limits_are_checked():
    with pytest.raises(ConfigError) as caught:
        config_of(failover={"retry_statuses": [503, 200], "skip_seconds": 0})
    lines = caught.value.lines()
    assert any("models.failover.retry_statuses" in line and "200" in line for line in lines)
    assert any("models.failover.skip_seconds" in line for line in lines)
    doc = {"providers": {"p": {"url": "http://127.0.0.1:1", "limits": {}}}, "routes": ROUTES[:1]}
    doc["routes"] = [{"name": "v1", "prefix": "/v1/", "provider": "p"}]
    with pytest.raises(ConfigError) as caught:
        parse_config(doc, "test.yaml")
    assert "set requests, tokens or both" in "\n".join(caught.value.lines())


# -- bootstrap --------------------------------------------------------------------------


def _cluster(bootstrap: dict, name: str) -> dict:
    return next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name)


def test_one_cluster_per_target_set_in_order_or_by_weight(tmp_path: Path):
    config = config_of()
    bootstrap = render_bootstrap(config)
    names = {c["name"] for c in bootstrap["static_resources"]["clusters"]}
    assert {cluster_name("fo", m) for m in (1, 2, 3)} <= names
    both = _cluster(bootstrap, cluster_name("fo", 3))["load_assignment"]["endpoints"]
    assert [g["priority"] for g in both] == [0, 1]  # an order: one priority per place
    ports = [g["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] for g in both]
    assert [p["port_value"] for p in ports] == [1, 2]
    second = _cluster(bootstrap, cluster_name("fo", 2))["load_assignment"]["endpoints"]
    assert len(second) == 1 and second[0]["priority"] == 0  # the first target skipped
    split = _cluster(bootstrap, cluster_name("split", 3))
    (group,) = split["load_assignment"]["endpoints"]
    assert [e["load_balancing_weight"] for e in group["lb_endpoints"]] == [70, 30]
    # The https target: TLS with its own SNI, matched by endpoint metadata.
    assert split["type"] == "STRICT_DNS"
    (match,) = split["transport_socket_matches"]
    assert match["match"] == {"provider": "cloud"}
    tls = match["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.example.com"
    assert split["lb_policy"] == "ROUND_ROBIN"
    validate(render_to(tmp_path, config))  # Envoy 1.40 accepts all of it


def test_a_split_may_choose_the_least_loaded_target(tmp_path: Path):
    config = config_of(failover={"balance": "least_request"})
    split = _cluster(render_bootstrap(config), cluster_name("split", 3))
    assert split["lb_policy"] == "LEAST_REQUEST"
    validate(render_to(tmp_path, config))


def test_routes_follow_the_sidecars_header_and_retry_once_per_target():
    bootstrap = render_bootstrap(config_of())
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    vhost = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
    routes = {
        r["match"]["headers"][0]["string_match"]["exact"]: r
        for r in vhost["routes"]
        if r.get("match", {}).get("headers")
        and r["match"]["headers"][0]["name"] == "x-ai-gateway-failover"
    }
    # The OpenAI route, and the Anthropic one (its Messages clients reach OpenAI-format
    # targets through the translator).
    assert set(routes) == {
        f"{r}/{a}/{m}" for r in ("v1", "anthropic") for a in ("fo", "split") for m in (1, 2, 3)
    }
    both = routes["v1/fo/3"]["route"]
    assert both["cluster"] == cluster_name("fo", 3) and both["auto_host_rewrite"] is True
    assert both["retry_policy"]["num_retries"] == 1
    assert routes["v1/fo/1"]["route"]["retry_policy"]["num_retries"] == 0
    assert 529 in both["retry_policy"]["retriable_status_codes"]
    assert vhost["include_request_attempt_count"] is True


def test_cluster_names_stay_safe_and_distinct_for_any_alias():
    assert cluster_name("chat-default", 3) == "failover_chat-default_3"
    odd = {cluster_name(name, 1) for name in ("gpt 4/o", "gpt 4:o", "gpt_4_o")}
    assert len(odd) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in odd)


# -- circuits ---------------------------------------------------------------------------


def test_a_circuit_opens_after_consecutive_failures_and_closes_after_its_pause():
    circuits = Circuits(failures_to_skip=2, skip_seconds=10)
    target = Target("fo", 0, "mock", "m", None)
    assert not circuits.record(target, False, now=0)
    assert circuits.usable(target, now=0)
    assert circuits.record(target, True, now=1) is False  # a success clears the count
    circuits.record(target, False, now=2)
    assert circuits.record(target, False, now=3)  # two in a row: opened
    assert not circuits.usable(target, now=12.9)
    assert circuits.usable(target, now=13)  # its pause is over: tried again
    assert circuits.record(target, False, now=13)  # one more failure skips it again
    assert not circuits.usable(target, now=14)
    circuits.record(target, True, now=30)
    assert circuits.usable(target, now=30) and not circuits.state


# -- one upstream attempt ---------------------------------------------------------------


def _attempt_headers(alias: str, index: int, headers: dict[str, str]) -> pb.ProcessingRequest:
    message = headers_msg(headers, route="v1")
    # As Envoy sends the attribute: the endpoint's Metadata in protobuf text format.
    text = (
        'filter_metadata { key: "ai_gateway" value { fields { key: "alias" value { '
        f'string_value: "{alias}" }} }} fields {{ key: "target" value {{ '
        f"number_value: {index} }} }} }} }}"
    )
    attrs = struct_pb2.Struct()
    attrs.update({"xds.upstream_host_metadata": text})
    message.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return message


def _sets(mutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def test_an_attempt_gets_its_targets_credential_model_and_marker():
    policy = build_policy(config_of(), Shared(), ENV)
    attempt = Attempt(policy, policy_metrics(policy))
    headers = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "authorization": "Bearer sk-mock",  # what the router-level stream set
        "x-envoy-attempt-count": "2",
    }
    first = attempt.on(_attempt_headers("fo", 1, headers))
    mutation = first.request_headers.response.header_mutation
    assert set(mutation.remove_headers) >= {"x-envoy-attempt-count", "x-envoy-original-host"}
    body = attempt.on(body_msg(orjson.dumps({"model": "m-a", "messages": []})))
    common = body.request_body.response
    assert orjson.loads(common.body_mutation.body)["model"] == "m-b"
    sets = _sets(common.header_mutation)
    assert sets["content-length"] == str(len(common.body_mutation.body))
    assert sets["authorization"] == "Bearer sk-backup"
    answer = pb.ProcessingRequest()
    answer.response_headers.headers.headers.add(key=":status", raw_value=b"503")
    marked = attempt.on(answer).response_headers.response.header_mutation
    assert _sets(marked) == {TARGET_HEADER: "1;2"}
    assert attempt.outcome == "status_503"


def test_an_attempt_without_a_response_counts_as_no_response():
    policy = build_policy(config_of(), Shared(), ENV)
    metrics = policy_metrics(policy)
    attempt = Attempt(policy, metrics)
    attempt.on(_attempt_headers("fo", 0, {":method": "POST", ":path": "/v1/chat/completions"}))
    attempt.close()
    sample = metrics.failover_attempts.labels("fo", "mock/m-a", "no_response")._value.get()
    assert sample == 1


def policy_metrics(policy):
    stage = next(s for s in policy.stages if isinstance(s, FailoverStage))
    return stage.metrics


# -- the router-level stage ---------------------------------------------------------------


def test_the_request_goes_to_the_route_of_its_usable_targets():
    config = config_of()
    _, r2 = post_as(config, {"model": "fo", "messages": [{"role": "user", "content": "hi"}]})
    common = r2.request_body.response
    assert _sets(common.header_mutation)["x-ai-gateway-failover"] == "v1/fo/3"
    assert common.clear_route_cache
    assert orjson.loads(common.body_mutation.body)["model"] == "m-a"


def post_as(config, body):
    run, response = post(config, None, body)
    return run, response


def test_quota_is_charged_to_the_target_that_answered_and_refunded_otherwise():
    config = config_of()
    stage = next(
        s for s in build_policy(config, Shared(), ENV).stages if isinstance(s, FailoverStage)
    )
    quota = stage.quotas["backup"]  # 1 request an hour

    async def one(answered_index: int | None, status: int) -> None:
        ctx = _ctx(config)
        ctx.scratch["failover_alias"] = "fo"
        await stage.on_request(ctx)
        ctx.status = status
        if answered_index is not None:
            ctx.upstream_response = {TARGET_HEADER: f"{answered_index};1"}
        with contextlib.suppress(Refusal):  # every target failed: the 503
            stage.on_response_headers(ctx)
        pending = stage.on_complete(ctx, Usage(), True)
        if pending is not None:
            await pending

    async def admitted() -> bool:
        outcome = await stage.store.acquire(quota.keys, quota.rates, quota.costs(1, 1))
        if outcome.admitted:
            stage.store.settle(quota.keys, quota.rates, quota.costs(-1, -1))
        return outcome.admitted

    async def scenario() -> None:
        await one(0, 200)  # `mock` answered: backup's reservation is refunded
        assert await admitted()
        await one(1, 200)  # `backup` answered: its one request an hour is used
        assert not await admitted()

    asyncio.run(scenario())


def _ctx(config):
    from extproc.policy.stage import RequestContext
    from extproc.providers import format_for

    return RequestContext(
        route=config.routes[0],
        provider=config.providers["mock"],
        format=format_for("openai"),
        method="POST",
        path="/v1/chat/completions",
        upstream_path="/v1/chat/completions",
        headers={},
    )


def test_every_target_skipped_is_a_503_naming_the_alias():
    config = config_of(failover={"failures_to_skip": 1})
    stage = next(
        s for s in build_policy(config, Shared(), ENV).stages if isinstance(s, FailoverStage)
    )
    for target in failover_aliases(config)["fo"]:
        stage.circuits.record(target, False, stage.clock())
    ctx = _ctx(config)
    ctx.scratch["failover_alias"] = "fo"
    with pytest.raises(Refusal) as caught:
        asyncio.run(stage.on_request(ctx))
    assert caught.value.status == 503 and "'fo'" in caught.value.message


def test_an_attempt_to_a_provider_without_a_key_carries_no_credential():
    """The router-level stream set the route provider's key: it must not reach another."""
    policy = build_policy(config_of(), Shared(), ENV)
    attempt = Attempt(policy, policy_metrics(policy))
    headers = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "authorization": "Bearer sk-mock",
    }
    attempt.on(_attempt_headers("split", 1, headers))  # `cloud`: no api key
    body = attempt.on(body_msg(orjson.dumps({"model": "m-c", "messages": []})))
    mutation = body.request_body.response.header_mutation
    assert "authorization" in mutation.remove_headers
    assert "authorization" not in _sets(mutation)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


async def test_a_provider_quota_in_redis_is_shared_by_every_worker(redis_server):
    """Two workers (two Shared): what one charged, the other sees: `backup` is skipped."""
    rate_limits = {
        "store": "redis",
        "redis": {"url": redis_server.url, "key_prefix": f"fo{id(redis_server)}:"},
        "limits": [{"name": "any", "requests": 1000, "window": "1m"}],
    }
    config = parse_config(
        {
            "providers": PROVIDERS,
            "routes": ROUTES,
            "models": {"aliases": {"fo": ORDERED}},
            "rate_limits": rate_limits,
        },
        "test.yaml",
    )
    workers = [Shared(), Shared()]
    stages = [
        next(s for s in build_policy(config, shared, ENV).stages if isinstance(s, FailoverStage))
        for shared in workers
    ]
    try:
        assert type(stages[0].store).__name__ == "RedisStore"
        ctx = _ctx(config)
        ctx.scratch["failover_alias"] = "fo"
        await stages[0].on_request(ctx)
        ctx.status, ctx.upstream_response = 200, {TARGET_HEADER: "1;2"}  # backup answered
        stages[0].on_response_headers(ctx)
        pending = stages[0].on_complete(ctx, Usage(), True)
        if pending is not None:
            await pending
        other = _ctx(config)
        other.scratch["failover_alias"] = "fo"
        await stages[1].on_request(other)
        assert other.upstream_headers["x-ai-gateway-failover"] == "v1/fo/1"  # mock only
    finally:
        for shared in workers:
            await shared.aclose()


def test_an_attempt_to_a_cloud_target_is_signed_for_that_target():
    """SigV4 covers the path and the exact bytes of this attempt, with this target's
    keys; what the router-level stream signed for another target is removed."""
    aws = {"type": "aws_sigv4", "region": "us-east-1"}
    providers = {
        "br1": {"url": "http://127.0.0.1:5", "format": "bedrock",
                "auth": {**aws, "access_key_id_env": "K1", "secret_access_key_env": "S1"}},
        "br2": {"url": "http://127.0.0.1:6", "format": "bedrock",
                "auth": {**aws, "access_key_id_env": "K2", "secret_access_key_env": "S2"}},
    }  # fmt: skip
    config = parse_config(
        {
            "providers": providers,
            "routes": [{"name": "br", "prefix": "/bedrock/", "provider": "br1", "rewrite": "/"}],
            "models": {
                "aliases": {
                    "fo": {
                        "targets": [
                            {"provider": "br1", "model": "m1"},
                            {"provider": "br2", "model": "m2"},
                        ]
                    }
                }
            },
        },
        "test.yaml",
    )
    env = {"K1": "AKIAFIRST", "S1": "s1", "K2": "AKIASECOND", "S2": "s2"}
    policy = build_policy(config, Shared(), env)
    attempt = Attempt(policy, policy_metrics(policy))
    headers = {
        ":method": "POST",
        ":path": "/model/m1/converse",
        "authorization": "AWS4-HMAC-SHA256 Credential=AKIAFIRST/...",
        "x-amz-date": "20260101T000000Z",
        "x-amz-security-token": "router-level-session",
    }
    attempt.on(_attempt_headers("fo", 1, headers))
    body = attempt.on(body_msg(b'{"messages": []}'))
    mutation = body.request_body.response.header_mutation
    signed = _sets(mutation)
    assert signed["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIASECOND/")
    assert "x-amz-date" in signed  # a fresh signature
    assert "x-amz-security-token" in mutation.remove_headers  # not the first one's


def test_an_attempt_restores_the_path_and_drops_what_an_earlier_attempt_left():
    """Envoy hands every attempt the header map the last one changed (the body is the
    original each time): a native attempt after a translated one sets the client's
    path again from the body's stash and removes the other API's headers."""
    policy = build_policy(config_of(), Shared(), ENV)
    attempt = Attempt(policy, policy_metrics(policy))
    left = {
        ":method": "POST",
        ":path": "/v1/messages",  # set by an attempt translated to Anthropic
        "x-api-key": "sk-claude",
        "anthropic-version": "2023-06-01",
    }
    attempt.on(_attempt_headers("fo", 0, left))
    stash = {"api": "openai_chat", "path": "/v1/chat/completions"}
    sent = {"model": "m-a", "messages": [], "x-ai-gateway": stash}
    body = attempt.on(body_msg(orjson.dumps(sent))).request_body.response
    assert "x-ai-gateway" not in orjson.loads(body.body_mutation.body)
    sets = _sets(body.header_mutation)
    assert sets[":path"] == "/v1/chat/completions"
    assert sets["authorization"] == "Bearer sk-mock"
    assert {"x-api-key", "anthropic-version"} <= set(body.header_mutation.remove_headers)
