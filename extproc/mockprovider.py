"""Mock LLM provider for `make run` and the end-to-end tests: every wire format the
gateway reads, from one process.

The network is closed, so this is the only stand-in for the providers. It streams
OpenAI Chat Completions byte for byte the way the real API does (compact JSON, key
order, `usage: null` on every chunk when usage is requested, a final `choices: []`
usage chunk, `[DONE]`), and, synthesized from the providers' public docs with made-up
ids, the other formats on their own paths:

- OpenAI Responses: `POST /v1/responses` (typed SSE events);
- Azure OpenAI: `POST /openai/deployments/{deployment}/chat/completions` (filter
  results chunks) and `/openai/v1/...`;
- Anthropic Messages: `POST /v1/messages`;
- Gemini: `POST /v1beta/models/{model}:generateContent` / `:streamGenerateContent`
  (`?alt=sse` for SSE, else one streamed JSON array), and the same under Vertex's
  `/v1/projects/{p}/locations/{l}/publishers/google/models/...`;
- Bedrock: `POST /model/{modelId}/converse` / `converse-stream` (binary event stream).

All formats answer the same conversation with the same words and token counts, and
honour the same header knobs that reproduce what the gateway must survive (split or
coalesced chunks, gzip it did not ask for, a provider that dies mid-stream, error
statuses in the format's own error shape, other line endings, a given answer text).

Generation is sans-I/O: `build_stream` and `build_completion` are pure functions of
the request dict and `MockOptions`, so tests and the benchmark reuse them without a
server. Output is deterministic: ids, `created` and the words are derived from a hash
of the request, so one request always gives the same bytes.

Run it: `python -m extproc.mockprovider --host 127.0.0.1 --port 9000 [--delay-ms 20]
[--tokens 12]`; in process: `create_app(...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import random
import re
import signal
import socket
import struct
import sys
import termios
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web

from extproc.providers.eventstream import message as eventstream_message

__all__ = [
    "DEFAULT_TOKENS",
    "KNOB_HEADERS",
    "MODELS",
    "MockError",
    "MockOptions",
    "WireKnobs",
    "build_anthropic",
    "build_anthropic_stream",
    "build_bedrock",
    "build_bedrock_stream",
    "build_completion",
    "build_gemini",
    "build_gemini_stream",
    "build_responses",
    "build_responses_stream",
    "build_stream",
    "count_prompt_tokens",
    "create_app",
    "error_payload",
    "gzip_pieces",
    "main",
    "parse_knobs",
    "parse_request",
    "render_error",
    "serve",
    "split_at",
]

log = logging.getLogger("extproc.mockprovider")
# What the handler did, for the middleware's one log line (same task, same context).
_NOTE: contextvars.ContextVar[str] = contextvars.ContextVar("mock_note", default="")

DEFAULT_TOKENS = 12
MAX_EXCHANGES = 1000
# Pause between the writes of an `x-mock-split` body so each travels on its own.
SPLIT_PAUSE_S = 0.005
# How long a cut waits for the kernel to send what was written before the reset.
CUT_FLUSH_TIMEOUT_S = 1.0

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"
EVENTSTREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"

# Every knob is a request header so it passes through Envoy untouched.
KNOB_HEADERS = (
    "x-mock-tokens",
    "x-mock-delay-ms",
    "x-mock-split",
    "x-mock-status",
    "x-mock-cut-after",
    "x-mock-cut-mode",
    "x-mock-gzip",
    "x-mock-no-usage",
    "x-mock-line-ending",
    "x-mock-request-id",
    "x-mock-tool-call",
    "x-mock-cached-tokens",
    "x-mock-reasoning-tokens",
    "x-mock-text",
)

# (id, created, owned_by), the shape and values of OpenAI's /v1/models.
MODELS: tuple[tuple[str, int, str], ...] = (
    ("gpt-3.5-turbo", 1677610602, "openai"),
    ("gpt-4o-mini", 1721172741, "system"),
    ("gpt-4o", 1715367049, "system"),
    ("gpt-4.1-mini", 1744318173, "system"),
    ("text-embedding-3-small", 1705948997, "system"),
)

_LINE_ENDINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

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
_FRAGMENT_RE = re.compile(r"\s?\w+|[^\w\s]+|\s+")
_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# OpenAI's (type, code, message) per status, used by `x-mock-status`.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Bad request (x-mock-status: 400)."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: sk-mock****. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: (
        "request_forbidden",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for {model} in organization org-mock on requests per min "
        "(RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: (
        "server_error",
        None,
        "The engine is currently overloaded, please try again later",
    ),
}


# --------------------------------------------------------------------------- errors


class MockError(Exception):
    """An OpenAI-style error answer: status plus the `{"error": {...}}` fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def error_payload(status: int, *, model: str = "gpt-3.5-turbo") -> dict[str, Any]:
    """OpenAI's error body for `status` (what `x-mock-status` answers)."""
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    type_, code, message = _ERRORS.get(
        status, (default_type, None, f"Mock error (x-mock-status: {status}).")
    )
    return MockError(status, message.format(model=model), code=code, type_=type_).payload()


# --------------------------------------------------------------------------- options


@dataclass(frozen=True, slots=True)
class MockOptions:
    """Knobs that change what the mock generates (the bytes of the body)."""

    tokens: int = DEFAULT_TOKENS
    tool_call: bool = False
    no_usage: bool = False
    line_ending: bytes = b"\n"
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    text: str | None = None  # the answer, word by word, instead of generated words


@dataclass(frozen=True, slots=True)
class WireKnobs:
    """Knobs that change how the body travels (timing, cuts, encoding), not its bytes."""

    delay_s: float = 0.0
    split: tuple[int, ...] | Literal["all"] | None = None
    status: int | None = None
    cut_after: int | None = None
    cut_mode: Literal["reset", "close"] = "reset"
    gzip: bool = False
    request_id: str | None = None


def _knob_error(name: str, value: str, expected: str) -> MockError:
    return MockError(
        400,
        f"Invalid mock header {name}: {value!r} (expected {expected}).",
        param=name,
        code="invalid_mock_header",
    )


