"""The answer every format gives, decided once per request (sans-I/O).

Each format's request is read into a neutral (Chat Completions-like) request, and
`make_plan` turns that into the words or tool-call fragments, the finish reason and the
token counts, so every format answers the same conversation with the same words and
usage; the format modules only change the shape. Output is deterministic: ids,
`created` and the words come from a hash of the request, so one request always gives
the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.dev.mock.knobs import MockOptions

_VOCAB = (
    "gateway", "stream", "token", "river", "lantern", "orbit", "maple", "quartz",
    "signal", "harbor", "meadow", "pixel", "cobalt", "ember", "falcon", "garden",
    "horizon", "island", "jasmine", "kernel", "lattice", "mosaic", "nebula", "oasis",
    "prism", "ripple", "summit", "tundra", "velvet", "willow", "zephyr", "beacon",
    "canyon", "delta", "echo", "fjord", "glacier", "haven", "ivory", "juniper",
)  # fmt: skip

# The seed request of the demo ("...what I should call my first GitHub repo.") gets
# a plausible answer; exactly DEFAULT_TOKENS tokens long.
_REPO_ANSWER = (
    "How", " about", ' "', "hello", "-world", '"', " or", ' "', "first", "-commit", '"', "?",
)  # fmt: skip

_PROMPT_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
FRAGMENT_RE = re.compile(r"\s?\w+|[^\w\s]+|\s+")
_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def text_of(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _count(text: str) -> int:
    return len(_PROMPT_TOKEN_RE.findall(text))


def count_prompt_tokens(request: Mapping[str, Any]) -> int:
    """Deterministic prompt size: words + punctuation, 3 per message, 3 for the reply.

    Message names, tool calls in assistant messages and tool definitions count as
    their words and punctuation too, so longer requests always cost more.
    """
    total = 3
    for message in request.get("messages") or ():
        if not isinstance(message, dict):
            continue
        total += 3 + _count(text_of(message.get("content")))
        if isinstance(message.get("name"), str):
            total += 1 + _count(message["name"])
        for call in message.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                total += _count(str(fn.get("name", ""))) + _count(str(fn.get("arguments", "")))
    if request.get("tools"):
        total += _count(orjson.dumps(request["tools"]).decode())
    return total


def _canonical(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def digest(value: Any) -> bytes:
    return hashlib.sha256(_canonical(value)).digest()


def base62(data: bytes, length: int) -> str:
    n = int.from_bytes(data, "big")
    out = []
    for _ in range(length):
        n, r = divmod(n, 62)
        out.append(_ID_ALPHABET[r])
    return "".join(out)


def _last_user_text(messages: Sequence[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def _words(rng: random.Random, n: int, canned: Sequence[str]) -> list[str]:
    """`n` content tokens: the canned answer first, then vocabulary words, ending in '.'."""
    tokens = list(canned[:n])
    for i in range(len(tokens), n):
        word = rng.choice(_VOCAB)
        tokens.append(word.capitalize() if i == 0 else " " + word)
    if n > len(canned):
        tokens[-1] += "."
    return tokens


def _pick_tool(request: Mapping[str, Any]) -> dict[str, Any] | None:
    tools = [
        t["function"]
        for t in request.get("tools") or ()
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]
    ]
    choice = request.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        for tool in tools:
            if tool["name"] == wanted:
                return tool
    return tools[0]


def _fake_value(rng: random.Random, schema: Any) -> Any:
    if not isinstance(schema, dict):
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return f"{rng.choice(_VOCAB)} {rng.choice(_VOCAB)}"
    if kind == "integer":
        return rng.randint(1, 100)
    if kind == "number":
        return rng.randint(1, 1000) / 10
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return None


def _fake_arguments(rng: random.Random, function: Mapping[str, Any]) -> str:
    params = function.get("parameters")
    props = params.get("properties") if isinstance(params, dict) else None
    if not isinstance(props, dict):
        return "{}"
    return orjson.dumps({k: _fake_value(rng, v) for k, v in props.items()}).decode()


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything both builders need, so stream and non-stream agree exactly."""

    ident: str
    created: int
    model: str
    fingerprint: str
    pieces: tuple[str, ...]  # content tokens, or tool-call argument fragments
    tool: tuple[str, str] | None  # (call id, function name) when answering with a tool call
    finish_reason: str
    usage: dict[str, Any]


