"""Gemini and Vertex AI: `:generateContent` / `:streamGenerateContent`, as SSE
(`?alt=sse`) or as one streamed JSON array (mirrors `providers/gemini.py` and
`providers/jsonarray.py`). Vertex serves the same bodies under
`/v1/projects/{p}/locations/{l}/publishers/google/models/...`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from extproc.dev.mock import plan as mp
from extproc.dev.mock.base import SSE_CONTENT_TYPE, Job, MockFormat
from extproc.dev.mock.errors import MockError, parse
from extproc.dev.mock.knobs import DEFAULT_OPTIONS, MockOptions
from extproc.providers import Gemini, Vertex, WireFormat
from extproc.providers._common import path_only, query_param
from extproc.providers.gemini_paths import model_and_action

JSON_ARRAY_CONTENT_TYPE = "application/json; charset=UTF-8"


def neutral_from_gemini(request: Mapping[str, Any], model: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    system = request.get("systemInstruction") or request.get("system_instruction")
    if isinstance(system, dict):
        messages.append({"role": "system", "content": mp.text_of(system.get("parts"))})
    for content in request.get("contents") or ():
        if isinstance(content, dict):
            role = "assistant" if content.get("role") == "model" else "user"
            messages.append({"role": role, "content": mp.text_of(content.get("parts"))})
    tools = []
    for tool in request.get("tools") or ():
        if not isinstance(tool, dict):
            continue
        declarations = tool.get("functionDeclarations") or tool.get("function_declarations")
        tools += [mp.function_tool(d.get("name"), d.get("parameters")) for d in declarations or ()
                  if isinstance(d, dict) and "name" in d]  # fmt: skip
    config = request.get("generationConfig") or request.get("generation_config") or {}
    cap = config.get("maxOutputTokens", config.get("max_output_tokens")) if isinstance(
        config, dict) else None  # fmt: skip
    return mp.neutral(model, messages, tools, cap)


_GEMINI_FINISH = {"stop": "STOP", "tool_calls": "STOP", "length": "MAX_TOKENS"}


def _gemini_usage(plan: mp.Plan, visible: int | None, done: bool) -> dict[str, Any]:
    prompt, cached, _, reasoning, _ = mp.split_usage(plan)
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


def _gemini_elements(plan: mp.Plan, options: MockOptions, whole: bool) -> list[dict[str, Any]]:
    response_id = mp.base62(hashlib.sha256(plan.ident.encode()).digest(), 23)
    _, _, visible, _, _ = mp.split_usage(plan)
    if plan.tool is not None:
        call = {"functionCall": {"name": plan.tool[1], "args": mp.tool_arguments(plan)}}
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
    request: Mapping[str, Any], model: str, options: MockOptions = DEFAULT_OPTIONS
) -> dict[str, Any]:
    """The `:generateContent` answer."""
    plan = mp.make_plan(neutral_from_gemini(request, model), options)
    return _gemini_elements(plan, options, whole=True)[0]


def build_gemini_stream(
    request: Mapping[str, Any], model: str, options: MockOptions = DEFAULT_OPTIONS, *, sse: bool
) -> list[bytes]:
    """`:streamGenerateContent`: SSE frames (`alt=sse`, CRLF by default) or the pieces
    of one pretty-printed JSON array (`[` + element, `\\n,\\r\\n` + element, ..., `\\n]`)."""
    plan = mp.make_plan(neutral_from_gemini(request, model), options)
    elements = _gemini_elements(plan, options, whole=False)
    if sse:
        end = options.line_ending
        return [b"data: " + _gemini_line(e) + end + end for e in elements]
    pretty = [json.dumps(e, indent=2, ensure_ascii=False).encode() for e in elements]
    return [b"[" + pretty[0], *[b"\n,\r\n" + p for p in pretty[1:]], b"\n]"]


# --------------------------------------------------------------------------- route


def _job(wire: type[WireFormat], body: bytes, path: str, options: MockOptions) -> Job:
    if model_and_action(path) is None:
        action = path_only(path).rstrip("/").rsplit("/", 1)[-1]
        raise MockError(404, f"Method not found: {action}")
    info = parse(wire, body, path)
    sse = query_param(path, "alt") == "sse"
    if info.stream:
        frames = build_gemini_stream(info.body, info.model, options, sse=sse)
    else:
        frames = [json.dumps(build_gemini(info.body, info.model, options), indent=2).encode()]
    kind = SSE_CONTENT_TYPE if sse else JSON_ARRAY_CONTENT_TYPE
    tokens = len(mp.make_plan(neutral_from_gemini(info.body, info.model), options).pieces)
    return Job(info.stream, frames, kind, info.model, tokens)


def gemini_job(body: bytes, path: str, options: MockOptions) -> Job:
    return _job(Gemini, body, path, options)


def vertex_job(body: bytes, path: str, options: MockOptions) -> Job:
    return _job(Vertex, body, path, options)


def gemini_error(err: MockError) -> tuple[bytes, dict[str, str]]:
    """A google.rpc.Status, as the gateway's Gemini format writes one (no gateway
    ErrorInfo: the provider's own errors carry none)."""
    return Gemini.error_body(err.status, err.message, None), {}


GEMINI = MockFormat("gemini", Gemini, gemini_job, gemini_error, line_ending=b"\r\n")
VERTEX = MockFormat("gemini", Vertex, vertex_job, gemini_error, line_ending=b"\r\n")