def _int_knob(h: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    raw = h.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise _knob_error(name, raw, f"an integer >= {minimum}") from None
    if value < minimum:
        raise _knob_error(name, raw, f"an integer >= {minimum}")
    return value


def _bool_knob(h: Mapping[str, str], name: str) -> bool:
    raw = h.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _knob_error(name, raw, "1 or 0")


def parse_knobs(
    headers: Mapping[str, str],
    *,
    default_delay_ms: float = 0.0,
    default_tokens: int | None = None,
) -> tuple[MockOptions, WireKnobs]:
    """Read the `x-mock-*` request headers; raise MockError (400) on a malformed one."""
    h = {k.lower(): v for k, v in headers.items()}

    tokens = _int_knob(h, "x-mock-tokens")
    if tokens is None:
        tokens = DEFAULT_TOKENS if default_tokens is None else default_tokens

    delay_ms = default_delay_ms
    if (raw := h.get("x-mock-delay-ms")) is not None:
        try:
            delay_ms = float(raw.strip())
        except ValueError:
            raise _knob_error("x-mock-delay-ms", raw, "milliseconds >= 0") from None
        if not delay_ms >= 0 or delay_ms == float("inf"):
            raise _knob_error("x-mock-delay-ms", raw, "milliseconds >= 0")

    split: tuple[int, ...] | Literal["all"] | None = None
    if (raw := h.get("x-mock-split")) is not None:
        if raw.strip().lower() == "all":
            split = "all"
        else:
            try:
                offsets = [int(p) for p in raw.split(",") if p.strip()]
            except ValueError:
                raise _knob_error("x-mock-split", raw, "'all' or byte offsets 1,2,3") from None
            if any(o < 0 for o in offsets):
                raise _knob_error("x-mock-split", raw, "non-negative byte offsets")
            split = tuple(sorted(set(offsets)))

    status = _int_knob(h, "x-mock-status")
    if status is not None and not 400 <= status <= 599:
        raise _knob_error("x-mock-status", h["x-mock-status"], "a status in 400-599")

    cut_mode = h.get("x-mock-cut-mode", "reset").strip().lower()
    if cut_mode not in ("reset", "close"):
        raise _knob_error("x-mock-cut-mode", cut_mode, "reset or close")

    ending = h.get("x-mock-line-ending", "lf").strip().lower()
    if ending not in _LINE_ENDINGS:
        raise _knob_error("x-mock-line-ending", ending, "lf, crlf or cr")

    options = MockOptions(
        tokens=tokens,
        tool_call=_bool_knob(h, "x-mock-tool-call"),
        no_usage=_bool_knob(h, "x-mock-no-usage"),
        line_ending=_LINE_ENDINGS[ending],
        cached_tokens=_int_knob(h, "x-mock-cached-tokens") or 0,
        reasoning_tokens=_int_knob(h, "x-mock-reasoning-tokens") or 0,
        text=h.get("x-mock-text"),
    )
    wire = WireKnobs(
        delay_s=delay_ms / 1000.0,
        split=split,
        status=status,
        cut_after=_int_knob(h, "x-mock-cut-after"),
        cut_mode=cut_mode,  # type: ignore[arg-type]
        gzip=_bool_knob(h, "x-mock-gzip"),
        request_id=h.get("x-mock-request-id"),
    )
    return options, wire


# --------------------------------------------------------------------------- request


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson refuses integers beyond 64 bits that are still valid JSON.
        return json.loads(body)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = _loads(body)
    except (ValueError, UnicodeDecodeError):
        raise MockError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means "
            "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
            "payload, but what was sent was not valid JSON.)",
        ) from None
    if not isinstance(request, dict):
        raise MockError(
            400,
            f"Invalid type for body: expected an object, but got {_json_type(request)} instead.",
            code="invalid_type",
        )
    return request


def parse_request(body: bytes, default_model: str | None = None) -> dict[str, Any]:
    """Parse and validate a Chat Completions body the way OpenAI does (400 otherwise).

    `default_model` stands in for a missing `model` (Azure's deployment paths)."""
    request = _json_object(body)
    if default_model and "model" not in request:
        request["model"] = default_model
    for name in ("model", "messages"):
        if name not in request:
            raise MockError(
                400,
                f"Missing required parameter: '{name}'.",
                param=name,
                code="missing_required_parameter",
            )
    _expect(request, "model", str, "a string")
    messages = request["messages"]
    _expect(request, "messages", list, "an array")
    if not messages:
        raise MockError(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise MockError(
                400,
                f"Invalid value for 'messages[{i}]': expected an object with a 'role'.",
                param=f"messages[{i}]",
                code="invalid_value",
            )
    _expect(request, "stream", bool, "a boolean")
    _expect(request, "stream_options", dict, "an object")
    if request.get("stream_options") is not None and request.get("stream") is not True:
        raise MockError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
            code="invalid_value",
        )
    for name in ("max_tokens", "max_completion_tokens"):
        _expect(request, name, int, "an integer")
        value = request.get(name)
        if value is not None and value < 1:
            raise MockError(
                400,
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
                f"but got {value} instead.",
                param=name,
                code="integer_below_min_value",
            )
    _expect(request, "tools", list, "an array")
    for i, tool in enumerate(request.get("tools") or ()):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise MockError(
                400,
                f"Missing required parameter: 'tools[{i}].function.name'.",
                param=f"tools[{i}].function.name",
                code="missing_required_parameter",
            )
    return request


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return "an object"


def _expect(request: dict[str, Any], name: str, kind: type, expected: str) -> None:
    value = request.get(name)
    if value is None:
        return
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MockError(
            400,
            f"Invalid type for '{name}': expected {expected}, but got {_json_type(value)} instead.",
            param=name,
            code="invalid_type",
        )


# --------------------------------------------------------------------------- generation


def _text_of(content: Any) -> str:
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
        total += 3 + _count(_text_of(message.get("content")))
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


def _digest(value: Any) -> bytes:
    return hashlib.sha256(_canonical(value)).digest()


def _base62(data: bytes, length: int) -> str:
    n = int.from_bytes(data, "big")
    out = []
    for _ in range(length):
        n, r = divmod(n, 62)
        out.append(_ID_ALPHABET[r])
    return "".join(out)


def _last_user_text(messages: Sequence[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
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
class _Plan:
    """Everything both builders need, so stream and non-stream agree exactly."""

    ident: str
    created: int
    model: str
    fingerprint: str
    pieces: tuple[str, ...]  # content tokens, or tool-call argument fragments
    tool: tuple[str, str] | None  # (call id, function name) when answering with a tool call
    finish_reason: str
    usage: dict[str, Any]


def _plan(request: Mapping[str, Any], options: MockOptions) -> _Plan:
    model = str(request.get("model", ""))
    whole = _digest(request)
    # Words depend only on the conversation, so stream, non-stream and different
    # max_tokens agree: a "length" answer is a prefix of the "stop" one.
    content_seed = _digest([request.get("model"), request.get("messages"), request.get("tools")])
    rng = random.Random(content_seed)

    tool_fn = _pick_tool(request) if options.tool_call else None
    tool: tuple[str, str] | None = None
    if tool_fn is not None:
        tool = ("call_" + _base62(content_seed[8:], 24), str(tool_fn["name"]))
        full = _FRAGMENT_RE.findall(_fake_arguments(rng, tool_fn))
        natural_finish = "tool_calls"
    elif options.text is not None:
        full = _FRAGMENT_RE.findall(options.text)
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
    return _Plan(
        ident="chatcmpl-" + _base62(whole, 29),
        created=1_700_000_000 + int.from_bytes(whole[-4:], "big") % 50_000_000,
        model=model,
        fingerprint="fp_" + hashlib.sha256(model.encode()).hexdigest()[:10],
        pieces=tuple(full[:visible]),
        tool=tool,
        finish_reason=finish,
        usage=usage,
    )


def build_completion(request: Mapping[str, Any], options: MockOptions = MockOptions()) -> dict:
    """The non-streaming `chat.completion` object for a (validated) request."""
    plan = _plan(request, options)
    if plan.tool is not None:
        call_id, name = plan.tool
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": "".join(plan.pieces)},
                }
            ],
            "refusal": None,
        }
    else:
        message = {"role": "assistant", "content": "".join(plan.pieces), "refusal": None}
    completion: dict[str, Any] = {
        "id": plan.ident,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": plan.finish_reason,
            }
        ],
    }
    if not options.no_usage:
        completion["usage"] = plan.usage
    completion["system_fingerprint"] = plan.fingerprint
    return completion


