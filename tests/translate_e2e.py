"""The stack the translation end-to-end tests share: the dev policy with aliases served
in other APIs, a provider key per target (to see that only it reaches the mock), a
route whose answers a card-mask guard reads, and one under a token limit. The mock's
own bytes are read with the format readers of `test_e2e_providers` (independent of
the gateway's decoders)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import Stack, wait_for, write_config
from tests.test_e2e_providers import Fmt, events

ALIASES = {
    "my-claude": {"provider": "mock_anthropic", "model": "claude-sonnet-4-5"},
    "my-gemini": {"provider": "mock_gemini", "model": "gemini-2.5-flash"},
    "my-nova": {"provider": "mock_bedrock", "model": "amazon.nova-lite-v1:0"},
    "my-gpt": {"provider": "mock", "model": "gpt-4o-mini"},
    "my-vertex": {"provider": "mock_vertex", "model": "gemini-2.5-pro"},
    "my-azure": {"provider": "mock_azure", "model": "gpt-4o"},
}
# Each provider's key (env var, value) and the header its API carries it in.
KEYS = {
    "mock": ("MOCK_KEY", "sk-openai-provider", "authorization"),
    "mock_anthropic": ("ANTHROPIC_KEY", "sk-ant-provider", "x-api-key"),
    "mock_gemini": ("GEMINI_KEY", "gemini-provider-key", "x-goog-api-key"),
    "mock_bedrock": ("BEDROCK_KEY", "bedrock-provider-key", "authorization"),
    "mock_vertex": ("VERTEX_TOKEN", "vertex-provider-token", "authorization"),
    "mock_azure": ("AZURE_KEY", "azure-provider-key", "api-key"),
}
# How the mock's answer for each alias is read here.
UPSTREAM = {
    "my-claude": Fmt("anthropic", "anthropic", "anthropic_sse", "claude-sonnet-4-5"),
    "my-gemini": Fmt("gemini_sse", "gemini", "gemini_sse", "gemini-2.5-flash"),
    "my-nova": Fmt("bedrock", "bedrock", "bedrock_eventstream", "amazon.nova-lite-v1:0"),
    "my-gpt": Fmt("chat", "chat", "openai_chat_sse", "gpt-4o-mini"),
    "my-vertex": Fmt("gemini_sse", "gemini", "gemini_sse", "gemini-2.5-pro"),
    "my-azure": Fmt("chat", "chat", "openai_chat_sse", "gpt-4o"),
}
VERTEX_PATH = "/v1/projects/my-project/locations/us-central1/publishers/google/models/"
CARD = "4111 1111 1111 1111"
FORBIDDEN = "Sure, the launch code is here and many more words follow after it."
TOKEN_LIMIT = "translated-tokens"


def start_translate_stack(directory: Path) -> Stack:
    directory.mkdir(parents=True, exist_ok=True)
    path = write_config(
        directory,
        guards={
            "rules": [
                {
                    "name": "cards",
                    "detectors": ["credit_card"],
                    "routes": ["guarded", "guarded_messages"],
                },
                {
                    "name": "forbidden",
                    "action": "reject",
                    "keywords": ["launch code"],
                    "phases": ["response"],
                    "routes": ["guarded", "guarded_messages"],
                },
            ]
        },
        rate_limits={
            "limits": [
                {
                    "name": TOKEN_LIMIT,
                    "tokens": 1_000_000,
                    "window": "1h",
                    "match": {"routes": ["limited"]},
                }
            ]
        },
    )
    config = yaml.safe_load(path.read_text())
    config["models"]["aliases"].update(ALIASES)
    for name, (env, _, _) in KEYS.items():
        config["providers"][name]["api_key_env"] = env
    config["providers"]["mock_vertex"].update(project="my-project", location="us-central1")
    config["providers"]["mock_azure"]["api_version"] = "2024-10-21"
    for name, provider in (
        ("guarded", "mock"),
        ("limited", "mock"),
        ("guarded_messages", "mock_anthropic"),  # Anthropic clients, guarded
    ):
        route = {"name": name, "prefix": f"/{name}/", "provider": provider, "rewrite": "/"}
        config["routes"].append({**route, "auth": "off"})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    stack = Stack(path, directory)
    stack.env = {env: value for env, value, _ in KEYS.values()}
    stack.start()
    return stack


def mock_seen(stack: Stack, rid: str) -> dict[str, Any]:
    """The mock's record of request `rid` (what it received and sent)."""

    def fetch():
        r = httpx.get(f"{stack.mock_url}/_mock/exchanges/{rid}", timeout=5)
        return r.json() if r.status_code == 200 else None

    seen = wait_for(fetch)
    assert seen, f"the mock never saw request {rid}"
    return seen


