"""Path tricks and duplicate JSON keys through the real Envoy, against the worst provider
stand-in (tests/hostile_provider.py: decodes and folds any path into a chat completion,
keeps the *first* of duplicate keys). A consumer allowed only gpt-4o-mini, a request
guard masking cards, a 3-requests-an-hour limit on one route: every attack must either
be refused before the provider sees it or be inspected like the plain request."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from extproc.dev.devstack import Stack
from tests.conftest import REPO, free_port, start_stack, wait_for

KEY = "sk-consumer-paths"
CARD = "4111 1111 1111 1111"

# Every way a decoding provider could read as /v1/chat/completions.
TRICKS = [
    "/v1/chat%2Fcompletions",
    "/v1/chat%2fcompletions",
    "/v1/chat%5Ccompletions",
    "/v1/chat%5ccompletions",
    "/v1/chat%252Fcompletions",
    "/v1//chat/completions",
    "/v1/chat//completions",
    "/v1/chat/completions/",
    "/v1/CHAT/completions",
    "/v1/chat/Completions",
    "/v1/chat\\completions",
    "/v1/%63hat/completions",
    "/v1/ch%61t/completions",
    "/v1/chat/completions%2E",
    "/v1/chat/completions/.",
    "/v1/chat/./completions",
    "/v1/x/../chat/completions",
    "/v1/x/%2E%2E/chat/completions",
    "/v1/x/%2e%2e/chat/completions",
    "/v1/chat;x=1/completions",
    "/v1/chat/completions;a=b",
    "/v1/chat/completions%3Bx",
    "/v1/chat/completions%3F",
    "/v1/chat/completions%23",
    "/v1/chat/completions?/../x",
    "/v1/models?/chat/completions",
    "/v1/embeddings?path=/v1/chat/completions",
]


@dataclass
class World:
    stack: Stack
    hostile: str

    def log(self) -> list[dict]:
        return httpx.get(f"{self.hostile}/_hostile/log", timeout=5).json()

    def served(self) -> list[dict]:
        return [e for e in self.log() if e["served"]]

    def clear(self) -> None:
        httpx.delete(f"{self.hostile}/_hostile/log", timeout=5)


def raw_request(stack: Stack, method: str, path: str, body: bytes, **headers: str) -> tuple:
    """One HTTP/1.1 request with the path byte for byte (clients normalise paths)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", f"Authorization: Bearer {KEY}"]
    lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    lines.append("Connection: close")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    status, head, payload = send_bytes(stack, raw)
    return status, head.decode("latin-1"), payload


def send_bytes(stack: Stack, raw: bytes) -> tuple[int, bytes, bytes]:
    """Send `raw` to Envoy as it is; the status, head and (unchunked) body of its answer."""
    host, port = stack.config.envoy.listen.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        payload = _unchunk(payload)
    return status, head, payload


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2 :]
    return out