def build_stream(
    request: Mapping[str, Any], options: MockOptions = MockOptions(), *, azure: bool = False
) -> list[bytes]:
    """The SSE frames of a streamed answer, each `data: {json}` plus a blank line.

    Role chunk, one chunk per token (or tool-call argument fragment), finish chunk,
    then the usage chunk when `stream_options.include_usage` is true, then `[DONE]`.
    Azure OpenAI (`azure=True`) first sends a chunk of prompt filter results with no
    choices, and adds content filter results to every choice that carries output.
    """
    plan = _plan(request, options)
    stream_options = request.get("stream_options") or {}
    include_usage = stream_options.get("include_usage") is True and not options.no_usage
    end = options.line_ending * 2

    def frame(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": plan.ident,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.model,
            "system_fingerprint": plan.fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if azure:
            chunk["choices"][0]["content_filter_results"] = (
                _AZURE_FILTER_RESULTS if delta.get("content") or finish else {}
            )
        if include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + end

    if plan.tool is not None:
        call_id, name = plan.tool
        first = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            ],
            "refusal": None,
        }
        frames = [frame(first)]
        frames += [
            frame({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in plan.pieces
        ]
    else:
        frames = [frame({"role": "assistant", "content": "", "refusal": None})]
        frames += [frame({"content": piece}) for piece in plan.pieces]
    frames.append(frame({}, plan.finish_reason))
    if include_usage:
        usage_chunk = {
            "id": plan.ident,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.model,
            "system_fingerprint": plan.fingerprint,
            "choices": [],
            "usage": plan.usage,
        }
        frames.append(b"data: " + orjson.dumps(usage_chunk) + end)
    frames.append(b"data: [DONE]" + end)
    if azure:
        filters = {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": [
                {"prompt_index": 0, "content_filter_results": _AZURE_FILTER_RESULTS}
            ],
        }
        frames.insert(0, b"data: " + orjson.dumps(filters) + end)
    return frames


_AZURE_FILTER_RESULTS = {
    name: {"filtered": False, "severity": "safe"}
    for name in ("hate", "self_harm", "sexual", "violence")
}

# --------------------------------------------------------------------------- other formats
# Each format's request is read into the neutral (Chat Completions-like) request that
# `_plan` understands, so every format answers with the same words, tool calls and
# token counts for the same conversation; the builders below only change the shape.


def _blocks_text(value: Any) -> str:
    """Text of a string or of a list of blocks/parts with a `text` (any format)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(
            p["text"] for p in value if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _function(name: Any, parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": str(name), "parameters": parameters}}


def _neutral(model: str, messages: list[dict[str, Any]], tools: list[Any], cap: Any,
             tool_choice: Any = None) -> dict[str, Any]:  # fmt: skip
    request: dict[str, Any] = {"model": model, "messages": messages}
    if tools:
        request["tools"] = tools
    if tool_choice is not None:
        request["tool_choice"] = tool_choice
    if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
        request["max_tokens"] = cap
    return request


def neutral_from_responses(request: Mapping[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if isinstance(request.get("instructions"), str):
        messages.append({"role": "system", "content": request["instructions"]})
    value = request.get("input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
    for item in value if isinstance(value, list) else ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": str(item.get("role", "user")),
                             "content": _blocks_text(item.get("content"))})  # fmt: skip
        elif kind == "function_call":
            call = {"function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "content": _blocks_text(item.get("output"))})
    tools = [_function(t.get("name"), t.get("parameters")) for t in request.get("tools") or ()
             if isinstance(t, dict) and t.get("type") == "function"]  # fmt: skip
    return _neutral(str(request.get("model")), messages, tools, request.get("max_output_tokens"))


def neutral_from_anthropic(request: Mapping[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if request.get("system"):
        messages.append({"role": "system", "content": _blocks_text(request["system"])})
    for message in request.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        texts = [_blocks_text(content)] if isinstance(content, str) else []
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "tool_result":
                texts.append(_blocks_text(block.get("content")))
            elif isinstance(block, dict) and block.get("type") == "text":
                texts.append(_blocks_text([block]))
        messages.append({"role": str(message.get("role")), "content": " ".join(texts)})
    tools = [_function(t.get("name"), t.get("input_schema")) for t in request.get("tools") or ()
             if isinstance(t, dict) and "name" in t]  # fmt: skip
    choice = request.get("tool_choice")
    tool_choice: Any = None
    if isinstance(choice, dict) and choice.get("type") == "tool":
        tool_choice = {"type": "function", "function": {"name": choice.get("name")}}
    elif isinstance(choice, dict) and choice.get("type") == "none":
        tool_choice = "none"
    return _neutral(str(request.get("model")), messages, tools, request.get("max_tokens"),
                    tool_choice)  # fmt: skip


def neutral_from_gemini(request: Mapping[str, Any], model: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    system = request.get("systemInstruction") or request.get("system_instruction")
    if isinstance(system, dict):
        messages.append({"role": "system", "content": _blocks_text(system.get("parts"))})
    for content in request.get("contents") or ():
        if isinstance(content, dict):
            role = "assistant" if content.get("role") == "model" else "user"
            messages.append({"role": role, "content": _blocks_text(content.get("parts"))})
    tools = []
    for tool in request.get("tools") or ():
        if not isinstance(tool, dict):
            continue
        declarations = tool.get("functionDeclarations") or tool.get("function_declarations")
        tools += [_function(d.get("name"), d.get("parameters")) for d in declarations or ()
                  if isinstance(d, dict) and "name" in d]  # fmt: skip
    config = request.get("generationConfig") or request.get("generation_config") or {}
    cap = config.get("maxOutputTokens", config.get("max_output_tokens")) if isinstance(
        config, dict) else None  # fmt: skip
    return _neutral(model, messages, tools, cap)


def neutral_from_bedrock(request: Mapping[str, Any], model: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if request.get("system"):
        messages.append({"role": "system", "content": _blocks_text(request["system"])})
    for message in request.get("messages") or ():
        if isinstance(message, dict):
            messages.append({"role": str(message.get("role")),
                             "content": _blocks_text(message.get("content"))})  # fmt: skip
    tools = []
    config = request.get("toolConfig")
    for tool in config.get("tools") or () if isinstance(config, dict) else ():
        spec = tool.get("toolSpec") if isinstance(tool, dict) else None
        if isinstance(spec, dict) and "name" in spec:
            schema = spec.get("inputSchema")
            tools.append(_function(spec["name"], schema.get("json") if isinstance(schema, dict)
                                   else None))  # fmt: skip
    inference = request.get("inferenceConfig")
    cap = inference.get("maxTokens") if isinstance(inference, dict) else None
    return _neutral(model, messages, tools, cap)


def _split_usage(plan: _Plan) -> tuple[int, int, int, int, int]:
    """(prompt, cached, visible output, reasoning, completion) from the plan's usage."""
    usage = plan.usage
    prompt = usage["prompt_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    completion = usage["completion_tokens"]
    return prompt, cached, completion - reasoning, reasoning, completion


def _sse(event: str | None, data: bytes, ending: bytes) -> bytes:
    head = b"event: " + event.encode() + ending if event is not None else b""
    return head + b"data: " + data + ending + ending


def _hex_id(plan: _Plan, salt: str, length: int = 48) -> str:
    return hashlib.sha256((plan.ident + salt).encode()).hexdigest()[:length]


def _tool_arguments(plan: _Plan) -> Any:
    try:
        return orjson.loads("".join(plan.pieces))
    except orjson.JSONDecodeError:  # cut short by max tokens
        return {}


# ---- OpenAI Responses

_RESPONSES_FINISH = {"length": ("incomplete", {"reason": "max_output_tokens"})}


def _responses_object(
    request: Mapping[str, Any], plan: _Plan, options: MockOptions, status: str, output: list
) -> dict[str, Any]:
    prompt, cached, _, reasoning, completion = _split_usage(plan)
    usage = None
    if status != "in_progress" and not options.no_usage:
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion,
        }
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": "resp_" + _hex_id(plan, "resp"), "object": "response",
        "created_at": plan.created, "status": status, "background": False, "error": None,
        "incomplete_details": incomplete, "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"), "model": plan.model,
        "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": request.get("tools") or [], "top_p": 1.0, "truncation": "disabled",
        "usage": usage, "user": None, "metadata": {},
    }  # fmt: skip


