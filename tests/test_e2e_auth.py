"""Consumers end to end through the real Envoy, with curl and the openai SDK: API keys,
JWTs (keys and an HTTPS JWKS generated here), model aliases and allow-lists, the
`/v1/models` answer, provider keys and provider choice by alias on one listener.
Every refusal is checked not to have reached the provider (the mock's exchange log)."""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import REPO, free_port, metric, start_stack, wait_for
from tests.token_server import self_signed

DEV_KEY = "my-secret-key"  # shipped in config/dev.yaml for the AISIX-style example
CHAT = {"model": "my-gpt4-mini", "messages": [{"role": "user", "content": "Say hi"}]}


def mock_seen(url: str, request_id: str) -> dict[str, Any] | None:
    r = httpx.get(f"{url}/_mock/exchanges/{request_id}", timeout=5)
    return r.json() if r.status_code == 200 else None


def mock_got(url: str, request_id: str) -> dict[str, Any]:
    found = wait_for(lambda: mock_seen(url, request_id))
    assert found, f"the provider never saw {request_id}"
    return found


def upstream_body(seen: dict[str, Any]) -> dict[str, Any]:
    return orjson.loads(base64.b64decode(seen["body_b64"]))


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """curl as a user runs it; returns (status, lower-case headers, body)."""
    out = subprocess.run(
        ["curl", "-s", "-i", *args], capture_output=True, timeout=60, check=True
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


# --------------------------------------------------------------------------- dev stack


def test_aisix_example_runs_as_written(stack):
    """`curl localhost:8080/v1/chat/completions -H "Authorization: Bearer my-secret-key"
    -d '{"model": "my-gpt4-mini", ...}'`: the alias reaches the provider as gpt-4o-mini."""
    rid = uuid.uuid4().hex
    status, _, body = curl(
        f"{stack.base_url}/v1/chat/completions",
        "-H",
        f"Authorization: Bearer {DEV_KEY}",
        "-H",
        f"x-mock-request-id: {rid}",
        "-d",
        json.dumps(CHAT),
    )
    assert status == 200, body
    answer = orjson.loads(body)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    seen = mock_got(stack.mock_url, rid)
    assert upstream_body(seen)["model"] == "gpt-4o-mini"
    # The client's key stays at the gateway; internal headers never go upstream.
    assert DEV_KEY not in json.dumps(seen["headers"])
    assert not [h for h in seen["headers"] if h.startswith("x-ai-gateway-")]


def test_sdk_streams_with_the_consumer_key(stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_KEY, max_retries=0)
    before = metric(
        stack, "ai_gateway_tokens_total", consumer="my-app", model="gpt-4o-mini", kind="completion"
    )
    chunks = list(
        client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The consumer reaches the metrics, with the real model name.
    assert wait_for(
        lambda: (
            metric(stack, "ai_gateway_tokens_total", consumer="my-app", model="gpt-4o-mini",
                   kind="completion") - before == usage.completion_tokens
        )
    )  # fmt: skip


@pytest.mark.parametrize("header", ["x-api-key", "api-key"])
def test_anthropic_and_azure_style_key_headers(stack, header):
    status, _, body = curl(
        f"{stack.base_url}/v1/chat/completions", "-H", f"{header}: {DEV_KEY}",
        "-H", "content-type: application/json", "-d", json.dumps(CHAT),
    )  # fmt: skip
    assert status == 200, body


@pytest.mark.parametrize(
    ("headers", "code"),
    [([], "missing_api_key"), (["-H", "Authorization: Bearer sk-not-a-real-key"],
                                "invalid_api_key")],
)  # fmt: skip
def test_missing_or_wrong_key_is_401_and_never_reaches_the_provider(stack, headers, code):
    rid = uuid.uuid4().hex
    status, got, body = curl(
        f"{stack.base_url}/v1/chat/completions", *headers, "-H", f"x-mock-request-id: {rid}",
        "-H", "content-type: application/json", "-d", json.dumps(CHAT),
    )  # fmt: skip
    assert status == 401
    assert got["www-authenticate"] == 'Bearer realm="ai-gateway"'
    assert got["content-type"] == "application/json"
    error = orjson.loads(body)["error"]
    assert error["code"] == code and error["message"]
    assert b"sk-not-a-real-key" not in body
    assert mock_seen(stack.mock_url, rid) is None


def test_sdk_sees_authentication_and_not_found_errors(stack):
    bad = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**CHAT)
    good = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_KEY, max_retries=0)
    rid = uuid.uuid4().hex
    with pytest.raises(openai.NotFoundError) as info:
        good.chat.completions.create(
            model="my-gpt4-mni", messages=CHAT["messages"], extra_headers={"x-mock-request-id": rid}
        )
    assert info.value.code == "model_not_found" and "my-gpt4-mni" in info.value.message
    assert mock_seen(stack.mock_url, rid) is None