def chat(model: str, text: str = "hello", **extra) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    ).encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("paths")
    port = free_port()
    log = (tmp / "hostile.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "tests/hostile_provider.py", "--port", str(port)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    hostile = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{hostile}/_hostile/log", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_for(up, timeout=20), (tmp / "hostile.log").read_text()
    stack = None
    try:
        stack = start_stack(
            tmp / "stack",
            providers={
                "mock": {"url": f"http://127.0.0.1:{free_port()}"},
                "hostile": {"url": hostile, "format": "openai"},
            },
            consumers={"app": {"keys": [{"value": KEY}], "models": ["gpt-4o-mini"]}},
            models={"catalog": {"hostile": ["gpt-4o-mini", "gpt-4o"]}},
            routes=[
                {"name": "lim", "prefix": "/lim/", "provider": "hostile", "rewrite": "/v1/"},
                {
                    "name": "pt",
                    "prefix": "/pt/",
                    "provider": "hostile",
                    "rewrite": "/v1/",
                    "passthrough_paths": ["/v1/embeddings"],
                },
                {"name": "v1", "prefix": "/v1/", "provider": "hostile", "auth": "required"},
            ],
            guards={"rules": [{"name": "pii", "detectors": ["credit_card"]}]},
            rate_limits={
                "limits": [
                    {"name": "few", "requests": 3, "window": "1h", "match": {"routes": ["lim"]}}
                ]
            },
        )
        yield World(stack, hostile)
    finally:
        if stack is not None:
            stack.stop()
        proc.terminate()
        proc.wait(10)
        log.close()


def assert_openai_error(status: int, payload: bytes) -> dict:
    assert 400 <= status < 500, (status, payload[:300])
    error = json.loads(payload)["error"]
    assert error["message"] and error.get("type"), error
    return error


@pytest.mark.parametrize("path", TRICKS)
def test_no_path_trick_reaches_the_provider_with_a_forbidden_model(world: World, path) -> None:
    world.clear()
    status, _, payload = raw_request(world.stack, "POST", path, chat("gpt-4o"))
    assert_openai_error(status, payload)
    assert world.served() == [], f"{path} reached the provider unchecked"


def test_the_plain_path_is_served_so_the_table_above_can_fail(world: World) -> None:
    world.clear()
    status, _, payload = raw_request(world.stack, "POST", "/v1/chat/completions", chat("gpt-4o"))
    assert status == 403 and world.served() == []
    status, _, payload = raw_request(
        world.stack, "POST", "/v1/chat/completions", chat("gpt-4o-mini")
    )
    assert status == 200, payload
    assert [e["model"] for e in world.served()] == ["gpt-4o-mini"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/v1/chat/completions/",
        "/v1//chat/completions",
        "/v1/%63hat/completions",
        "/v1/x/../chat/completions",
        "/v1/chat/./completions",
    ],
)
def test_paths_that_are_read_are_inspected_like_the_plain_one(world: World, path) -> None:
    """Envoy normalises these to the API path; the guard masks the card either way."""
    world.clear()
    status, _, payload = raw_request(
        world.stack, "POST", path, chat("gpt-4o-mini", f"my card is {CARD}")
    )
    served = world.served()
    if status == 200:
        assert len(served) == 1
        assert "4111" not in served[0]["raw_body"] and "<CREDIT_CARD>" in served[0]["raw_body"]
    else:
        assert_openai_error(status, payload)
        assert served == []


def test_a_rate_limit_holds_whatever_the_path(world: World) -> None:
    world.clear()
    paths = ["/lim/chat/completions", *(p.replace("/v1/", "/lim/", 1) for p in TRICKS[:12])]
    statuses = [
        raw_request(world.stack, "POST", p, chat("gpt-4o-mini"))[0] for p in paths + paths[:1] * 3
    ]
    assert statuses.count(200) == 3, statuses
    assert len(world.served()) == 3


def test_a_model_api_by_another_method_is_refused(world: World) -> None:
    world.clear()
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        status, head, payload = raw_request(
            world.stack, method, "/v1/chat/completions", chat("gpt-4o")
        )
        assert status == 405, (method, status)
        assert "allow: POST" in head
        assert_openai_error(status, payload)
    assert world.log() == []


def test_method_override_headers_are_refused(world: World) -> None:
    world.clear()
    for header in ("x-http-method-override", "x-http-method", "x-method-override"):
        status, _, payload = raw_request(
            world.stack, "POST", "/v1/embeddings", chat("gpt-4o"), **{header: "POST"}
        )
        assert status == 400, (header, status)
        assert_openai_error(status, payload)
    assert world.log() == []


def test_an_endpoint_the_route_does_not_list_is_404_and_a_listed_one_passes(world) -> None:
    world.clear()
    status, _, payload = raw_request(world.stack, "POST", "/v1/embeddings", chat("gpt-4o"))
    assert status == 404
    assert assert_openai_error(status, payload)["code"] == "unknown_url"
    assert world.log() == []
    status, _, _ = raw_request(world.stack, "POST", "/pt/embeddings", chat("gpt-4o"))
    assert [e["path"] for e in world.log()] == ["/v1/embeddings"]  # passed as configured
    assert status == 404  # the stand-in serves chat only


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o","model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
        b'{"model":"gpt-4o-mini","Model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}',
        '{"model":"gpt-4o-mini","m\u1d3cdel":"x","messages":[],"\u1d39odel":"gpt-4o"}'.encode(),
        (
            b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
            b'"messages":[{"role":"user","content":"card ' + CARD.encode() + b'"}]}'
        ),
        (
            b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"card '
            + CARD.encode()
            + b'","content":"hi"}]}'
        ),
    ],
    ids=["model", "model-case", "model-unicode-form", "messages", "nested-content"],
)
def test_duplicate_keys_are_refused_before_the_provider(world: World, body: bytes) -> None:
    world.clear()
    status, _, payload = raw_request(world.stack, "POST", "/v1/chat/completions", body)
    assert status == 400, payload
    assert assert_openai_error(status, payload)["code"] == "duplicate_key"
    assert world.log() == []