def _responses_item(plan: _Plan, status: str, done: bool) -> dict[str, Any]:
    if plan.tool is not None:
        call_id, name = plan.tool
        return {"id": "fc_" + _hex_id(plan, "fc"), "type": "function_call", "status": status,
                "arguments": "".join(plan.pieces) if done else "", "call_id": call_id,
                "name": name}  # fmt: skip
    content = [_output_text("".join(plan.pieces))] if done else []
    return {"id": "msg_" + _hex_id(plan, "msg"), "type": "message", "status": status,
            "content": content, "role": "assistant"}  # fmt: skip


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def build_responses(
    request: Mapping[str, Any], options: MockOptions = MockOptions()
) -> dict[str, Any]:
    """The non-streaming Responses API object."""
    plan = _plan(neutral_from_responses(request), options)
    status = "incomplete" if plan.finish_reason == "length" else "completed"
    return _responses_object(request, plan, options, status, [_responses_item(plan, status, True)])


def build_responses_stream(
    request: Mapping[str, Any], options: MockOptions = MockOptions()
) -> list[bytes]:
    """Typed SSE events: created, in_progress, the output item with its deltas and
    whole-text repeats, then completed (incomplete when cut by max_output_tokens)."""
    plan = _plan(neutral_from_responses(request), options)
    final = "incomplete" if plan.finish_reason == "length" else "completed"
    item_id = _responses_item(plan, "in_progress", False)["id"]
    text = "".join(plan.pieces)
    events: list[dict[str, Any]] = [
        {"type": "response.created",
         "response": _responses_object(request, plan, options, "in_progress", [])},
        {"type": "response.in_progress",
         "response": _responses_object(request, plan, options, "in_progress", [])},
        {"type": "response.output_item.added", "output_index": 0,
         "item": _responses_item(plan, "in_progress", False)},
    ]  # fmt: skip
    if plan.tool is not None:
        events += [{"type": "response.function_call_arguments.delta", "item_id": item_id,
                    "output_index": 0, "delta": piece} for piece in plan.pieces]  # fmt: skip
        events.append({"type": "response.function_call_arguments.done", "item_id": item_id,
                       "output_index": 0, "arguments": text})  # fmt: skip
    else:
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        events.append({"type": "response.content_part.added", **where, "part": _output_text("")})
        events += [{"type": "response.output_text.delta", **where, "delta": piece,
                    "logprobs": []} for piece in plan.pieces]  # fmt: skip
        events.append({"type": "response.output_text.done", **where, "text": text,
                       "logprobs": []})  # fmt: skip
        events.append({"type": "response.content_part.done", **where, "part": _output_text(text)})
    item = _responses_item(plan, final, True)
    events.append({"type": "response.output_item.done", "output_index": 0, "item": item})
    events.append(
        {
            "type": f"response.{final}",
            "response": _responses_object(request, plan, options, final, [item]),
        }
    )
    frames = []
    for seq, event in enumerate(events):
        data = {"type": event.pop("type"), "sequence_number": seq, **event}
        frames.append(_sse(data["type"], orjson.dumps(data), options.line_ending))
    return frames


# ---- Anthropic Messages

_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 529: "overloaded_error",
}  # fmt: skip


def _anthropic_usage(plan: _Plan, output: int) -> dict[str, Any]:
    prompt, cached, *_ = _split_usage(plan)
    return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": output}  # fmt: skip


def _anthropic_ids(plan: _Plan) -> tuple[str, str]:
    digest = hashlib.sha256(plan.ident.encode()).digest()
    return "msg_01" + _base62(digest, 22), "toolu_01" + _base62(digest[16:], 22)


def build_anthropic(
    request: Mapping[str, Any], options: MockOptions = MockOptions()
) -> dict[str, Any]:
    """The non-streaming Messages answer."""
    plan = _plan(neutral_from_anthropic(request), options)
    message_id, tool_id = _anthropic_ids(plan)
    if plan.tool is not None:
        content = [{"type": "tool_use", "id": tool_id, "name": plan.tool[1],
                    "input": _tool_arguments(plan)}]  # fmt: skip
    else:
        content = [{"type": "text", "text": "".join(plan.pieces)}]
    answer: dict[str, Any] = {
        "id": message_id, "type": "message", "role": "assistant", "model": plan.model,
        "content": content, "stop_reason": _ANTHROPIC_STOP[plan.finish_reason],
        "stop_sequence": None,
    }  # fmt: skip
    if not options.no_usage:
        answer["usage"] = _anthropic_usage(plan, plan.usage["completion_tokens"])
    return answer