def test_models_list_is_answered_by_the_gateway(stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_KEY, max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert ids == sorted(["my-gpt4-mini", "my-gpt4", "gpt-3.5-turbo", "gpt-4o-mini", "gpt-4o",
                          "gpt-4.1-mini", "my-claude", "my-gemini", "my-nova"])  # fmt: skip
    assert client.models.retrieve("my-gpt4-mini").id == "my-gpt4-mini"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0).models.list()


def test_open_route_needs_no_key_and_strips_a_sent_one(stack):
    rid = uuid.uuid4().hex
    body = {**CHAT, "model": "gpt-3.5-turbo"}
    r = httpx.post(
        f"{stack.base_url}/openai", json=body, timeout=30,
        headers={"x-mock-request-id": rid, "authorization": "Bearer client-own-key"},
    )  # fmt: skip
    assert r.status_code == 200
    assert "authorization" not in mock_got(stack.mock_url, rid)["headers"]


# --------------------------------------------------------------------------- own stack


class JwksServer:
    """An HTTPS JWKS endpoint the test can rotate or take down."""

    def __init__(self, directory: Path) -> None:
        self.cert, key = self_signed(directory, "jwks")
        self.body = b'{"keys": []}'
        self.down = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if server.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, *keys: Any) -> None:
        jwks = []
        for kid, private in keys:
            algorithm = (
                jwt.algorithms.RSAAlgorithm
                if isinstance(private, rsa.RSAPrivateKey)
                else (jwt.algorithms.ECAlgorithm)
            )
            jwks.append({**orjson.loads(algorithm.to_jwk(private.public_key())), "kid": kid})
        self.body = orjson.dumps({"keys": jwks})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_mock(port: int, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extproc.dev.mock", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    ok = wait_for(lambda: _healthy(f"http://127.0.0.1:{port}/healthz"), timeout=20)
    assert ok, log.read_text()
    return proc


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


ISSUER = "https://idp.example.test/"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


class World:
    """The module's stack and the secrets it was made with."""

    def __init__(self, stack, jwks: JwksServer, backup_url: str, keys: dict[str, str]) -> None:
        self.stack = stack
        self.jwks = jwks
        self.backup_url = backup_url
        self.keys = keys

    def token(self, private=RSA_KEY, kid="k1", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": "ai-gateway", "sub": "robot", "exp": now + 300}
        body.update(claims)
        alg = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(body, private, algorithm=alg, headers={"kid": kid})

    def post(self, credential: str | None, body: dict[str, Any], **headers: str) -> httpx.Response:
        if credential:
            headers["authorization"] = f"Bearer {credential}"
        return httpx.post(
            f"{self.stack.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("auth")
    keys = {
        "mock": "sk-mock-" + secrets.token_hex(16),
        "backup": "sk-backup-" + secrets.token_hex(16),
        "team": "sk-team-" + secrets.token_hex(16),
    }
    for name in ("mock", "backup"):
        (tmp / f"{name}.key").write_text(keys[name] + "\n")
    jwks = JwksServer(tmp)
    jwks.publish(("k1", RSA_KEY))
    backup_port = free_port()
    backup = start_mock(backup_port, tmp / "backup.log")
    stack = None
    try:
        stack = start_stack(
            tmp / "stack",
            providers={
                "mock": {
                    "url": f"http://127.0.0.1:{free_port()}",
                    "api_key_file": str(tmp / "mock.key"),
                },
                "backup": {
                    "url": f"http://127.0.0.1:{backup_port}",
                    "api_key_file": str(tmp / "backup.key"),
                },
            },
            consumers={
                "team-a": {
                    "keys": [{"sha256": _sha256(keys["team"])}],
                    "models": ["my-gpt4-mini", "gpt-4o-mini", "cheap"],
                },
            },
            auth={
                "jwt": {
                    "jwks_url": jwks.url,
                    "jwks_ca_file": str(jwks.cert),
                    "jwks_refresh_seconds": 1,
                    "issuer": ISSUER,
                    "audience": "ai-gateway",
                    "models_claim": "models",
                }
            },
            models={
                "aliases": {
                    "my-gpt4-mini": {"provider": "mock", "model": "gpt-4o-mini"},
                    "cheap": {"provider": "backup", "model": "gpt-4.1-mini"},
                }
            },
        )
        yield World(stack, jwks, f"http://127.0.0.1:{backup_port}", keys)
    finally:
        if stack is not None:
            stack.stop()
        backup.terminate()
        backup.wait(10)
        jwks.close()


def _sha256(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def test_provider_key_reaches_the_provider_never_the_client(world):
    rid = uuid.uuid4().hex
    r = world.post(world.keys["team"], {**CHAT, "stream": True}, **{"x-mock-request-id": rid})
    assert r.status_code == 200 and b"[DONE]" in r.content
    seen = mock_got(world.stack.mock_url, rid)
    assert seen["headers"]["authorization"] == f"Bearer {world.keys['mock']}"
    everything_client_saw = r.content + json.dumps(dict(r.headers)).encode()
    for secret in world.keys.values():
        assert secret.encode() not in everything_client_saw
    for name in ("sidecar", "envoy"):
        log = world.stack.log(name) + (world.stack.workdir / "access.log").read_text()
        assert world.keys["mock"] not in log and world.keys["team"] not in log


def test_alias_on_another_provider_goes_there_with_its_key(world):
    rid = uuid.uuid4().hex
    r = world.post(world.keys["team"], {**CHAT, "model": "cheap"}, **{"x-mock-request-id": rid})
    assert r.status_code == 200, r.text
    seen = mock_got(world.backup_url, rid)
    assert upstream_body(seen)["model"] == "gpt-4.1-mini"
    assert seen["headers"]["authorization"] == f"Bearer {world.keys['backup']}"
    assert seen["headers"]["host"] == world.backup_url.removeprefix("http://")
    assert mock_seen(world.stack.mock_url, rid) is None


def test_spoofed_internal_headers_change_nothing(world):
    rid = uuid.uuid4().hex
    before = metric(world.stack, "ai_gateway_tokens_total", consumer="admin")
    r = world.post(
        world.keys["team"],
        {**CHAT, "model": "gpt-4o-mini"},
        **{
            "x-mock-request-id": rid,
            "x-ai-gateway-provider": "backup",
            "x-ai-gateway-consumer": "admin",
            "x-ai-gateway-model": "gpt-4o",
        },
    )
    assert r.status_code == 200, r.text
    seen = mock_got(world.stack.mock_url, rid)  # Envoy's route choice was undone
    assert mock_seen(world.backup_url, rid) is None
    assert not [h for h in seen["headers"] if h.startswith("x-ai-gateway-")]
    assert upstream_body(seen)["model"] == "gpt-4o-mini"
    assert wait_for(lambda: metric(world.stack, "ai_gateway_tokens_total", consumer="team-a") > 0)
    assert metric(world.stack, "ai_gateway_tokens_total", consumer="admin") == before == 0


def test_valid_key_but_forbidden_model_is_403_naming_it(world):
    rid = uuid.uuid4().hex
    client = openai.OpenAI(
        base_url=f"{world.stack.base_url}/v1", api_key=world.keys["team"], max_retries=0
    )
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(
            model="gpt-4o", messages=CHAT["messages"], extra_headers={"x-mock-request-id": rid}
        )
    assert "gpt-4o" in info.value.message and info.value.code == "model_not_allowed"
    assert mock_seen(world.stack.mock_url, rid) is None
    ids = [m.id for m in client.models.list()]
    assert ids == ["cheap", "gpt-4o-mini", "my-gpt4-mini"]


def test_jwt_caller_with_models_claim(world):
    token = world.token(sub="robot", models=["my-gpt4-mini"])
    client = openai.OpenAI(base_url=f"{world.stack.base_url}/v1", api_key=token, max_retries=0)
    reply = client.chat.completions.create(**CHAT)
    assert reply.choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])
    assert [m.id for m in client.models.list()] == ["my-gpt4-mini"]


def test_bad_jwts_get_401_saying_why_without_the_token(world):
    now = int(time.time())
    forged_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    header = base64.urlsafe_b64encode(b'{"alg":"none","kid":"k1"}').rstrip(b"=").decode()
    claims = base64.urlsafe_b64encode(orjson.dumps({"sub": "x", "exp": now + 60}))
    unsigned = f"{header}.{claims.rstrip(b'=').decode()}."
    cases = [
        (world.token(exp=now - 600), "expired"),
        (world.token(aud="another-api"), "aud"),
        (world.token(private=forged_key), "signature"),
        (unsigned, "alg 'none'"),
        ("eyJub3QganNvbg.e30.c2ln", "malformed"),
    ]
    for token, says in cases:
        rid = uuid.uuid4().hex
        status, headers, body = curl(
            f"{world.stack.base_url}/v1/chat/completions", "-H", f"Authorization: Bearer {token}",
            "-H", f"x-mock-request-id: {rid}", "-d", json.dumps(CHAT),
        )  # fmt: skip
        assert status == 401, body
        assert headers["www-authenticate"].startswith('Bearer realm="ai-gateway", error=')
        error = orjson.loads(body)["error"]
        assert says in error["message"], (says, error)
        assert token.encode() not in body and token not in headers["www-authenticate"]
        assert mock_seen(world.stack.mock_url, rid) is None


def test_jwks_down_keeps_cached_keys_then_rotation_is_picked_up(world):
    stack = world.stack
    token = world.token()
    assert world.post(token, CHAT).status_code == 200
    errors = metric(stack, "ai_gateway_jwks_refresh_total", result="error")
    world.jwks.down = True
    try:
        assert wait_for(
            lambda: metric(stack, "ai_gateway_jwks_refresh_total", result="error") > errors,
            timeout=30,
        )
        assert metric(stack, "ai_gateway_jwks_stale") == 1
        assert "keeping 1 cached signing keys" in stack.log("sidecar")
        assert world.post(token, CHAT).status_code == 200  # cached key still verifies
    finally:
        world.jwks.down = False
    # Rotation: the IdP now signs with a new key; the sidecar fetches it in the
    # background (a token with the new kid is refused until then, never fetched inline).
    world.jwks.publish(("k2", EC_KEY))
    rotated = world.token(private=EC_KEY, kid="k2")
    assert wait_for(lambda: world.post(rotated, CHAT).status_code == 200, timeout=30)
    assert metric(stack, "ai_gateway_jwks_stale") == 0
    assert world.post(token, CHAT).status_code == 401  # the retired key is gone
