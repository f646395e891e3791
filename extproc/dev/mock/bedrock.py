"""Bedrock Converse: `/model/{modelId}/converse` (JSON) and `converse-stream` (the
binary `application/vnd.amazon.eventstream`), mirroring `providers/bedrock.py` and
`providers/eventstream.py`, whose encoder writes the messages."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from extproc.dev.mock import plan as mp
from extproc.dev.mock.base import Job, MockFormat
from extproc.dev.mock.errors import MockError, parse
from extproc.dev.mock.knobs import DEFAULT_OPTIONS, MockOptions
from extproc.providers import BedrockConverse
from extproc.providers.bedrock import ERROR_TYPES
from extproc.providers.eventstream import message as eventstream_message

EVENTSTREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"


def neutral_from_bedrock(request: Mapping[str, Any], model: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if request.get("system"):
        messages.append({"role": "system", "content": mp.text_of(request["system"])})
    for message in request.get("messages") or ():
        if isinstance(message, dict):
            messages.append({"role": str(message.get("role")),
                             "content": mp.text_of(message.get("content"))})  # fmt: skip
    tools = []
    config = request.get("toolConfig")
    for tool in config.get("tools") or () if isinstance(config, dict) else ():
        spec = tool.get("toolSpec") if isinstance(tool, dict) else None
        if isinstance(spec, dict) and "name" in spec:
            schema = spec.get("inputSchema")
            parameters = schema.get("json") if isinstance(schema, dict) else None
            tools.append(mp.function_tool(spec["name"], parameters))
    inference = request.get("inferenceConfig")
    cap = inference.get("maxTokens") if isinstance(inference, dict) else None
    return mp.neutral(model, messages, tools, cap)


_BEDROCK_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _bedrock_usage(plan: mp.Plan) -> dict[str, Any]:
    prompt, cached, _, _, completion = mp.split_usage(plan)
    usage = {"inputTokens": prompt - cached, "outputTokens": completion,
             "totalTokens": prompt + completion}  # fmt: skip
    if cached:
        usage["cacheReadInputTokens"] = cached
        usage["cacheWriteInputTokens"] = 0
    return usage


def _tool_use_id(plan: mp.Plan) -> str:
    return "tooluse_" + mp.base62(hashlib.sha256(plan.ident.encode()).digest(), 22)


def build_bedrock(
    request: Mapping[str, Any], model: str, options: MockOptions = DEFAULT_OPTIONS
) -> dict[str, Any]:
    """The Converse answer (keys sorted, as Bedrock sends them)."""
    plan = mp.make_plan(neutral_from_bedrock(request, model), options)
    if plan.tool is not None:
        content = [{"toolUse": {"input": mp.tool_arguments(plan), "name": plan.tool[1],
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
    request: Mapping[str, Any], model: str, options: MockOptions = DEFAULT_OPTIONS
) -> list[bytes]:
    """ConverseStream as `application/vnd.amazon.eventstream` messages."""
    plan = mp.make_plan(neutral_from_bedrock(request, model), options)
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


# --------------------------------------------------------------------------- route


def bedrock_job(body: bytes, path: str, options: MockOptions) -> Job:
    info = parse(BedrockConverse, body, path)
    data = info.body
    if data.get("messages") is None:  # the gateway lets a body without them through
        raise MockError(400, "1 validation error detected: Value null at 'messages' failed to "
                        "satisfy constraint: Member must not be null")  # fmt: skip
    frames = (
        build_bedrock_stream(data, info.model, options) if info.stream
        else [orjson.dumps(build_bedrock(data, info.model, options),
                           option=orjson.OPT_SORT_KEYS)]
    )  # fmt: skip
    tokens = len(mp.make_plan(neutral_from_bedrock(data, info.model), options).pieces)
    return Job(info.stream, frames, EVENTSTREAM_CONTENT_TYPE, info.model, tokens)


def bedrock_error(err: MockError) -> tuple[bytes, dict[str, str]]:
    """`{"message"}` plus the `x-amzn-ErrorType` header botocore reads, as Bedrock sends
    them (the gateway's own refusals add `__type` instead of the header)."""
    kind = ERROR_TYPES.get(
        err.status, "InternalServerException" if err.status >= 500 else "ValidationException"
    )
    if err.code and err.code.endswith("Exception"):  # named by the check (signatures)
        kind = err.code
    headers = {"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
    return orjson.dumps({"message": err.message}), headers


def _request_id(digest: str) -> dict[str, str]:
    return {"x-amzn-RequestId": str(uuid.UUID(digest[:32]))}


# With these set, every request must carry a valid SigV4 signature for these keys
# (region MOCK_AWS_REGION, default us-east-1), checked with botocore over the exact
# bytes received; else 403 as Bedrock answers it. Unset: no check.
SIGV4_ENV = ("MOCK_AWS_ACCESS_KEY_ID", "MOCK_AWS_SECRET_ACCESS_KEY", "MOCK_AWS_SESSION_TOKEN")


def bedrock_authorize(
    method: str, path: str, headers: Mapping[str, str], body: bytes
) -> MockError | None:
    key_id, secret, token = (os.environ.get(name) for name in SIGV4_ENV)
    if not key_id or not secret:
        return None
    from botocore.credentials import ReadOnlyCredentials

    from extproc.cloudauth import sigv4

    credentials = ReadOnlyCredentials(key_id, secret, token or None)
    region = os.environ.get("MOCK_AWS_REGION", "us-east-1")
    verdict = sigv4.verify(credentials, region, sigv4.BEDROCK_SERVICE, method, path, headers, body)
    if verdict.ok:
        return None
    known = verdict.reason.startswith(("The request signature", "Credential should"))
    kind = "InvalidSignatureException" if known else "UnrecognizedClientException"
    return MockError(403, verdict.reason, code=kind)


BEDROCK = MockFormat(
    "bedrock",
    BedrockConverse,
    bedrock_job,
    bedrock_error,
    request_id=_request_id,
    authorize=bedrock_authorize,
)