def build_anthropic_stream(
    request: Mapping[str, Any], options: MockOptions = MockOptions()
) -> list[bytes]:
    """message_start, a ping, one content block (text or tool_use) with its deltas,
    message_delta with the cumulative output count, message_stop."""
    plan = _plan(neutral_from_anthropic(request), options)
    message_id, tool_id = _anthropic_ids(plan)
    end = options.line_ending
    message: dict[str, Any] = {
        "id": message_id, "type": "message", "role": "assistant", "model": plan.model,
        "content": [], "stop_reason": None, "stop_sequence": None,
    }  # fmt: skip
    if not options.no_usage:
        message["usage"] = _anthropic_usage(plan, 1)

    def ev(kind: str, payload: dict[str, Any]) -> bytes:
        return _sse(kind, orjson.dumps({"type": kind, **payload}), end)

    if plan.tool is not None:
        block = {"type": "tool_use", "id": tool_id, "name": plan.tool[1], "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in ("", *plan.pieces)]
    else:
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in plan.pieces]
    frames = [
        ev("message_start", {"message": message}),
        ev("content_block_start", {"index": 0, "content_block": block}),
        _sse("ping", b'{"type": "ping"}', end),
        *[ev("content_block_delta", {"index": 0, "delta": d}) for d in deltas],
        ev("content_block_stop", {"index": 0}),
    ]
    final: dict[str, Any] = {
        "delta": {"stop_reason": _ANTHROPIC_STOP[plan.finish_reason], "stop_sequence": None}
    }
    if not options.no_usage:
        final["usage"] = {"output_tokens": plan.usage["completion_tokens"]}
    frames += [ev("message_delta", final), ev("message_stop", {})]
    return frames


# ---- Gemini / Vertex

_GEMINI_FINISH = {"stop": "STOP", "tool_calls": "STOP", "length": "MAX_TOKENS"}
_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                  503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}  # fmt: skip


def _gemini_usage(plan: _Plan, visible: int | None, done: bool) -> dict[str, Any]:
    prompt, cached, _, reasoning, _ = _split_usage(plan)
    meta: dict[str, Any] = {"promptTokenCount": prompt}
    if visible is not None:
        meta["candidatesTokenCount"] = visible
    meta["totalTokenCount"] = prompt + (visible or 0) + (reasoning if done else 0)
    if cached:
        meta["cachedContentTokenCount"] = cached
    meta["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if done and reasoning:
        meta["thoughtsTokenCount"] = reasoning
    return meta


def _gemini_elements(plan: _Plan, options: MockOptions, whole: bool) -> list[dict[str, Any]]:
    response_id = _base62(hashlib.sha256(plan.ident.encode()).digest(), 23)
    _, _, visible, _, _ = _split_usage(plan)
    if plan.tool is not None:
        call = {"functionCall": {"name": plan.tool[1], "args": _tool_arguments(plan)}}
        steps = [[call]]
    elif whole:
        steps = [[{"text": "".join(plan.pieces)}]]
    else:
        steps = [[{"text": piece}] for piece in plan.pieces] or [[{"text": ""}]]
    elements = []
    for i, parts in enumerate(steps):
        last = i == len(steps) - 1
        candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
        if last:
            candidate["finishReason"] = _GEMINI_FINISH[plan.finish_reason]
        candidate["index"] = 0
        element: dict[str, Any] = {"candidates": [candidate]}
        if not options.no_usage:
            seen = visible if last or plan.tool is not None else min(i + 1, visible)
            element["usageMetadata"] = _gemini_usage(plan, seen, last)
        element["modelVersion"] = plan.model
        element["responseId"] = response_id
        elements.append(element)
    return elements


def _gemini_line(obj: Any) -> bytes:
    """Gemini's one-line JSON: `"key": value`, items joined by `,` alone."""
    return json.dumps(obj, separators=(",", ": "), ensure_ascii=False).encode()


def build_gemini(
    request: Mapping[str, Any], model: str, options: MockOptions = MockOptions()
) -> dict[str, Any]:
    """The `:generateContent` answer."""
    plan = _plan(neutral_from_gemini(request, model), options)
    return _gemini_elements(plan, options, whole=True)[0]


def build_gemini_stream(
    request: Mapping[str, Any], model: str, options: MockOptions = MockOptions(), *, sse: bool
) -> list[bytes]:
    """`:streamGenerateContent`: SSE frames (`alt=sse`, CRLF by default) or the pieces
    of one pretty-printed JSON array (`[` + element, `\\n,\\r\\n` + element, ..., `\\n]`)."""
    plan = _plan(neutral_from_gemini(request, model), options)
    elements = _gemini_elements(plan, options, whole=False)
    if sse:
        end = options.line_ending
        return [b"data: " + _gemini_line(e) + end + end for e in elements]
    pretty = [json.dumps(e, indent=2, ensure_ascii=False).encode() for e in elements]
    return [b"[" + pretty[0], *[b"\n,\r\n" + p for p in pretty[1:]], b"\n]"]


# ---- Bedrock Converse

_BEDROCK_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_BEDROCK_ERRORS = {400: "ValidationException", 403: "AccessDeniedException",
                   404: "ResourceNotFoundException", 408: "ModelTimeoutException",
                   429: "ThrottlingException", 500: "InternalServerException",
                   503: "ServiceUnavailableException"}  # fmt: skip
_PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _bedrock_usage(plan: _Plan) -> dict[str, Any]:
    prompt, cached, _, _, completion = _split_usage(plan)
    usage = {"inputTokens": prompt - cached, "outputTokens": completion,
             "totalTokens": prompt + completion}  # fmt: skip
    if cached:
        usage["cacheReadInputTokens"] = cached
        usage["cacheWriteInputTokens"] = 0
    return usage


def _tool_use_id(plan: _Plan) -> str:
    return "tooluse_" + _base62(hashlib.sha256(plan.ident.encode()).digest(), 22)


def build_bedrock(
    request: Mapping[str, Any], model: str, options: MockOptions = MockOptions()
) -> dict[str, Any]:
    """The Converse answer (keys sorted, as Bedrock sends them)."""
    plan = _plan(neutral_from_bedrock(request, model), options)
    if plan.tool is not None:
        content = [{"toolUse": {"input": _tool_arguments(plan), "name": plan.tool[1],
                                "toolUseId": _tool_use_id(plan)}}]  # fmt: skip
    else:
        content = [{"text": "".join(plan.pieces)}]
    answer: dict[str, Any] = {
        "metrics": {"latencyMs": 100 + 20 * len(plan.pieces)},
        "output": {"message": {"content": content, "role": "assistant"}},
        "stopReason": _BEDROCK_STOP[plan.finish_reason],
    }
    if not options.no_usage:
        answer["usage"] = _bedrock_usage(plan)
    return answer


def _bedrock_event(kind: str, payload: dict[str, Any], n: int) -> bytes:
    # Bedrock pads every payload with `p` so lengths do not reveal the content.
    padded = {**payload, "p": _PADDING[: 1 + (n * 7) % len(_PADDING)]}
    return eventstream_message(
        [(":event-type", kind), (":content-type", "application/json"), (":message-type", "event")],
        orjson.dumps(padded, option=orjson.OPT_SORT_KEYS),
    )


def build_bedrock_stream(
    request: Mapping[str, Any], model: str, options: MockOptions = MockOptions()
) -> list[bytes]:
    """ConverseStream as `application/vnd.amazon.eventstream` messages."""
    plan = _plan(neutral_from_bedrock(request, model), options)
    frames = [_bedrock_event("messageStart", {"role": "assistant"}, 0)]
    if plan.tool is not None:
        start = {"toolUse": {"name": plan.tool[1], "toolUseId": _tool_use_id(plan)}}
        frames.append(_bedrock_event("contentBlockStart",
                                     {"contentBlockIndex": 0, "start": start}, 1))  # fmt: skip
        deltas = [{"toolUse": {"input": piece}} for piece in plan.pieces]
    else:
        deltas = [{"text": piece} for piece in plan.pieces]
    frames += [
        _bedrock_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": d}, i + 2)
        for i, d in enumerate(deltas)
    ]
    frames.append(_bedrock_event("contentBlockStop", {"contentBlockIndex": 0}, 3))
    frames.append(_bedrock_event("messageStop", {"stopReason": _BEDROCK_STOP[plan.finish_reason]},
                                 4))  # fmt: skip
    metadata: dict[str, Any] = {"metrics": {"latencyMs": 100 + 20 * len(plan.pieces)}}
    if not options.no_usage:
        metadata["usage"] = _bedrock_usage(plan)
    frames.append(_bedrock_event("metadata", metadata, 5))
    return frames


# ---- errors in each format's own shape


def render_error(fmt: str, err: MockError) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) of an error answer in format `fmt`'s shape."""
    if fmt == "anthropic":
        kind = _ANTHROPIC_ERRORS.get(
            err.status, "api_error" if err.status >= 500 else "invalid_request_error"
        )
        body = {"type": "error", "error": {"type": kind, "message": err.message},
                "request_id": "req_011" + _base62(hashlib.sha256(err.message.encode()).digest(),
                                                  21)}  # fmt: skip
        return orjson.dumps(body), {}
    if fmt == "gemini":
        status = _GEMINI_STATUS.get(
            err.status, "INTERNAL" if err.status >= 500 else "INVALID_ARGUMENT"
        )
        body = {"error": {"code": err.status, "message": err.message, "status": status}}
        return json.dumps(body, indent=2).encode(), {}
    if fmt == "bedrock":
        kind = _BEDROCK_ERRORS.get(
            err.status, "InternalServerException" if err.status >= 500 else "ValidationException"
        )
        headers = {
            "x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"
        }
        return orjson.dumps({"message": err.message}), headers
    return orjson.dumps(err.payload()), {}


