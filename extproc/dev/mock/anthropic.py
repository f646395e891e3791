"""Anthropic Messages: `POST /v1/messages` (mirrors `providers/anthropic.py`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from extproc.dev.mock import plan as mp
from extproc.dev.mock.base import SSE_CONTENT_TYPE, Job, MockFormat
from extproc.dev.mock.errors import MockError, parse
from extproc.dev.mock.knobs import DEFAULT_OPTIONS, MockOptions
from extproc.providers import AnthropicMessages
from extproc.providers.anthropic import ERROR_TYPES


def neutral_from_anthropic(request: Mapping[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if request.get("system"):
        messages.append({"role": "system", "content": mp.text_of(request["system"])})
    for message in request.get("messages") or ():
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        texts = [mp.text_of(content)] if isinstance(content, str) else []
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "tool_result":
                texts.append(mp.text_of(block.get("content")))
            elif isinstance(block, dict) and block.get("type") == "text":
                texts.append(mp.text_of([block]))
        messages.append({"role": str(message.get("role")), "content": " ".join(texts)})
    tools = [mp.function_tool(t.get("name"), t.get("input_schema"))
             for t in request.get("tools") or ()
             if isinstance(t, dict) and "name" in t]  # fmt: skip
    choice = request.get("tool_choice")
    tool_choice: Any = None
    if isinstance(choice, dict) and choice.get("type") == "tool":
        tool_choice = {"type": "function", "function": {"name": choice.get("name")}}
    elif isinstance(choice, dict) and choice.get("type") == "none":
        tool_choice = "none"
    return mp.neutral(str(request.get("model")), messages, tools, request.get("max_tokens"),
                    tool_choice)  # fmt: skip


_ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _anthropic_usage(plan: mp.Plan, output: int) -> dict[str, Any]:
    prompt, cached, *_ = mp.split_usage(plan)
    return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": output}  # fmt: skip


def _anthropic_ids(plan: mp.Plan) -> tuple[str, str]:
    digest = hashlib.sha256(plan.ident.encode()).digest()
    return "msg_01" + mp.base62(digest, 22), "toolu_01" + mp.base62(digest[16:], 22)


def build_anthropic(
    request: Mapping[str, Any], options: MockOptions = DEFAULT_OPTIONS
) -> dict[str, Any]:
    """The non-streaming Messages answer."""
    plan = mp.make_plan(neutral_from_anthropic(request), options)
    message_id, tool_id = _anthropic_ids(plan)
    if plan.tool is not None:
        content = [{"type": "tool_use", "id": tool_id, "name": plan.tool[1],
                    "input": mp.tool_arguments(plan)}]  # fmt: skip
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
    request: Mapping[str, Any], options: MockOptions = DEFAULT_OPTIONS
) -> list[bytes]:
    """message_start, a ping, one content block (text or tool_use) with its deltas,
    message_delta with the cumulative counts (input and cache ones repeated, as the
    current API does: a client that adds them instead of setting them counts twice),
    message_stop."""
    plan = mp.make_plan(neutral_from_anthropic(request), options)
    message_id, tool_id = _anthropic_ids(plan)
    end = options.line_ending
    message: dict[str, Any] = {
        "id": message_id, "type": "message", "role": "assistant", "model": plan.model,
        "content": [], "stop_reason": None, "stop_sequence": None,
    }  # fmt: skip
    if not options.no_usage:
        message["usage"] = _anthropic_usage(plan, 1)

    def ev(kind: str, payload: dict[str, Any]) -> bytes:
        return mp.sse_event(kind, orjson.dumps({"type": kind, **payload}), end)

    if plan.tool is not None:
        block = {"type": "tool_use", "id": tool_id, "name": plan.tool[1], "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in ("", *plan.pieces)]
    else:
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in plan.pieces]
    frames = [
        ev("message_start", {"message": message}),
        ev("content_block_start", {"index": 0, "content_block": block}),
        mp.sse_event("ping", b'{"type": "ping"}', end),
        *[ev("content_block_delta", {"index": 0, "delta": d}) for d in deltas],
        ev("content_block_stop", {"index": 0}),
    ]
    final: dict[str, Any] = {
        "delta": {"stop_reason": _ANTHROPIC_STOP[plan.finish_reason], "stop_sequence": None}
    }
    if not options.no_usage:
        final["usage"] = _anthropic_usage(plan, plan.usage["completion_tokens"])
    frames += [ev("message_delta", final), ev("message_stop", {})]
    return frames


# --------------------------------------------------------------------------- route


def _field_required(name: str) -> MockError:
    return MockError(400, f"{name}: Field required", param=name,
                     code="missing_required_parameter")  # fmt: skip


def anthropic_job(body: bytes, path: str, options: MockOptions) -> Job:
    """The gateway's parser checks the body; Anthropic also requires `model`,
    `max_tokens` and at least one message, which the gateway leaves to it."""
    info = parse(AnthropicMessages, body, path)
    data = info.body
    if not info.model:
        raise _field_required("model")
    max_tokens = data.get("max_tokens")
    if max_tokens is None:
        raise _field_required("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise MockError(400, "max_tokens: Input should be a valid integer", param="max_tokens",
                        code="invalid_type")  # fmt: skip
    if not data["messages"]:
        raise MockError(400, "messages: at least one message is required", param="messages")
    frames = (
        build_anthropic_stream(data, options) if info.stream
        else [orjson.dumps(build_anthropic(data, options))]
    )  # fmt: skip
    tokens = len(mp.make_plan(neutral_from_anthropic(data), options).pieces)
    return Job(info.stream, frames, SSE_CONTENT_TYPE, info.model, tokens)


def anthropic_error(err: MockError) -> tuple[bytes, dict[str, str]]:
    """Anthropic's error shape, with the `request_id` its API adds."""
    kind = ERROR_TYPES.get(
        err.status, "api_error" if err.status >= 500 else "invalid_request_error"
    )
    request_id = "req_011" + mp.base62(hashlib.sha256(err.message.encode()).digest(), 21)
    body = {"type": "error", "error": {"type": kind, "message": err.message},
            "request_id": request_id}  # fmt: skip
    return orjson.dumps(body), {}


def _request_id(digest: str) -> dict[str, str]:
    return {"request-id": "req_011" + digest[:21]}


ANTHROPIC = MockFormat(
    "anthropic", AnthropicMessages, anthropic_job, anthropic_error, request_id=_request_id
)
