"""The fifth request-phase review through the real Envoy, against the lax stand-in of
tests/test_e2e_security_paths.py (same stack: a consumer allowed only gpt-4o-mini, a
card-masking request guard): body codings, framings and content types, credential
header tricks, model-name tricks, absolute-form targets and fragments. Each is either
refused with an OpenAI-style JSON error before the provider sees it, or inspected like
the plain request (the forbidden model refused, the card masked)."""

from __future__ import annotations

import gzip
import json
import uuid
import zlib
from collections.abc import Iterator

import httpx
import pytest

from extproc.dev.devstack import Stack
from tests import test_e2e_security_paths as paths
from tests.conftest import DEV_API_KEY, start_stack
from tests.failover_helpers import Flaky
from tests.test_e2e_security_paths import (
    CARD,
    KEY,
    World,
    assert_openai_error,
    chat,
    raw_request,
    send_bytes,
)
from tests.translate_e2e import never_reached, start_translate_stack

world = paths.world  # the same stack (fixture), started once for this module

API = "/v1/chat/completions"


def send_raw(world: World, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """Request bytes exactly as given (headers repeated, framing of our choosing)."""
    return send_bytes(world.stack, head + b"Connection: close\r\n\r\n" + body)


def _head(*lines: str) -> bytes:
    return ("\r\n".join([f"POST {API} HTTP/1.1", "Host: gateway", *lines]) + "\r\n").encode()


def _inspected(world: World, status: int, payload: bytes) -> None:
    """A card in the prompt reached the provider masked, or nothing reached it."""
    served = world.served()
    if status == 200:
        assert len(served) == 1, served
        assert "4111" not in served[0]["raw_body"] and "<CREDIT_CARD>" in served[0]["raw_body"]
    else:
        assert_openai_error(status, payload)
        assert served == []


# -- body codings, framing, content types ------------------------------------------------


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        ("gzip", gzip.compress(chat("gpt-4o"))),
        ("deflate", zlib.compress(chat("gpt-4o"))),
        ("gzip", chat("gpt-4o-mini", f"card {CARD}")),  # labelled, not compressed
        ("br", chat("gpt-4o-mini", f"card {CARD}")),
    ],
    ids=["gzip", "deflate", "gzip-label", "br-label"],
)
def test_a_compressed_request_body_is_a_json_415(world: World, coding: str, body: bytes) -> None:
    """The stand-in (aiohttp) decompresses request bodies: whatever the gateway could
    not read as JSON must never reach it. Refused at the headers, said as such."""
    world.clear()
    status, _, payload = raw_request(world.stack, "POST", API, body, content_encoding=coding)
    assert status == 415, payload
    assert assert_openai_error(status, payload)["code"] == "unsupported_content_encoding"
    assert world.log() == []


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", None, "application/json, text/plain"],
)
def test_a_body_of_another_content_type_is_inspected_all_the_same(world, content_type) -> None:
    """A lax provider reads JSON whatever the label (or none, or two): so does the
    gateway, so the forbidden model is refused and the card masked."""
    for model, text, expected in (("gpt-4o", "hi", 403), ("gpt-4o-mini", f"card {CARD}", 200)):
        world.clear()
        body = chat(model, text)
        lines = [f"Authorization: Bearer {KEY}", f"Content-Length: {len(body)}"]
        if content_type is not None:
            lines += [f"Content-Type: {t.strip()}" for t in content_type.split(",")]
        status, _, payload = send_raw(world, _head(*lines), body)
        assert status == expected, payload
        _inspected(world, status, payload)