def make_plan(request: Mapping[str, Any], options: MockOptions) -> Plan:
    model = str(request.get("model", ""))
    whole = digest(request)
    # Words depend only on the conversation, so stream, non-stream and different
    # max_tokens agree: a "length" answer is a prefix of the "stop" one.
    content_seed = digest([request.get("model"), request.get("messages"), request.get("tools")])
    rng = random.Random(content_seed)

    tool_fn = _pick_tool(request) if options.tool_call else None
    tool: tuple[str, str] | None = None
    if tool_fn is not None:
        tool = ("call_" + base62(content_seed[8:], 24), str(tool_fn["name"]))
        full = FRAGMENT_RE.findall(_fake_arguments(rng, tool_fn))
        natural_finish = "tool_calls"
    elif options.text is not None:
        full = FRAGMENT_RE.findall(options.text)
        natural_finish = "stop"
    else:
        canned = (
            _REPO_ANSWER
            if "github repo" in _last_user_text(request.get("messages") or ()).lower()
            else ()
        )
        full = _words(rng, options.tokens, canned)
        natural_finish = "stop"

    cap = request.get("max_completion_tokens") or request.get("max_tokens")
    reasoning = options.reasoning_tokens
    visible = len(full)
    if cap is not None:
        # Reasoning tokens spend the same budget, as with OpenAI's o-series models.
        reasoning = min(reasoning, cap)
        visible = min(visible, cap - reasoning)
    finish = natural_finish if visible == len(full) else "length"

    prompt = count_prompt_tokens(request)
    completion = visible + reasoning
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": min(options.cached_tokens, prompt),
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    return Plan(
        ident="chatcmpl-" + base62(whole, 29),
        created=1_700_000_000 + int.from_bytes(whole[-4:], "big") % 50_000_000,
        model=model,
        fingerprint="fp_" + hashlib.sha256(model.encode()).hexdigest()[:10],
        pieces=tuple(full[:visible]),
        tool=tool,
        finish_reason=finish,
        usage=usage,
    )


# ---- helpers the format modules share


def function_tool(name: Any, parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": str(name), "parameters": parameters}}


def neutral(model: str, messages: list[dict[str, Any]], tools: list[Any], cap: Any,
             tool_choice: Any = None) -> dict[str, Any]:  # fmt: skip
    request: dict[str, Any] = {"model": model, "messages": messages}
    if tools:
        request["tools"] = tools
    if tool_choice is not None:
        request["tool_choice"] = tool_choice
    if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
        request["max_tokens"] = cap
    return request


def split_usage(plan: Plan) -> tuple[int, int, int, int, int]:
    """(prompt, cached, visible output, reasoning, completion) from the plan's usage."""
    usage = plan.usage
    prompt = usage["prompt_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    completion = usage["completion_tokens"]
    return prompt, cached, completion - reasoning, reasoning, completion


def sse_event(event: str | None, data: bytes, ending: bytes) -> bytes:
    head = b"event: " + event.encode() + ending if event is not None else b""
    return head + b"data: " + data + ending + ending


def hex_id(plan: Plan, salt: str, length: int = 48) -> str:
    return hashlib.sha256((plan.ident + salt).encode()).hexdigest()[:length]


def tool_arguments(plan: Plan) -> Any:
    try:
        return orjson.loads("".join(plan.pieces))
    except orjson.JSONDecodeError:  # cut short by max tokens
        return {}
