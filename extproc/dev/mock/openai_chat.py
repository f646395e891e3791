"""OpenAI Chat Completions and Azure OpenAI chat (mirrors `providers/openai_chat.py`).

Chat streams byte for byte the way OpenAI does: compact JSON, OpenAI's key order,
`usage: null` on every chunk when usage is requested, a final `choices: []` usage
chunk, `[DONE]`. Azure adds its prompt and content filter results.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from extproc.dev.mock.base import SSE_CONTENT_TYPE, Job, MockFormat
from extproc.dev.mock.errors import MockError, parse
from extproc.dev.mock.knobs import DEFAULT_OPTIONS, MockOptions
from extproc.dev.mock.plan import make_plan
from extproc.providers import AzureOpenAIChat, OpenAIChat, WireFormat
from extproc.providers.openai_chat import azure_deployment

# --------------------------------------------------------------------------- request
# The gateway's parser checks the body (JSON object, model and messages types, the
# stream flags); what follows are OpenAI's own rules that the gateway leaves to the
# provider (a missing model may still be filled by a policy default there).


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


def _expect(request: Mapping[str, Any], name: str, kind: type, expected: str) -> None:
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


def parse_request(
    body: bytes, path: str = "", wire: type[WireFormat] = OpenAIChat
) -> dict[str, Any]:
    """A Chat Completions body validated as OpenAI does (MockError 400 otherwise);
    `path` names the model on Azure's deployment paths."""
    info = parse(wire, body, path)
    request = info.body
    if not info.model:
        raise MockError(
            400,
            "Missing required parameter: 'model'.",
            param="model",
            code="missing_required_parameter",
        )
    request["model"] = info.model
    for i, message in enumerate(request["messages"]):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise MockError(
                400,
                f"Invalid value for 'messages[{i}]': expected an object with a 'role'.",
                param=f"messages[{i}]",
                code="invalid_value",
            )
    if request.get("stream_options") is not None and not info.stream:
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


# --------------------------------------------------------------------------- answers


def build_completion(request: Mapping[str, Any], options: MockOptions = DEFAULT_OPTIONS) -> dict:
    """The non-streaming `chat.completion` object for a (validated) request."""
    plan = make_plan(request, options)
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
    request: Mapping[str, Any], options: MockOptions = DEFAULT_OPTIONS, *, azure: bool = False
) -> list[bytes]:
    """The SSE frames of a streamed answer, each `data: {json}` plus a blank line.

    Role chunk, one chunk per token (or tool-call argument fragment), finish chunk,
    then the usage chunk when `stream_options.include_usage` is true, then `[DONE]`.
    Azure OpenAI (`azure=True`) first sends a chunk of prompt filter results with no
    choices, and adds content filter results to every choice that carries output.
    """
    plan = make_plan(request, options)
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
                AZURE_FILTER_RESULTS if delta.get("content") or finish else {}
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
                {"prompt_index": 0, "content_filter_results": AZURE_FILTER_RESULTS}
            ],
        }
        frames.insert(0, b"data: " + orjson.dumps(filters) + end)
    return frames


AZURE_FILTER_RESULTS = {
    name: {"filtered": False, "severity": "safe"}
    for name in ("hate", "self_harm", "sexual", "violence")
}


# --------------------------------------------------------------------------- routes


def _answer(chat: dict[str, Any], options: MockOptions, *, azure: bool) -> Job:
    stream = chat.get("stream") is True
    if stream:
        frames = build_stream(chat, options, azure=azure)
    else:
        frames = [orjson.dumps(build_completion(chat, options))]
    tokens = len(make_plan(chat, options).pieces)
    return Job(stream, frames, SSE_CONTENT_TYPE, chat["model"], tokens)


def chat_job(body: bytes, path: str, options: MockOptions) -> Job:
    return _answer(parse_request(body, path), options, azure=False)


def azure_chat_job(body: bytes, path: str, options: MockOptions) -> Job:
    """Deployment paths name the model and add Azure's filter results; the v1 API
    (`/openai/v1/chat/completions`) answers like OpenAI."""
    chat = parse_request(body, path, AzureOpenAIChat)
    return _answer(chat, options, azure=azure_deployment(path) is not None)


def openai_request_id(digest: str) -> dict[str, str]:
    return {"x-request-id": "req_" + digest[:32]}


CHAT = MockFormat("openai", OpenAIChat, chat_job, request_id=openai_request_id)
AZURE_CHAT = MockFormat("openai", AzureOpenAIChat, azure_chat_job, request_id=openai_request_id)