@pytest.mark.parametrize("framing", ["chunked", "expect"])
def test_chunked_and_expect_continue_bodies_are_inspected(world: World, framing: str) -> None:
    for model, text, expected in (("gpt-4o", "hi", 403), ("gpt-4o-mini", f"card {CARD}", 200)):
        world.clear()
        body = chat(model, text)
        auth = f"Authorization: Bearer {KEY}"
        if framing == "chunked":
            head = _head(auth, "Content-Type: application/json", "Transfer-Encoding: chunked")
            wire = f"{len(body) // 2:x}\r\n".encode() + body[: len(body) // 2] + b"\r\n"
            rest = body[len(body) // 2 :]
            wire += f"{len(rest):x}\r\n".encode() + rest + b"\r\n0\r\n\r\n"
        else:
            head = _head(auth, f"Content-Length: {len(body)}", "Expect: 100-continue")
            wire = body
        status, _, payload = send_raw(world, head, wire)
        if status == 100:  # the interim answer, then the final one
            status = int(payload.split(b" ", 2)[1])
            payload = payload.partition(b"\r\n\r\n")[2]
        assert status == expected, payload
        _inspected(world, status, payload)


# -- credentials ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        [f"Authorization: Bearer {KEY}", "Authorization: Bearer sk-not-a-key"],
        ["Authorization: Bearer sk-not-a-key", f"Authorization: Bearer {KEY}"],
        ["Authorization: Bearer sk-not-a-key", f"x-api-key: {KEY}"],
        [f"Authorization: Bearer {KEY.replace('c', chr(0x441))}"],  # Cyrillic es
        [f"Authorization: Bearer {KEY}\u200b"],
        [f"Authorization: Basic {KEY}"],
    ],
    ids=["valid-then-bad", "bad-then-valid", "bad-bearer-valid-x-api-key", "look-alike",
         "zero-width", "basic"],
)  # fmt: skip
def test_credential_header_tricks_are_401_and_reach_nothing(world: World, lines) -> None:
    """Envoy joins repeated `authorization` headers with a comma: no one of two keys is
    picked, the pair is no key. `authorization` is read before `x-api-key`, so a bad
    bearer is not rescued by another header."""
    world.clear()
    body = chat("gpt-4o-mini")
    head = _head(*lines, "Content-Type: application/json", f"Content-Length: {len(body)}")
    status, _, payload = send_raw(world, head.decode("latin-1").encode("utf-8"), body)
    assert status == 401, payload
    assert assert_openai_error(status, payload)["code"] in ("invalid_api_key", "missing_api_key")
    assert world.log() == []


def test_a_key_with_surrounding_spaces_is_the_key(world: World) -> None:
    """Header values lose their surrounding whitespace in HTTP: the same key, the same
    consumer and its allow-list (so the forbidden model is still refused)."""
    world.clear()
    for model, expected in (("gpt-4o", 403), ("gpt-4o-mini", 200)):
        body = chat(model)
        lines = [f"Authorization: Bearer   {KEY}  ", f"Content-Length: {len(body)}"]
        status, _, payload = send_raw(world, _head(*lines), body)
        assert status == expected, payload
    assert [e["model"] for e in world.served()] == ["gpt-4o-mini"]


# -- model names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    ["gpt-4o ", " gpt-4o", "gpt-4o\t", "gpt-4o\u0000", "GPT-4o", "gpt\u20114o", "gpt-4\u043e",
     "gpt-4o-mini ", "gpt-4o-mini\u0000", "GPT-4O-MINI", "gpt-4o-mini\u200b"],
)  # fmt: skip
def test_model_name_tricks_never_reach_the_provider(world: World, model: str) -> None:
    """A lax provider may trim, fold case or drop a NUL and serve gpt-4o: the gateway
    matches names exactly, so each is an unknown model (or a forbidden one)."""
    world.clear()
    status, _, payload = raw_request(world.stack, "POST", API, chat(model))
    assert status in (403, 404), payload
    assert assert_openai_error(status, payload)["code"] in ("model_not_found", "model_not_allowed")
    assert world.served() == []


def test_an_escaped_model_name_is_the_model_it_spells(world: World) -> None:
    world.clear()
    body = b'{"model":"gpt\\u002d4o","messages":[{"role":"user","content":"hi"}]}'
    status, _, payload = raw_request(world.stack, "POST", API, body)
    assert status == 403, payload
    body = b'{"model":"gpt-4o\\u002dmini","messages":[{"role":"user","content":"hi"}]}'
    status, _, payload = raw_request(world.stack, "POST", API, body)
    assert status == 200 and [e["model"] for e in world.served()] == ["gpt-4o-mini"]


# -- request targets -----------------------------------------------------------------------


@pytest.mark.parametrize("target", [f"http://gateway{API}", f"http://elsewhere.example{API}"])
def test_an_absolute_form_target_is_inspected_like_the_path(world: World, target: str) -> None:
    world.clear()
    status, _, payload = raw_request(world.stack, "POST", target, chat("gpt-4o"))
    assert status == 403 and world.served() == []
    status, _, payload = raw_request(world.stack, "POST", target, chat("gpt-4o-mini", CARD))
    _inspected(world, status, payload)