def never_reached(stack: Stack, rid: str) -> bool:
    r = httpx.get(f"{stack.mock_url}/_mock/exchanges/{rid}", timeout=5)
    return r.status_code == 404


def upstream_answer(fmt: Fmt, sent: bytes) -> dict[str, Any]:
    """What the mock's stream said: text, tool call (name, arguments), finish, usage."""
    evs = events(fmt, sent)
    text: list[str] = []
    tool: dict[str, Any] = {}
    arguments: list[str] = []
    finish = None
    usage: dict[str, int] = {}
    for kind, obj in evs:
        if fmt.family == "anthropic":
            if kind == "message_start":
                usage["prompt"] = obj["message"]["usage"]["input_tokens"]
            elif kind == "content_block_start" and obj["content_block"]["type"] == "tool_use":
                tool = {"id": obj["content_block"]["id"], "name": obj["content_block"]["name"]}
            elif kind == "content_block_delta":
                delta = obj["delta"]
                text.append(delta.get("text", ""))
                arguments.append(delta.get("partial_json", ""))
            elif kind == "message_delta":
                finish = obj["delta"]["stop_reason"]
                usage["completion"] = obj["usage"]["output_tokens"]
        elif fmt.family == "gemini":
            candidate = (obj.get("candidates") or [{}])[0]
            for part in candidate.get("content", {}).get("parts", []):
                text.append(part.get("text", ""))
                if "functionCall" in part:
                    tool = {"name": part["functionCall"]["name"]}
                    arguments.append(json.dumps(part["functionCall"]["args"]))
            finish = candidate.get("finishReason", finish)
            if "usageMetadata" in obj:
                u = obj["usageMetadata"]
                usage = {"prompt": u["promptTokenCount"], "completion": u["candidatesTokenCount"]}
        elif fmt.family == "bedrock":
            if kind == "contentBlockStart" and "toolUse" in obj["start"]:
                use = obj["start"]["toolUse"]
                tool = {"id": use["toolUseId"], "name": use["name"]}
            elif kind == "contentBlockDelta":
                text.append(obj["delta"].get("text", ""))
                arguments.append(obj["delta"].get("toolUse", {}).get("input", ""))
            elif kind == "messageStop":
                finish = obj["stopReason"]
            elif kind == "metadata":
                u = obj["usage"]
                usage = {"prompt": u["inputTokens"], "completion": u["outputTokens"]}
        elif fmt.family == "chat" and obj:
            for choice in obj.get("choices") or ():
                delta = choice.get("delta") or {}
                text.append(delta.get("content") or "")
                for call in delta.get("tool_calls") or ():
                    if call.get("id"):
                        tool = {"id": call["id"], "name": call["function"]["name"]}
                    arguments.append(call["function"].get("arguments") or "")
                finish = choice.get("finish_reason") or finish
            if obj.get("usage"):
                u = obj["usage"]
                usage = {"prompt": u["prompt_tokens"], "completion": u["completion_tokens"]}
    if tool:
        tool["arguments"] = json.loads("".join(arguments) or "{}")
    return {"text": "".join(text), "tool": tool, "finish": finish, "usage": usage}


def sent_of(seen: dict[str, Any]) -> bytes:
    return base64.b64decode(seen["sent_b64"])


def access_line(stack: Stack, request_id: str) -> dict[str, Any]:
    """Envoy's access-log line of the request with this x-request-id."""

    def find():
        log = Path(stack.workdir) / "access.log"
        if not log.exists():
            return None
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("request_id") == request_id:
                return entry
        return None

    entry = wait_for(find)
    assert entry, f"no access-log line for {request_id}"
    return entry