def status_error(fmt: str, status: int, model: str) -> MockError:
    """What `x-mock-status` answers in format `fmt`."""
    if fmt == "openai":
        payload = error_payload(status, model=model)["error"]
        return MockError(status, payload["message"], code=payload["code"], type_=payload["type"])
    messages = {
        401: "invalid x-api-key" if fmt == "anthropic" else "The API key is not valid.",
        404: f"model: {model}",
        429: "Rate limit exceeded (x-mock-status: 429).",
        529: "Overloaded",
    }
    return MockError(status, messages.get(status, f"Mock error (x-mock-status: {status})."))


# --------------------------------------------------------------------------- wire helpers


def split_at(body: bytes, offsets: Sequence[int]) -> list[bytes]:
    """Cut `body` at the given byte offsets (out-of-range and duplicate ones ignored)."""
    cuts = [0, *sorted({o for o in offsets if 0 < o < len(body)}), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(cuts)]


def gzip_pieces(pieces: Sequence[bytes]) -> list[bytes]:
    """One gzip stream, sync-flushed after every piece so each still decodes on arrival."""
    co = zlib.compressobj(6, zlib.DEFLATED, 31)
    if not pieces:
        return [co.flush(zlib.Z_FINISH)]
    out = []
    for i, piece in enumerate(pieces):
        mode = zlib.Z_FINISH if i == len(pieces) - 1 else zlib.Z_SYNC_FLUSH
        out.append(co.compress(piece) + co.flush(mode))
    return out


def _kernel_unsent(sock: Any) -> int:
    """Bytes the kernel still holds for this socket (Linux SIOCOUTQ); 0 if unknown."""
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except (OSError, AttributeError, ValueError):
        return 0
    return struct.unpack("i", buf)[0]


# --------------------------------------------------------------------------- jobs
# A job is one validated request turned into the frames to send. Validation errors
# are MockErrors, rendered in the route's own error shape by the server.


@dataclass(frozen=True, slots=True)
class _Job:
    stream: bool
    frames: list[bytes]
    content_type: str  # of a streamed answer (a whole one is always JSON)
    model: str
    tokens: int  # output pieces, to pace a non-streamed answer like a stream


