"""Rate limits end to end: real Envoy, real sidecars, a real Redis server.

Every stack here runs its own policy, written from scratch (not the dev file), so the
limits under test are the only policy in the way. Limits are separated by route: each
test talks to its own path prefix.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import orjson
import pytest
import yaml
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from extproc.envoybin import envoy_binary
from extproc.policy.ratelimit.stage import estimate_prompt
from extproc.providers import format_for
from tests.conftest import REPO, Stack, loopback_sections, metric, wait_for
from tests.redis_server import RedisServer

ROUTE_NAMES = ("conc", "hdr", "big", "req", "outage")
ROUTES = [
    {"name": n, "prefix": f"/{n}", "provider": "mock", "rewrite": "/v1/chat/completions"}
    for n in ROUTE_NAMES
] + [{"name": "v1", "prefix": "/v1/", "provider": "mock"}]

PROMPT = "Count slowly to forty, please."
MAX_TOKENS = 40


def body(**extra) -> dict:
    return {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": PROMPT}],
        **extra,
    }


def reservation() -> int:
    """What the sidecar reserves for body(): its prompt estimate plus max_tokens."""
    info = format_for("openai").parse_request(orjson.dumps(body()))
    return estimate_prompt(info) + MAX_TOKENS


def write_policy(directory: Path, rate_limits: dict | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    policy = {
        **loopback_sections(directory),
        "routes": ROUTES,
    }
    if rate_limits is not None:
        policy["rate_limits"] = rate_limits
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def started(stack: Stack) -> Stack:
    stack.start()
    return stack


def usage_of(content: bytes) -> dict:
    for line in content.split(b"\n"):
        if line.startswith(b"data: {") and b'"usage":{' in line:
            return orjson.loads(line[6:])["usage"]
    raise AssertionError(f"no usage chunk in {content[-300:]!r}")


async def fire(urls: list[str], n: int, headers: dict[str, str]) -> list[httpx.Response]:
    """n streaming requests at once, spread over urls."""
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(client.post(urls[i % len(urls)], json=body(), headers=headers) for i in range(n))
        )


# -- one sidecar, in-process store --------------------------------------------------------

TOKEN_LIMIT = 1000


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Stack:
    limits = {
        "limits": [
            {
                "name": "conc-tokens",
                "tokens": TOKEN_LIMIT,
                "window": "1d",
                "by": "route",
                "match": {"routes": ["conc"]},
            },
            {
                "name": "hdr",
                "requests": 3,
                "tokens": 5000,
                "window": "1d",
                "match": {"routes": ["hdr"]},
            },
            {"name": "big", "tokens": 100, "window": "1h", "match": {"routes": ["big"]}},
        ]
    }
    directory = tmp_path_factory.mktemp("local")
    stack = started(Stack(write_policy(directory, limits), directory))
    yield stack
    stack.stop()


async def check_token_limit(stacks: list[Stack]) -> None:
    """50 streams at once against one token limit (spread over `stacks`)."""
    each = reservation()
    replies = await fire(
        [f"{s.base_url}/conc" for s in stacks],
        50,
        {"x-mock-tokens": str(MAX_TOKENS), "x-mock-delay-ms": "10"},
    )
    admitted = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(admitted) + len(refused) == 50
    assert refused and all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in refused)
    # Every admitted stream ran to [DONE] and was metered by the provider's own figures.
    assert all(r.content.rstrip().endswith(b"data: [DONE]") for r in admitted)
    used = [usage_of(r.content)["total_tokens"] for r in admitted]
    error = max(0, max(used) - each)  # how far one reservation undershot, if at all
    assert sum(used) <= TOKEN_LIMIT + error
    # ... and the limiter did not starve them: at least every reservation that fits.
    assert len(admitted) >= TOKEN_LIMIT // each
    # The settled total the sidecars recorded is what the provider reported.

    def settled() -> float:
        return sum(
            metric(s, "ai_gateway_ratelimit_tokens_total", limit="conc-tokens", phase="settled")
            for s in stacks
        )

    assert wait_for(lambda: settled() == sum(used))
    limited = sum(
        metric(s, "ai_gateway_ratelimit_decisions_total", limit="conc-tokens", outcome="limited")
        for s in stacks
    )
    assert limited == len(refused)


async def test_50_concurrent_streams_never_overspend_a_token_limit(local):
    await check_token_limit([local])


def test_stream_headers_go_down_then_429_says_when(local):
    seen = []
    with httpx.Client(base_url=local.base_url, timeout=30) as client:
        for _ in range(3):
            with client.stream("POST", "/hdr", json=body()) as r:
                # On the response headers of the stream, before any body byte.
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                seen.append(dict(r.headers))
                r.read()
        refused = client.post("/hdr", json=body())
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    assert {h["x-ratelimit-limit-requests"] for h in seen} == {"3"}
    assert {h["x-ratelimit-limit-tokens"] for h in seen} == {"5000"}
    tokens = [int(h["x-ratelimit-remaining-tokens"]) for h in seen]
    assert 5000 > tokens[0] > tokens[1] > tokens[2]
    assert all(h["x-ratelimit-reset-requests"] and h["x-ratelimit-reset-tokens"] for h in seen)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "'hdr'" in error["message"]
    assert "3 requests per 1d" in error["message"]
    assert int(refused.headers["retry-after"]) > 0
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_request_that_can_never_fit_is_told_so(local):
    r = httpx.post(f"{local.base_url}/big", json=body(max_tokens=500), timeout=30)
    assert r.status_code == 429
    error = r.json()["error"]
    assert "can never be admitted" in error["message"] and error["param"] == "max_tokens"
    assert r.headers["x-should-retry"] == "false"


# -- two sidecars, one Redis --------------------------------------------------------------

REQUEST_LIMIT = 9


@pytest.fixture(scope="module")
def redis(tmp_path_factory) -> RedisServer:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, redis) -> list[Stack]:
    """Two gateways (Envoy + sidecar each) sharing one Redis; the first fails closed,
    the second open, when Redis is away."""
    stacks = []
    for mode in ("closed", "open"):
        limits = {
            "store": "redis",
            # A killed Redis refuses connections at once; the long timeout only keeps a
            # loaded CI machine from tripping the failure mode during the exact-count tests.
            "redis": {
                "url": redis.url,
                "failure_mode": mode,
                "retry_interval_ms": 200,
                "timeout_ms": 5000,
            },
            "limits": [
                {
                    "name": "shared-requests",
                    "requests": REQUEST_LIMIT,
                    "window": "1d",
                    "match": {"routes": ["req"]},
                },
                {
                    "name": "conc-tokens",
                    "tokens": TOKEN_LIMIT,
                    "window": "1d",
                    "match": {"routes": ["conc"]},
                },
                {
                    "name": "outage",
                    "requests": 100_000,
                    "window": "1d",
                    "match": {"routes": ["outage"]},
                },
            ],
        }
        directory = tmp_path_factory.mktemp(f"replica-{mode}")
        stacks.append(started(Stack(write_policy(directory, limits), directory)))
    yield stacks
    for stack in stacks:
        stack.stop()


async def test_two_sidecars_sharing_redis_enforce_one_limit_exactly(replicas):
    replies = await fire([f"{s.base_url}/req" for s in replicas], 50, {"x-mock-tokens": "3"})
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == REQUEST_LIMIT and statuses.count(429) == 50 - REQUEST_LIMIT
    # Both gateways admitted some and refused some: one limit, not one each.
    for i, stack in enumerate(replicas):
        mine = statuses[i::2]
        assert 429 in mine
        assert metric(
            stack,
            "ai_gateway_ratelimit_decisions_total",
            limit="shared-requests",
            outcome="allowed",
        ) == mine.count(200)


async def test_two_sidecars_sharing_redis_never_overspend_one_token_limit(replicas):
    await check_token_limit(replicas)


def test_redis_killed_fail_modes_hold_and_recovery_follows(replicas, redis):
    closed, open_ = replicas
    with httpx.Client(timeout=30) as client:

        def ask(stack: Stack) -> httpx.Response:
            return client.post(f"{stack.base_url}/outage", json=body(max_tokens=3))

        before = [ask(s) for s in replicas]
        assert all(
            r.status_code == 200 and "x-ratelimit-remaining-requests" in r.headers for r in before
        )
        redis.kill()
        try:
            down = ask(closed)
            assert down.status_code == 503
            assert down.json()["error"]["code"] == "rate_limit_unavailable"
            assert down.headers["retry-after"] == "1"
            passed = ask(open_)
            assert passed.status_code == 200 and passed.content.rstrip().endswith(b"[DONE]")
            assert "x-ratelimit-remaining-requests" not in passed.headers  # unchecked
            for stack, mode in ((closed, "fail_closed"), (open_, "fail_open")):
                assert metric(stack, "ai_gateway_ratelimit_store_up", store="redis") == 0
                assert metric(stack, "ai_gateway_ratelimit_store_errors_total", store="redis") > 0
                assert metric(stack, "ai_gateway_ratelimit_decisions_total", outcome=mode) >= 1
                assert "rate-limit store redis://127.0.0.1:" in stack.log("sidecar")
                assert "unreachable" in stack.log("sidecar")
        finally:
            redis.start()  # same port (a crash may lose its last second)
        # Recovery, without restarting anything.
        for stack in replicas:
            r = wait_for(lambda s=stack: ok_with_headers(ask(s)), timeout=15)
            assert r, stack.log("sidecar")[-2000:]
            assert metric(stack, "ai_gateway_ratelimit_store_up", store="redis") == 1
            assert "reachable again" in stack.log("sidecar")


def ok_with_headers(r: httpx.Response) -> httpx.Response | None:
    return r if r.status_code == 200 and "x-ratelimit-remaining-requests" in r.headers else None


# -- Envoy's own ratelimit filter, fed by the sidecar's metadata -------------------------


def test_ratelimit_example_validates():
    import subprocess

    out = subprocess.run(
        [
            str(envoy_binary()),
            "--mode",
            "validate",
            "-c",
            str(REPO / "envoy" / "ratelimit-example.yaml"),
            "-l",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


class FakeRls(rls_pb2_grpc.RateLimitServiceServicer):
    """Records what Envoy's ratelimit filter asks; always says OK."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[tuple[str, str]]]] = []
        self.lock = threading.Lock()

    def ShouldRateLimit(self, request, context):  # the gRPC method's name
        entries = [(e.key, e.value) for d in request.descriptors for e in d.entries]
        # Envoy 1.40 sends the configured hits_addend per descriptor (older RLS
        # versions read only the request-level field).
        hits = {d.hits_addend.value for d in request.descriptors if d.HasField("hits_addend")}
        addend = hits.pop() if len(hits) == 1 else request.hits_addend
        with self.lock:
            self.calls.append((addend, entries))
        return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


