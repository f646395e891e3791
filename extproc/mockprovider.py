"""Mock OpenAI-compatible provider for `make run` and the end-to-end tests.

The network is closed, so this is the only stand-in for OpenAI: it streams Chat
Completions byte for byte the way the real API does (compact JSON, key order,
`usage: null` on every chunk when usage is requested, a final `choices: []` usage
chunk, `[DONE]`), and adds header knobs that reproduce the upstream behaviours the
gateway must survive (split or coalesced chunks, gzip it did not ask for, a provider
that dies mid-stream, error statuses, other line endings).

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
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web

__all__ = [
    "DEFAULT_TOKENS",
    "KNOB_HEADERS",
    "MODELS",
    "MockError",
    "MockOptions",
    "WireKnobs",
    "build_completion",
    "build_stream",
    "count_prompt_tokens",
    "create_app",
    "error_payload",
    "gzip_pieces",
    "main",
    "parse_knobs",
    "parse_request",
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


def parse_request(body: bytes) -> dict[str, Any]:
    """Parse and validate a Chat Completions body the way OpenAI does (400 otherwise)."""
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


def build_stream(request: Mapping[str, Any], options: MockOptions = MockOptions()) -> list[bytes]:
    """The SSE frames of a streamed answer, each `data: {json}` plus a blank line.

    Role chunk, one chunk per token (or tool-call argument fragment), finish chunk,
    then the usage chunk when `stream_options.include_usage` is true, then `[DONE]`.
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
    return frames


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


# --------------------------------------------------------------------------- server


@dataclass(slots=True)
class _Exchange:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    sent: bytes
    status: int

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body_b64": base64.b64encode(self.body).decode(),
            "sent_b64": base64.b64encode(self.sent).decode(),
            "status": self.status,
        }


class _MockProvider:
    """Route handlers plus the bounded exchange log."""

    def __init__(self, default_delay_ms: float, default_tokens: int | None) -> None:
        self.default_delay_ms = default_delay_ms
        self.default_tokens = default_tokens
        self.exchanges: OrderedDict[str, _Exchange] = OrderedDict()
        self._auto_id = 0

    # ---- exchange log

    def record(self, request: web.Request, body: bytes, sent: bytes, status: int) -> None:
        key = request.headers.get("x-mock-request-id")
        if key is None:
            self._auto_id += 1
            key = f"auto-{self._auto_id}"
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            lname = name.lower()
            headers[lname] = f"{headers[lname]},{value}" if lname in headers else value
        self.exchanges.pop(key, None)
        self.exchanges[key] = _Exchange(
            request.method, request.path, request.query_string, headers, body, sent, status
        )
        while len(self.exchanges) > MAX_EXCHANGES:
            self.exchanges.popitem(last=False)

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
        body = await request.read()
        try:
            options, wire = parse_knobs(
                request.headers,
                default_delay_ms=self.default_delay_ms,
                default_tokens=self.default_tokens,
            )
        except MockError as e:
            return self._json(request, body, e.payload(), e.status)
        if wire.status is not None:
            try:
                model = str(_loads(body).get("model") or "gpt-3.5-turbo")
            except Exception:
                model = "gpt-3.5-turbo"
            _NOTE.set("x-mock-status")
            return self._json(request, body, error_payload(wire.status, model=model), wire.status)
        try:
            chat = parse_request(body)
        except MockError as e:
            _NOTE.set(e.message[:60])
            return self._json(request, body, e.payload(), e.status)

        stream = chat.get("stream") is True
        if stream:
            frames = build_stream(chat, options)
        else:
            frames = [orjson.dumps(build_completion(chat, options))]
        sent = b"".join(frames)
        self.record(request, body, sent, 200)
        _NOTE.set(f"stream={stream} model={chat['model']} bytes={len(sent)}")

        if wire.split == "all":
            pieces = [sent]
        elif wire.split is not None:
            pieces = split_at(sent, wire.split)
        else:
            pieces = frames
        pause = wire.delay_s
        if wire.split is not None and pause < SPLIT_PAUSE_S:
            pause = SPLIT_PAUSE_S
        if not stream and wire.delay_s:
            # A non-streamed answer takes about as long as the stream would have.
            await asyncio.sleep(wire.delay_s * max(1, len(_plan(chat, options).pieces)))
        on_wire = gzip_pieces(pieces) if wire.gzip else pieces

        response = web.StreamResponse(status=200)
        response.content_type = JSON_CONTENT_TYPE
        if stream:
            response.headers["Content-Type"] = SSE_CONTENT_TYPE
            response.enable_chunked_encoding()
        else:
            response.content_length = sum(len(p) for p in on_wire)
        if wire.gzip:
            response.headers["Content-Encoding"] = "gzip"
        response.headers["x-request-id"] = "req_" + hashlib.sha256(body).hexdigest()[:32]
        return await self._send(request, response, on_wire, pause, wire)

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse,
        pieces: Sequence[bytes],
        pause: float,
        wire: WireKnobs,
    ) -> web.StreamResponse:
        """Write `pieces` one write each; honour the cut knob; tolerate a vanished client."""
        try:
            await response.prepare(request)
            written = 0
            for i, piece in enumerate(pieces):
                if i and pause:
                    await asyncio.sleep(pause)
                if wire.cut_after is not None and written + len(piece) >= wire.cut_after:
                    part = piece[: wire.cut_after - written]
                    if part:
                        await response.write(part)
                    await self._cut(request, wire.cut_mode)
                    return response
                if piece:
                    await response.write(piece)
                    written += len(piece)
            if wire.cut_after is not None:
                await self._cut(request, wire.cut_mode)
                return response
            await response.write_eof()
        except ConnectionError:
            log.info("client went away during %s", request.path)
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