def _require(request: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = request.get(name)
    if value is None:
        raise MockError(400, f"{name}: Field required", param=name,
                        code="missing_required_parameter")  # fmt: skip
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MockError(400, f"{name}: Input should be {what}", param=name, code="invalid_type")
    return value


def _stream_flag(request: Mapping[str, Any]) -> bool:
    _expect(dict(request), "stream", bool, "a boolean")
    return request.get("stream") is True


def _chat_job(body: bytes, request: web.Request, options: MockOptions) -> _Job:
    chat = parse_request(body)
    return _chat_answer(chat, options, azure=False)


def _azure_chat_job(body: bytes, request: web.Request, options: MockOptions) -> _Job:
    deployment = request.match_info.get("deployment")
    chat = parse_request(body, default_model=deployment)
    return _chat_answer(chat, options, azure=deployment is not None)


def _chat_answer(chat: dict[str, Any], options: MockOptions, *, azure: bool) -> _Job:
    stream = chat.get("stream") is True
    if stream:
        frames = build_stream(chat, options, azure=azure)
    else:
        frames = [orjson.dumps(build_completion(chat, options))]
    tokens = len(_plan(chat, options).pieces)
    return _Job(stream, frames, SSE_CONTENT_TYPE, chat["model"], tokens)


def _responses_job(body: bytes, request: web.Request, options: MockOptions) -> _Job:
    data = _json_object(body)
    model = _require(data, "model", str, "a valid string")
    if data.get("input") is not None and not isinstance(data["input"], str | list):
        raise MockError(400, "Invalid type for 'input': expected a string or an array.",
                        param="input", code="invalid_type")  # fmt: skip
    stream = _stream_flag(data)
    frames = (
        build_responses_stream(data, options) if stream
        else [orjson.dumps(build_responses(data, options))]
    )  # fmt: skip
    tokens = len(_plan(neutral_from_responses(data), options).pieces)
    return _Job(stream, frames, SSE_CONTENT_TYPE, model, tokens)


def _anthropic_job(body: bytes, request: web.Request, options: MockOptions) -> _Job:
    data = _json_object(body)
    model = _require(data, "model", str, "a valid string")
    _require(data, "max_tokens", int, "a valid integer")
    messages = _require(data, "messages", list, "a valid list")
    if not messages:
        raise MockError(400, "messages: at least one message is required", param="messages")
    stream = _stream_flag(data)
    frames = (
        build_anthropic_stream(data, options) if stream
        else [orjson.dumps(build_anthropic(data, options))]
    )  # fmt: skip
    tokens = len(_plan(neutral_from_anthropic(data), options).pieces)
    return _Job(stream, frames, SSE_CONTENT_TYPE, model, tokens)


def _gemini_job(body: bytes, request: web.Request, options: MockOptions) -> _Job:
    model, _, action = request.match_info["action"].rpartition(":")
    if action not in ("generateContent", "streamGenerateContent") or not model:
        raise MockError(404, f"Method not found: {request.match_info['action']}")
    data = _json_object(body)
    if not isinstance(data.get("contents"), list):
        raise MockError(400, "* GenerateContentRequest.contents: contents is not specified")
    stream = action == "streamGenerateContent"
    sse = request.query.get("alt") == "sse"
    if "x-mock-line-ending" not in request.headers:
        options = dataclasses.replace(options, line_ending=b"\r\n")  # Gemini's own
    if stream:
        frames = build_gemini_stream(data, model, options, sse=sse)
    else:
        frames = [json.dumps(build_gemini(data, model, options), indent=2).encode()]
    kind = SSE_CONTENT_TYPE if sse else "application/json; charset=UTF-8"
    tokens = len(_plan(neutral_from_gemini(data, model), options).pieces)
    return _Job(stream, frames, kind, model, tokens)


def _bedrock_job(body: bytes, request: web.Request, options: MockOptions) -> _Job:
    model = request.match_info["model_id"]
    data = _json_object(body)
    if not isinstance(data.get("messages"), list):
        raise MockError(400, "1 validation error detected: Value null at 'messages' failed to "
                        "satisfy constraint: Member must not be null")  # fmt: skip
    stream = request.path.rstrip("/").endswith("/converse-stream")
    frames = (
        build_bedrock_stream(data, model, options) if stream
        else [orjson.dumps(build_bedrock(data, model, options), option=orjson.OPT_SORT_KEYS)]
    )  # fmt: skip
    tokens = len(_plan(neutral_from_bedrock(data, model), options).pieces)
    return _Job(stream, frames, EVENTSTREAM_CONTENT_TYPE, model, tokens)


def _model_hint(request: web.Request, body: bytes) -> str:
    """The requested model, for error messages (path first: Gemini, Bedrock, Azure)."""
    info = request.match_info
    if "model_id" in info:
        return info["model_id"]
    if "action" in info:
        return info["action"].rpartition(":")[0]
    try:
        return str(_loads(body).get("model") or info.get("deployment") or "gpt-3.5-turbo")
    except Exception:
        return info.get("deployment") or "gpt-3.5-turbo"


# --------------------------------------------------------------------------- server


@dataclass(slots=True)
class _Exchange:
    """One request as the mock saw it. `sent` is the whole answer it meant to send;
    `bytes_written`, `completed` and `client_went_away` say how far it got, so a test
    can tell a provider stream that was closed early from one that ran to its end
    without timing anything."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    sent: bytes
    status: int
    bytes_written: int = 0
    completed: bool = False  # every byte written and the body ended
    client_went_away: bool = False  # the peer (Envoy) closed before the body ended

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body_b64": base64.b64encode(self.body).decode(),
            "sent_b64": base64.b64encode(self.sent).decode(),
            "status": self.status,
            "bytes_written": self.bytes_written,
            "completed": self.completed,
            "client_went_away": self.client_went_away,
        }


class _MockProvider:
    """Route handlers plus the bounded exchange log."""

    def __init__(self, default_delay_ms: float, default_tokens: int | None) -> None:
        self.default_delay_ms = default_delay_ms
        self.default_tokens = default_tokens
        self.exchanges: OrderedDict[str, _Exchange] = OrderedDict()
        self._auto_id = 0

    # ---- exchange log

    def record(self, request: web.Request, body: bytes, sent: bytes, status: int) -> _Exchange:
        """Log an exchange under `x-mock-request-id` (or an automatic id); a whole
        (non-streamed) answer counts as written at once."""
        key = request.headers.get("x-mock-request-id")
        if key is None:
            self._auto_id += 1
            key = f"auto-{self._auto_id}"
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            lname = name.lower()
            headers[lname] = f"{headers[lname]},{value}" if lname in headers else value
        self.exchanges.pop(key, None)
        exchange = self.exchanges[key] = _Exchange(
            request.method,
            request.path,
            request.query_string,
            headers,
            body,
            sent,
            status,
            bytes_written=len(sent),
            completed=True,
        )
        while len(self.exchanges) > MAX_EXCHANGES:
            self.exchanges.popitem(last=False)
        return exchange

    def _json(
        self,
        request: web.Request,
        body: bytes,
        payload: Any,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        data = orjson.dumps(payload)
        self.record(request, body, data, status)
        return web.Response(
            body=data, status=status, content_type=JSON_CONTENT_TYPE, headers=headers
        )

    # ---- routes

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "openai", _chat_job)

    async def azure_chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "openai", _azure_chat_job)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "openai", _responses_job)

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "anthropic", _anthropic_job)

    async def gemini_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "gemini", _gemini_job)

    async def bedrock_converse(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "bedrock", _bedrock_job)

    def _error(self, request: web.Request, body: bytes, fmt: str, err: MockError) -> web.Response:
        data, headers = render_error(fmt, err)
        self.record(request, body, data, err.status)
        return web.Response(
            body=data, status=err.status, content_type=JSON_CONTENT_TYPE, headers=headers
        )

    async def _serve(self, request: web.Request, fmt: str, job_of: Any) -> web.StreamResponse:
        """One answer in format `fmt`: knobs, `x-mock-status`, validation, then the
        frames `job_of` builds, sent with the wire knobs (split, delay, gzip, cut)."""
        body = await request.read()
        try:
            options, wire = parse_knobs(
                request.headers,
                default_delay_ms=self.default_delay_ms,
                default_tokens=self.default_tokens,
            )
        except MockError as e:
            return self._error(request, body, fmt, e)
        if wire.status is not None:
            _NOTE.set("x-mock-status")
            return self._error(
                request, body, fmt, status_error(fmt, wire.status, _model_hint(request, body))
            )
        try:
            job = job_of(body, request, options)
        except MockError as e:
            _NOTE.set(e.message[:60])
            return self._error(request, body, fmt, e)

        frames = job.frames
        sent = b"".join(frames)
        exchange = self.record(request, body, sent, 200)
        exchange.bytes_written, exchange.completed = 0, False  # `_send` tracks it
        _NOTE.set(f"stream={job.stream} model={job.model} bytes={len(sent)}")

        if wire.split == "all":
            pieces = [sent]
        elif wire.split is not None:
            pieces = split_at(sent, wire.split)
        else:
            pieces = frames
        pause = wire.delay_s
        if wire.split is not None and pause < SPLIT_PAUSE_S:
            pause = SPLIT_PAUSE_S
        if not job.stream and wire.delay_s:
            # A non-streamed answer takes about as long as the stream would have.
            await asyncio.sleep(wire.delay_s * max(1, job.tokens))
        on_wire = gzip_pieces(pieces) if wire.gzip else pieces

        response = web.StreamResponse(status=200)
        response.content_type = JSON_CONTENT_TYPE
        if job.stream:
            response.headers["Content-Type"] = job.content_type
            response.enable_chunked_encoding()
        else:
            response.content_length = sum(len(p) for p in on_wire)
        if wire.gzip:
            response.headers["Content-Encoding"] = "gzip"
        digest = hashlib.sha256(body).hexdigest()
        if fmt == "anthropic":
            response.headers["request-id"] = "req_011" + digest[:21]
        elif fmt == "bedrock":
            response.headers["x-amzn-RequestId"] = str(uuid.UUID(digest[:32]))
        elif fmt == "openai":
            response.headers["x-request-id"] = "req_" + digest[:32]
        return await self._send(request, response, on_wire, pause, wire, exchange)

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse,
        pieces: Sequence[bytes],
        pause: float,
        wire: WireKnobs,
        exchange: _Exchange,
    ) -> web.StreamResponse:
        """Write `pieces` one write each; honour the cut knob; tolerate a vanished
        client, and note in `exchange` how far the body got (`bytes_written` counts
        body bytes handed to the transport, compressed if gzip)."""
        written = 0
        try:
            await response.prepare(request)
            for i, piece in enumerate(pieces):
                if i and pause:
                    await asyncio.sleep(pause)
                if wire.cut_after is not None and written + len(piece) >= wire.cut_after:
                    part = piece[: wire.cut_after - written]
                    if part:
                        await response.write(part)
                        exchange.bytes_written += len(part)
                    await self._cut(request, wire.cut_mode)
                    return response
                if piece:
                    await response.write(piece)
                    written += len(piece)
                    exchange.bytes_written = written
            if wire.cut_after is not None:
                await self._cut(request, wire.cut_mode)
                return response
            await response.write_eof()
            exchange.completed = True
        except ConnectionError:
            exchange.client_went_away = True
            log.info("client went away during %s after %d bytes", request.path, written)
        except asyncio.CancelledError:
            exchange.client_went_away = True  # aiohttp cancels handlers of lost peers
            raise
        return response

    async def _cut(self, request: web.Request, mode: str) -> None:
        """Drop the connection mid-body, after the bytes already written have left."""
        _NOTE.set(f"{_NOTE.get()} cut({mode})")
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        deadline = time.monotonic() + CUT_FLUSH_TIMEOUT_S
        while (
            transport.get_write_buffer_size() or (sock is not None and _kernel_unsent(sock))
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        if mode == "reset" and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": mid, "object": "model", "created": created, "owned_by": owner}
            for mid, created, owner in MODELS
        ]
        return self._json(request, b"", {"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        wanted = request.match_info["model"]
        for mid, created, owner in MODELS:
            if mid == wanted:
                obj = {"id": mid, "object": "model", "created": created, "owned_by": owner}
                return self._json(request, b"", obj)
        err = MockError(
            404,
            f"The model '{wanted}' does not exist",
            param="model",
            code="model_not_found",
        )
        return self._json(request, b"", err.payload(), 404)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def get_exchange(self, request: web.Request) -> web.Response:
        exchange = self.exchanges.get(request.match_info["id"])
        if exchange is None:
            return web.json_response({"error": "unknown exchange"}, status=404)
        return web.Response(body=orjson.dumps(exchange.to_json()), content_type=JSON_CONTENT_TYPE)

    async def list_exchanges(self, request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps({"ids": list(self.exchanges)}), content_type=JSON_CONTENT_TYPE
        )

    async def clear_exchanges(self, request: web.Request) -> web.Response:
        self.exchanges.clear()
        return web.Response(body=b'{"cleared":true}', content_type=JSON_CONTENT_TYPE)

    async def not_found(self, request: web.Request) -> web.Response:
        body = await request.read()
        err = MockError(404, f"Invalid URL ({request.method} {request.path})")
        return self._json(request, body, err.payload(), 404)


@web.middleware
async def _log_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    """One INFO line per request (aiohttp's own access log is off)."""
    start = time.perf_counter()
    status = 500
    _NOTE.set("")
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        if not request.path.startswith("/_mock") and request.path != "/healthz":
            log.info(
                "%s %s -> %d in %.1f ms %s",
                request.method,
                request.path_qs,
                status,
                (time.perf_counter() - start) * 1000,
                _NOTE.get(),
            )


def create_app(default_delay_ms: float = 0, default_tokens: int | None = None) -> web.Application:
    """The mock as an aiohttp app (tests run it in process; `serve` runs it standalone)."""
    provider = _MockProvider(default_delay_ms, default_tokens)
    app = web.Application(middlewares=[_log_requests], client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", provider.chat_completions)
    app.router.add_post("/v1/responses", provider.responses)
    app.router.add_post("/v1/messages", provider.anthropic_messages)
    # Azure OpenAI: deployment paths (?api-version=...) and the v1 API.
    app.router.add_post(
        "/openai/deployments/{deployment}/chat/completions", provider.azure_chat_completions
    )
    app.router.add_post("/openai/v1/chat/completions", provider.azure_chat_completions)
    app.router.add_post("/openai/v1/responses", provider.responses)
    # Gemini API (`/v1beta/models/{model}:streamGenerateContent`) and Vertex AI.
    app.router.add_post("/{version:v1|v1beta|v1alpha}/models/{action}", provider.gemini_generate)
    app.router.add_post(
        "/{version:v1|v1beta1}/projects/{project}/locations/{location}/publishers/google"
        "/models/{action}",
        provider.gemini_generate,
    )
    # Bedrock Converse.
    app.router.add_post("/model/{model_id}/converse", provider.bedrock_converse)
    app.router.add_post("/model/{model_id}/converse-stream", provider.bedrock_converse)
    app.router.add_get("/v1/models", provider.models)
    app.router.add_get("/v1/models/{model}", provider.model)
    app.router.add_get("/healthz", provider.healthz)
    app.router.add_get("/_mock/exchanges", provider.list_exchanges)
    app.router.add_delete("/_mock/exchanges", provider.clear_exchanges)
    app.router.add_get("/_mock/exchanges/{id}", provider.get_exchange)
    app.router.add_route("*", "/{tail:.*}", provider.not_found)
    return app


async def serve(
    host: str = "127.0.0.1",
    port: int = 9000,
    *,
    default_delay_ms: float = 0,
    default_tokens: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set, or until SIGTERM/SIGINT when `stop` is not given."""
    runner = web.AppRunner(
        create_app(default_delay_ms, default_tokens), access_log=None, shutdown_timeout=2.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        print(f"mockprovider listening on http://{host}:{bound}", flush=True)
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("mockprovider shutting down")
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.mockprovider",
        description="Mock OpenAI-compatible provider (streams like the real API).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause between frames")
    parser.add_argument("--tokens", type=int, default=None, help=f"default {DEFAULT_TOKENS}")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or (args.tokens is not None and args.tokens < 0):
        parser.error("--delay-ms and --tokens must be >= 0")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(
            serve(
                args.host,
                args.port,
                default_delay_ms=args.delay_ms,
                default_tokens=args.tokens,
            )
        )
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
