"""Issue 16 items 3, 6, 7 and 8 through the real stack (mock provider + sidecar + Envoy):
credentials in the query or in cookies never reach the provider or a log, attacker-
sized input is not reflected, made-up model names cannot mint metric series, and
oversized headers get a JSON 431 over HTTP/1.1 and HTTP/2; a burst against a Redis
limit admits exactly the limit."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import (
    DEV_API_KEY,
    consecutive_free_ports,
    mock_exchange,
    start_stack,
    wait_for,
)

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"authorization": f"Bearer {DEV_API_KEY}"}


def access_log(stack) -> str:
    path = Path(stack.workdir) / "access.log"
    return path.read_text() if path.exists() else ""


def logged(stack, request_id: str) -> str:
    """Envoy's access-log line of one request (Envoy flushes the file about once a second)."""
    found = wait_for(lambda: [ln for ln in access_log(stack).splitlines() if request_id in ln])
    assert found, f"no access-log line for {request_id}"
    return found[0]


# -- 6: credentials in the wrong places ---------------------------------------------------


def test_query_keys_and_cookies_never_reach_the_provider_or_a_log(stack):
    secret = "AIza" + secrets.token_hex(12)
    cookie = "sess-" + secrets.token_hex(8)
    proxy = "Basic " + secrets.token_hex(8)
    rid = "q-" + secrets.token_hex(4)
    path = f"/v1/chat/completions?alt=sse&key={secret}&API_KEY={secret}&access%5Ftoken={secret}"
    headers = {
        **AUTH,
        "cookie": f"session={cookie}",
        "proxy-authorization": proxy,
        "x-mock-request-id": rid,
        "x-request-id": rid,
    }
    r = httpx.post(stack.base_url + path, json=CHAT, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    seen = mock_exchange(stack, rid)
    assert seen["query"] == "alt=sse"  # only the harmless parameter went upstream
    assert "cookie" not in seen["headers"] and "proxy-authorization" not in seen["headers"]
    assert secret not in orjson.dumps(seen).decode()
    line = logged(stack, rid)
    assert orjson.loads(line)["path"] == "/v1/chat/completions"
    assert secret not in access_log(stack)
    assert secret not in stack.log("sidecar")


def test_a_refused_request_with_a_query_key_leaves_no_trace_of_it(stack):
    """Refused before the sidecar could rewrite the path: the logs still lack the key."""
    secret = "sk-query-" + secrets.token_hex(12)
    rid = "r-" + secrets.token_hex(4)
    r = httpx.post(
        f"{stack.base_url}/v1/chat/completions?api_key={secret}",
        json=CHAT,
        headers={"x-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 401
    logged(stack, rid)
    assert wait_for(lambda: "refused" in stack.log("sidecar"))
    assert secret not in access_log(stack) and secret not in stack.log("sidecar")


@pytest.fixture(scope="module")
def jwt_stack(tmp_path_factory) -> Iterator:
    tmp = tmp_path_factory.mktemp("jwt")
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = orjson.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    (tmp / "jwks.json").write_bytes(orjson.dumps({"keys": [{**jwk, "kid": "k1"}]}))
    auth = {"jwt": {"jwks_file": str(tmp / "jwks.json"), "issuer": "https://idp.test/"}}
    stack = start_stack(tmp / "stack", auth=auth)
    try:
        yield stack
    finally:
        stack.stop()


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_10kb_jwt_alg_is_not_reflected(jwt_stack):
    alg = "A" * 10_000
    forged = f"{_b64(orjson.dumps({'alg': alg, 'kid': 'k1'}))}.{_b64(b'{}')}.c2ln"
    r = httpx.post(
        jwt_stack.base_url + "/v1/chat/completions",
        json=CHAT,
        headers={"authorization": f"Bearer {forged}"},
        timeout=30,
    )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_token"
    assert "is not accepted" in r.json()["error"]["message"]
    assert len(r.content) < 1000 and alg[:100] not in r.text
    assert len(r.headers["www-authenticate"]) < 1000


# -- 7: bounded metric labels -------------------------------------------------------------


def model_labels(stack) -> set[str]:
    text = httpx.get(stack.metrics_url, timeout=5).text
    return set(re.findall(r'^ai_gateway_requests_total\{[^}]*model="([^"]*)"', text, re.M))


def test_made_up_model_names_do_not_mint_metric_series(stack):
    before = model_labels(stack)
    with httpx.Client(base_url=stack.base_url, headers=AUTH, timeout=30) as client:
        for i in range(200):
            body = {**CHAT, "model": f"made-up-{i}-{secrets.token_hex(3)}"}
            assert client.post("/v1/chat/completions", json=body).status_code == 404
        long = {**CHAT, "model": "m" * 5000}
        assert client.post("/v1/chat/completions", json=long).status_code == 404
    assert wait_for(lambda: "other" in model_labels(stack))
    after = model_labels(stack)
    assert after - before <= {"other"}, sorted(after - before)[:5]
    assert max(map(len, after)) <= 64


# -- 8: oversized headers -----------------------------------------------------------------


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize(
    "extra",
    [{"x-big": "a" * 70_000}, {f"x-h{i}": "v" for i in range(120)}],
    ids=["70KB", "120-headers"],
)
def test_oversized_headers_get_a_json_431(stack, http2, extra):
    with httpx.Client(base_url=stack.base_url, http1=not http2, http2=http2, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=CHAT, headers={**AUTH, **extra})
    assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
    assert r.status_code == 431
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == "request_header_fields_too_large"
    assert error["type"] == "invalid_request_error"


def test_one_header_name_repeated_counts_every_time(stack):
    """120 entries of one name are 120 headers, not one (the map keeps only the last)."""
    headers = [(k, v) for k, v in AUTH.items()] + [("x-same", f"v{i}") for i in range(120)]
    r = httpx.post(stack.base_url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
    assert r.status_code == 431
    assert r.json()["error"]["code"] == "request_header_fields_too_large"


def test_headers_within_the_limits_pass(stack):
    extra = {f"x-h{i}": "v" * 500 for i in range(80)}  # 80 headers, ~40 KB
    r = httpx.post(
        stack.base_url + "/v1/chat/completions",
        json=CHAT,
        headers={**AUTH, **extra},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def test_far_beyond_the_limits_envoy_still_refuses(stack):
    """Above Envoy's own codec limit (twice ours) Envoy cuts the request off: no 200."""
    extra = {"x-huge": "a" * 200_000}
    try:
        r = httpx.post(
            stack.base_url + "/v1/chat/completions",
            json=CHAT,
            headers={**AUTH, **extra},
            timeout=30,
        )
    except httpx.HTTPError:
        return  # an empty reply or a reset: refused
    assert r.status_code >= 400


# -- 3: a burst against a Redis-backed limit, through Envoy and two workers --------------

BURST = 300
BURST_LIMIT = 100


@pytest.fixture(scope="module")
def burst_stack(tmp_path_factory) -> Iterator:
    from tests.redis_server import RedisServer

    tmp = tmp_path_factory.mktemp("burst")
    redis = RedisServer(tmp / "redis").start()
    limits = {
        "store": "redis",
        # Two connections per worker, the default 200 ms timeout, fail open: the
        # pipelined store through Envoy and two workers. (Through Envoy the burst arrives
        # spread out and did not exhaust the old pool either: the reproduction of the
        # fail-open is tests/test_ratelimit_burst.py, at the store.)
        "redis": {"url": redis.url, "failure_mode": "open", "max_connections": 2},
        "limits": [{"name": "hourly", "requests": BURST_LIMIT, "window": "1h", "by": "consumer"}],
    }
    stack = None
    try:
        server = {
            "workers": 2,
            "grpc_listen": f"127.0.0.1:{consecutive_free_ports(2)}",
            # This tests the limiter: admission control must not shed any of the burst.
            "max_open_streams": 1000,
            "max_queued_requests": 1000,
            "max_queue_delay_ms": 0,
        }
        stack = start_stack(tmp / "stack", server=server, rate_limits=limits)
        yield stack
    finally:
        if stack is not None:
            stack.stop()
        redis.stop()


async def test_a_burst_through_envoy_admits_exactly_the_limit(burst_stack):
    import asyncio

    from tests.conftest import metric

    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=AUTH) as client:
        url = burst_stack.base_url + "/v1/chat/completions"
        replies = await asyncio.gather(*(client.post(url, json=CHAT) for _ in range(BURST)))
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == BURST_LIMIT, sorted(set(statuses))
    assert statuses.count(429) == BURST - BURST_LIMIT
    decisions = "ai_gateway_ratelimit_decisions_total"
    assert metric(burst_stack, decisions, limit="hourly", outcome="allowed") == BURST_LIMIT
    assert metric(burst_stack, decisions, outcome="fail_open") == 0
    assert metric(burst_stack, "ai_gateway_ratelimit_store_up", store="redis") == 1