@pytest.mark.parametrize("target", [f"{API}#x", f"{API}%23", "/v1/chat#/completions"])
def test_a_fragment_is_a_json_400_that_says_so(world: World, target: str) -> None:
    world.clear()
    status, _, payload = raw_request(world.stack, "POST", target, chat("gpt-4o-mini"))
    error = assert_openai_error(status, payload)
    assert status == 400 and error["code"] == "invalid_path", error
    if "#" in target:
        assert "fragment" in error["message"]
    assert world.log() == []


def test_head_and_options_on_a_model_api_are_405(world: World) -> None:
    world.clear()
    for method in ("HEAD", "OPTIONS"):
        status, head, payload = raw_request(world.stack, method, API, chat("gpt-4o"))
        assert status == 405 and "allow: POST" in head, (method, status)
        if method == "OPTIONS":  # HEAD answers carry no body, by HTTP
            assert json.loads(payload)["error"]["code"] == "method_not_allowed"
    assert world.log() == []


# -- the sidecar's own headers, on a path no route serves ------------------------------------


@pytest.fixture(scope="module")
def translating(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with aliases served through translators: Envoy has routes that take any
    path when the sidecar's `x-ai-gateway-provider` and `-translated` headers are set."""
    stack = start_translate_stack(tmp_path_factory.mktemp("translating"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.mark.parametrize("path", ["/anything", "/nothing/v1/messages", "/v2/chat/completions"])
def test_internal_headers_on_an_unrouted_path_reach_no_provider(translating, path) -> None:
    """A client's copies of the translation headers made Envoy pick the translated
    provider's route (it matches any path); on a path outside every route of the policy
    the sidecar let it pass, so the provider got it unauthenticated, unmetered and with
    the client's own `x-api-key`. Now a JSON 404."""
    rid = uuid.uuid4().hex
    headers = {
        "x-ai-gateway-provider": "mock_anthropic",
        "x-ai-gateway-translated": "1",
        "x-mock-request-id": rid,
        "x-api-key": "sk-client-own",
    }
    body = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(translating.base_url + path, json=body, headers=headers, timeout=30)
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "unknown_url"
    assert never_reached(translating, rid)


def test_a_coding_hidden_behind_a_second_content_encoding_is_415(world: World) -> None:
    """Whichever copy a reader keeps, a coding but identity in any of them is refused."""
    world.clear()
    body = chat("gpt-4o-mini", f"card {CARD}")
    for first, second in (("gzip", "identity"), ("identity", "gzip")):
        head = _head(
            f"Authorization: Bearer {KEY}",
            f"Content-Encoding: {first}",
            f"Content-Encoding: {second}",
            f"Content-Length: {len(body)}",
        )
        status, _, payload = send_raw(world, head, body)
        assert status == 415, (first, second, payload)
    assert world.log() == []


# -- a client's copy of the failover stash ----------------------------------------------


@pytest.fixture(scope="module")
def failing_over(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Flaky]]:
    with Flaky("primary") as primary, Flaky("secondary") as secondary:
        targets = [
            {"provider": "primary", "model": "model-primary"},
            {"provider": "secondary", "model": "model-secondary"},
        ]
        stack = start_stack(
            tmp_path_factory.mktemp("stash"),
            providers={"primary": {"url": primary.url}, "secondary": {"url": secondary.url}},
            models={"aliases": {"fo": {"targets": targets}}},
        )
        try:
            yield stack, primary
        finally:
            stack.stop()


def test_a_client_stash_cannot_send_an_attempt_elsewhere(failing_over) -> None:
    """The upstream attempt sets `:path` from the body key `x-ai-gateway`: a client's
    copy sent the chat request, with the provider's key, to a path of its choosing."""
    stack, primary = failing_over
    url = f"{stack.base_url}/v1/chat/completions"
    auth = {"authorization": f"Bearer {DEV_API_KEY}"}
    chat_body = {"model": "fo", "messages": [{"role": "user", "content": "hi"}]}
    stash = {"path": "/v1/fine_tuning/jobs", "api": ""}
    r = httpx.post(url, json={**chat_body, "x-ai-gateway": stash}, headers=auth, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "x-ai-gateway"
    assert primary.count == 0
    r = httpx.post(url, json=chat_body, headers=auth, timeout=30)  # so the above can fail
    assert r.status_code == 200, r.text
    assert [seen["path"] for seen in primary.requests] == ["/v1/chat/completions"]
