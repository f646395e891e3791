"""The mock lives outside the runtime: `serve` never imports `extproc.dev`; the mock
validates with the gateway's own parsers; every knob is parsed in one place, refused
in the route's own error shape, and documented."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp.test_utils import TestServer

from extproc.dev.mock import KNOB_HEADERS, create_app
from extproc.providers import (
    AnthropicMessages,
    AzureOpenAIChat,
    BedrockConverse,
    Gemini,
    OpenAIChat,
    OpenAIResponses,
    RequestError,
    WireFormat,
)

REPO = Path(__file__).resolve().parents[1]

# Imports every runtime module (all of extproc but extproc.dev), runs the commands
# that do not start the local stack, then prints which extproc.dev modules got loaded;
# last, a control: importing the mock must show up, or the check would be vacuous.
_PROBE = """
import importlib, pkgutil, sys

def walk(name):  # walk_packages would import extproc.dev itself to look inside
    module = importlib.import_module(name)
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        child = f"{name}.{info.name}"
        if child != "extproc.dev" and info.name != "__main__":
            walk(child)

walk("extproc")
from extproc import cli
cli.main(["check-config", "config/dev.yaml"])
cli.main(["envoy-config", "config/dev.yaml", "-o", sys.argv[1]])
cli.build_parser().parse_args(["run"])
print(sorted(m for m in sys.modules if m.startswith("extproc.dev")))
import extproc.dev.mock
print(sorted(m for m in sys.modules if m == "extproc.dev.mock"))
"""


def test_serve_and_the_cli_never_import_the_dev_stack(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "envoy.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "[]", out.stdout
    assert lines[-1] == "['extproc.dev.mock']"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    server = TestServer(create_app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url("")), timeout=5) as c:
            yield c
    finally:
        await server.close()


def _message(route: str, shape: dict) -> str:
    if route.startswith("/model/"):
        return shape["message"]
    return shape["error"]["message"]


# (path, the gateway's format for it, a body that format refuses)
REFUSED: list[tuple[str, type[WireFormat], bytes]] = [
    ("/v1/chat/completions", OpenAIChat, b'{"model": "m", "messages": "x"}'),
    ("/v1/chat/completions", OpenAIChat, b'{"model": "m", "messages": []}'),
    ("/v1/chat/completions", OpenAIChat, b"[1]"),
    ("/openai/deployments/d/chat/completions", AzureOpenAIChat, b'{"messages": 3}'),
    ("/v1/responses", OpenAIResponses, b'{"model": "m", "input": 3}'),
    ("/v1/messages", AnthropicMessages, b'{"model": "c", "messages": {}}'),
    ("/v1beta/models/g:generateContent", Gemini, b'{"contents": "hi"}'),
    ("/model/m/converse", BedrockConverse, b'{"messages": "hi"}'),
]


@pytest.mark.parametrize(("path", "wire", "body"), REFUSED)
async def test_mock_refuses_what_the_gateways_parser_refuses_with_its_words(
    client: httpx.AsyncClient, path: str, wire: type[WireFormat], body: bytes
) -> None:
    with pytest.raises(RequestError) as refused:
        wire.parse_request(body, path)
    r = await client.post(path, content=body)
    assert r.status_code == refused.value.status == 400
    assert _message(path, r.json()) == refused.value.message


KNOB_ROUTES = {
    "/v1/chat/completions": b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}',
    "/v1/messages": b'{"model": "c", "max_tokens": 5, "messages": [{"role": "user", '
    b'"content": "x"}]}',
    "/v1beta/models/g:generateContent": b'{"contents": [{"parts": [{"text": "x"}]}]}',
    "/model/m/converse": b'{"messages": [{"role": "user", "content": [{"text": "x"}]}]}',
}


@pytest.mark.parametrize("path", list(KNOB_ROUTES))
@pytest.mark.parametrize(
    ("header", "value"),
    [("x-mock-tokens", "-1"), ("x-mock-split", "a,b"), ("x-mock-status", "200"),
     ("x-mock-gzip", "maybe"), ("x-mock-line-ending", "nl"), ("x-mock-delay-ms", "inf")],
)  # fmt: skip
async def test_bad_knob_is_a_400_naming_it_in_the_routes_shape(
    client: httpx.AsyncClient, path: str, header: str, value: str
) -> None:
    r = await client.post(path, content=KNOB_ROUTES[path], headers={header: value})
    assert r.status_code == 400
    shape = r.json()
    assert header in _message(path, shape)
    if path == "/v1/chat/completions":
        assert (shape["error"]["param"], shape["error"]["code"]) == (header, "invalid_mock_header")
    elif path == "/v1/messages":
        assert shape["type"] == "error" and shape["error"]["type"] == "invalid_request_error"
    elif path.startswith("/v1beta"):
        assert shape["error"]["status"] == "INVALID_ARGUMENT"
    else:
        assert r.headers["x-amzn-errortype"].startswith("ValidationException:")
    # The same request without the bad knob is answered.
    assert (await client.post(path, content=KNOB_ROUTES[path])).status_code == 200


def test_every_knob_is_documented() -> None:
    doc = (REPO / "docs" / "mock-provider.md").read_text()
    missing = [h for h in KNOB_HEADERS if f"`{h}`" not in doc]
    assert not missing, missing
    assert "/_mock/exchanges" in doc


def test_knob_tables_agree() -> None:
    """A knob the parser reads but `KNOB_HEADERS` (hence the docs check) omits would
    go undocumented: the parser's module names no other x-mock-* header."""
    source = (REPO / "extproc" / "dev" / "mock" / "knobs.py").read_text()
    named = set(re.findall(r'"(x-mock-[a-z-]+)"', source))
    assert named == set(KNOB_HEADERS)