class ExampleStack(Stack):
    """The dev stack's mock and sidecar, with Envoy running the shipped example."""

    rls_port: int = 0

    def start_envoy(self) -> None:
        doc = yaml.safe_load((REPO / "envoy" / "ratelimit-example.yaml").read_text())
        port = self.config.envoy.listen.rsplit(":", 1)[1]
        doc["admin"]["address"]["socket_address"]["port_value"] = int(
            self.config.envoy.admin.rsplit(":", 1)[1]
        )
        listener = doc["static_resources"]["listeners"][0]
        listener["address"]["socket_address"]["port_value"] = int(port)
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"][0]["typed_config"]["path"] = str(self.workdir / "access.log")
        mock_port = self.config.providers["mock"].port
        route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
        route["host_rewrite_literal"] = f"127.0.0.1:{mock_port}"
        ports = {
            "extproc": int(self.config.server.grpc_listen.rsplit(":", 1)[1]),
            "provider_mock": mock_port,
            "ratelimit": self.rls_port,
        }
        for cluster in doc["static_resources"]["clusters"]:
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
            endpoint["endpoint"]["address"]["socket_address"]["port_value"] = ports[cluster["name"]]
        path = self.workdir / "envoy-example.yaml"
        path.write_text(yaml.safe_dump(doc))
        self._spawn(
            "envoy",
            [
                str(envoy_binary()),
                "-c",
                str(path),
                "--use-dynamic-base-id",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ],
        )


def test_envoy_ratelimit_filter_gets_settled_tokens_at_stream_end(tmp_path):
    rls = FakeRls()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(rls, server)
    rls_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stack = ExampleStack(write_policy(tmp_path, None), tmp_path)
    stack.rls_port = rls_port
    try:
        stack.start()
        r = httpx.post(
            f"{stack.base_url}/v1/chat/completions",
            json=body(),
            headers={"x-mock-tokens": "7"},
            timeout=30,
        )
        assert r.status_code == 200
        total = usage_of(r.content)["total_tokens"]
        assert wait_for(lambda: len(rls.calls) >= 2), rls.calls
        check, charge = rls.calls[:2]
        assert check[0] == 0  # request time: a check that spends nothing
        assert charge[0] == total  # stream done: the tokens the sidecar metered
        assert check[1] == charge[1] and check[1][0][0] == "consumer"
    finally:
        stack.stop()
        server.stop(0)
