"""Guard evasions end to end through the real Envoy: a card or an email in Unicode
forms (full-width digits, zero-width characters, NBSPs, dots, slashes, a full-width
`@`), split across content parts or messages, or put in `user`, a message `name`, a
tool description or a data URL, reaches the mock provider masked on a route with a
mask guard, and is refused with 403 on a route with a reject guard (the provider never
sees it). A streamed answer carrying a full-width card arrives masked."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from extproc.dev.devstack import Stack
from tests.conftest import DEV_API_KEY, mock_exchange, sse_payloads, start_stack

CARD = "4111 1111 1111 1111"
WIDE = "".join(chr(0xFF10 + int(c)) if c.isdigit() else c for c in CARD)  # full-width
TOKEN = "<CREDIT_CARD>"

GUARDS = {
    "rules": [
        {"name": "pii", "detectors": ["credit_card", "email"], "routes": ["openai", "anthropic"]},
        {"name": "no-pii", "action": "reject", "detectors": ["credit_card", "email"],
         "routes": ["v1"]},
    ]
}  # fmt: skip


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("security-guards"), guards=GUARDS)
    try:
        yield stack
    finally:
        stack.stop()


def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "stream": True, "messages": messages, **extra}


def user(content: Any, **extra: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content, **extra}]


def tool(description: str, parameter: str = "a number") -> list[dict[str, Any]]:
    schema = {"type": "object", "properties": {"n": {"type": "string", "description": parameter}}}
    function = {"name": "lookup", "description": description, "parameters": schema}
    return [{"type": "function", "function": function}]


def first_text(up: dict[str, Any]) -> str:
    return up["messages"][0]["content"]


# (name, request body, what the provider must see, read from its recorded request)
Case = tuple[str, dict[str, Any], Callable[[dict[str, Any]], Any], Any]
CASES: list[Case] = [
    ("full-width digits", chat(user(f"card {WIDE} ok")), first_text, f"card {TOKEN} ok"),
    (
        "zero-width and NBSP",
        chat(user("card 4\u200b111\u00a01111\u00a01111\u00a01\u2060111 ok")),
        first_text,
        f"card {TOKEN} ok",
    ),
    ("dots", chat(user("card 4111.1111.1111.1111 ok")), first_text, f"card {TOKEN} ok"),
    ("slashes", chat(user("card 4111/1111/1111/1111 ok")), first_text, f"card {TOKEN} ok"),
    (
        "full-width @",
        chat(user("mail jane.roe\uff20example.org ok")),
        first_text,
        "mail <EMAIL> ok",
    ),
    (
        "split across parts",
        chat(user([{"type": "text", "text": "card 4111 1111"},
                   {"type": "text", "text": " 1111 1111 ok"}])),
        lambda up: [p["text"] for p in up["messages"][0]["content"]],
        [f"card {TOKEN}", " ok"],
    ),
    (
        "split across messages",
        chat([{"role": "user", "content": "card 4111 1111 11"},
              {"role": "user", "content": "11 1111 ok"}]),
        lambda up: [m["content"] for m in up["messages"]],
        [f"card {TOKEN}", " ok"],
    ),
    ("user", chat(user("hi"), user=WIDE), lambda up: up["user"], TOKEN),
    ("name", chat(user("hi", name=f"n{WIDE}")), lambda up: up["messages"][0]["name"], f"n{TOKEN}"),
    (
        "tool description",
        chat(user("hi"), tools=tool(f"cards like {WIDE}", f"e.g. {CARD}")),
        lambda up: (
            up["tools"][0]["function"]["description"],
            up["tools"][0]["function"]["parameters"]["properties"]["n"]["description"],
        ),
        (f"cards like {TOKEN}", f"e.g. {TOKEN}"),
    ),
    (
        "data URL",
        chat(user([{"type": "text", "text": "see"},
                   {"type": "image_url", "image_url": {"url": f"data:text/plain,{CARD}"}}])),
        lambda up: up["messages"][0]["content"][1]["image_url"]["url"],
        f"data:text/plain,{TOKEN}",
    ),
]  # fmt: skip
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("name", "body", "read", "expected"), CASES, ids=IDS)
def test_evasion_reaches_the_provider_masked(guarded, name, body, read, expected):
    rid = uuid.uuid4().hex
    r = httpx.post(
        f"{guarded.base_url}/openai", json=body, headers={"x-mock-request-id": rid}, timeout=30
    )
    assert r.status_code == 200, r.text
    raw = base64.b64decode(mock_exchange(guarded, rid)["body_b64"])
    upstream = orjson.loads(raw)
    assert read(upstream) == expected
    for leaked in ("1111", "\uff11", "jane.roe"):
        assert leaked.encode() not in raw


@pytest.mark.parametrize(("name", "body", "read", "expected"), CASES, ids=IDS)
def test_evasion_is_refused_by_a_reject_guard(guarded, name, body, read, expected):
    rid = uuid.uuid4().hex
    r = httpx.post(
        f"{guarded.base_url}/v1/chat/completions",
        json=body,
        headers={"x-mock-request-id": rid, "authorization": f"Bearer {DEV_API_KEY}"},
        timeout=30,
    )
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "guard_blocked" and "no-pii" in error["message"]
    assert "1111" not in r.text and "\uff11" not in r.text
    assert httpx.get(f"{guarded.mock_url}/_mock/exchanges/{rid}", timeout=5).status_code == 404


def test_base64_image_is_passed_through_untouched(guarded):
    """A base64 data URL is not scanned (documented): digits in it stay, image intact."""
    image = "data:image/png;base64,iVBORw0KGgo4111111111111111AAAA"
    rid = uuid.uuid4().hex
    body = chat(user([{"type": "image_url", "image_url": {"url": image}}]))
    r = httpx.post(
        f"{guarded.base_url}/openai", json=body, headers={"x-mock-request-id": rid}, timeout=30
    )
    assert r.status_code == 200
    upstream = orjson.loads(base64.b64decode(mock_exchange(guarded, rid)["body_b64"]))
    assert upstream["messages"][0]["content"][0]["image_url"]["url"] == image


def test_anthropic_system_and_tool_description_masked(guarded):
    rid = uuid.uuid4().hex
    body = {
        "model": "claude-e2e-guards",
        "max_tokens": 64,
        "system": f"card {WIDE}",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "mail a\uff20b.com."}]}],
        "tools": [{"name": "f", "description": f"d {WIDE}", "input_schema": {"type": "object"}}],
    }
    r = httpx.post(
        f"{guarded.base_url}/anthropic/v1/messages",
        json=body,
        headers={"x-mock-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    upstream = orjson.loads(base64.b64decode(mock_exchange(guarded, rid)["body_b64"]))
    assert upstream["system"] == f"card {TOKEN}"
    assert upstream["messages"][0]["content"][0]["text"] == "mail <EMAIL>."
    assert upstream["tools"][0]["description"] == f"d {TOKEN}"


def content(body: bytes) -> str:
    text = []
    for p in sse_payloads(body):
        if p.startswith(b"{"):
            for choice in orjson.loads(p).get("choices") or ():
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


def test_streamed_full_width_card_arrives_masked(guarded):
    rid = uuid.uuid4().hex
    answer = f"Your card {WIDE} is on file."
    headers = {"x-mock-text": answer.encode(), "x-mock-request-id": rid}
    r = httpx.post(
        f"{guarded.base_url}/openai", json=chat(user("card?")), headers=headers, timeout=30
    )
    assert r.status_code == 200
    sent = base64.b64decode(mock_exchange(guarded, rid)["sent_b64"])
    # The provider sent it as UTF-8, a group of digits per frame.
    wide_frames = [p for p in sse_payloads(sent) if "\uff11".encode() in p]
    assert len(wide_frames) >= 4, sent
    assert content(r.content) == f"Your card {TOKEN} is on file."
    assert "\uff11".encode() not in r.content and b"\\uff11" not in r.content
    assert sse_payloads(r.content)[-1] == b"[DONE]"
