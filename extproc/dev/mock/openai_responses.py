"""OpenAI Responses: `POST /v1/responses`, typed SSE events (mirrors
`providers/openai_responses.py`); also served on Azure's `/openai/v1/responses`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from extproc.dev.mock import plan as mp
from extproc.dev.mock.base import SSE_CONTENT_TYPE, Job, MockFormat
from extproc.dev.mock.errors import MockError, parse
from extproc.dev.mock.knobs import DEFAULT_OPTIONS, MockOptions
from extproc.dev.mock.openai_chat import openai_request_id
from extproc.providers import OpenAIResponses


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
                             "content": mp.text_of(item.get("content"))})  # fmt: skip
        elif kind == "function_call":
            call = {"function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "content": mp.text_of(item.get("output"))})
    tools = [mp.function_tool(t.get("name"), t.get("parameters"))
             for t in request.get("tools") or ()
             if isinstance(t, dict) and t.get("type") == "function"]  # fmt: skip
    return mp.neutral(str(request.get("model")), messages, tools, request.get("max_output_tokens"))


# ---- OpenAI Responses


def _responses_object(
    request: Mapping[str, Any], plan: mp.Plan, options: MockOptions, status: str, output: list
) -> dict[str, Any]:
    prompt, cached, _, reasoning, completion = mp.split_usage(plan)
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
        "id": "resp_" + mp.hex_id(plan, "resp"), "object": "response",
        "created_at": plan.created, "status": status, "background": False, "error": None,
        "incomplete_details": incomplete, "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"), "model": plan.model,
        "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": request.get("tools") or [], "top_p": 1.0, "truncation": "disabled",
        "usage": usage, "user": None, "metadata": {},
    }  # fmt: skip


def _responses_item(plan: mp.Plan, status: str, done: bool) -> dict[str, Any]:
    if plan.tool is not None:
        call_id, name = plan.tool
        return {"id": "fc_" + mp.hex_id(plan, "fc"), "type": "function_call", "status": status,
                "arguments": "".join(plan.pieces) if done else "", "call_id": call_id,
                "name": name}  # fmt: skip
    content = [_output_text("".join(plan.pieces))] if done else []
    return {"id": "msg_" + mp.hex_id(plan, "msg"), "type": "message", "status": status,
            "content": content, "role": "assistant"}  # fmt: skip


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def build_responses(
    request: Mapping[str, Any], options: MockOptions = DEFAULT_OPTIONS
) -> dict[str, Any]:
    """The non-streaming Responses API object."""
    plan = mp.make_plan(neutral_from_responses(request), options)
    status = "incomplete" if plan.finish_reason == "length" else "completed"
    return _responses_object(request, plan, options, status, [_responses_item(plan, status, True)])


def build_responses_stream(
    request: Mapping[str, Any], options: MockOptions = DEFAULT_OPTIONS
) -> list[bytes]:
    """Typed SSE events: created, in_progress, the output item with its deltas and
    whole-text repeats, then completed (incomplete when cut by max_output_tokens)."""
    plan = mp.make_plan(neutral_from_responses(request), options)
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
        frames.append(mp.sse_event(data["type"], orjson.dumps(data), options.line_ending))
    return frames


def responses_job(body: bytes, path: str, options: MockOptions) -> Job:
    info = parse(OpenAIResponses, body, path)
    if not info.model:
        raise MockError(400, "model: Field required", param="model",
                        code="missing_required_parameter")  # fmt: skip
    data = info.body
    frames = (
        build_responses_stream(data, options) if info.stream
        else [orjson.dumps(build_responses(data, options))]
    )  # fmt: skip
    tokens = len(mp.make_plan(neutral_from_responses(data), options).pieces)
    return Job(info.stream, frames, SSE_CONTENT_TYPE, info.model, tokens)


RESPONSES = MockFormat("openai", OpenAIResponses, responses_job, request_id=openai_request_id)
