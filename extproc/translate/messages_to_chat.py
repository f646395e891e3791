"""Anthropic Messages client (as coding agents send) -> OpenAI chat upstream.

Request: `system` becomes a system message; text, image (base64 or URL) and PDF
document blocks become content parts; `tool_use` blocks an assistant's `tool_calls`;
`tool_result` blocks `tool` messages (placed before the rest of their user turn);
tools, tool_choice (+ disable_parallel_tool_use), stop_sequences, temperature/top_p,
max_tokens, metadata.user_id, thinking and output_config are mapped. Thinking blocks
in the history are dropped (they are signed for Anthropic; an OpenAI model cannot use
them); server tools, `top_k` and blocks OpenAI has no part for are refused with a 400
naming them. A streamed request always asks for usage: Anthropic clients always get it.

Response: the chat.completion.chunk stream (decoded and metered by
`providers.openai_chat.OpenAIChatStream`) becomes Anthropic's events: message_start,
one content block at a time (thinking from `reasoning_content`, text, tool_use with
input_json_delta), message_delta with the stop reason and usage, message_stop
(`anthropic_from_openai`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from extproc.translate.anthropic_from_openai import ChatToMessages
from extproc.translate.base import UpstreamRequest, refuse

MAX_FRAME_BYTES = 1 << 20
_TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}
_EFFORT = {"low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "xhigh"}


class MessagesToChat:
    """The translator. `max_tokens_field` names the chat field Anthropic's required
    `max_tokens` goes to: OpenAI's `max_completion_tokens` (its reasoning models refuse
    `max_tokens`), or `max_tokens` for older OpenAI-compatible servers."""

    source: ClassVar[str] = "anthropic_messages"
    target: ClassVar[str] = "openai_chat"

    def __init__(
        self,
        *,
        max_tokens_field: str = "max_completion_tokens",
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        self.max_tokens_field = max_tokens_field
        self.max_frame_bytes = max_frame_bytes

    def request(self, body: dict[str, Any], model: str | None = None) -> UpstreamRequest:
        """`body` as `AnthropicMessages.parse_request` accepted it."""
        name = model or str(body.get("model") or "")
        out: dict[str, Any] = {"model": name, "messages": _messages(body)}
        max_tokens = body.get("max_tokens")
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise refuse("max_tokens: Input should be an integer >= 1", "max_tokens")
            out[self.max_tokens_field] = max_tokens
        _sampling(body, out)
        tools = _tools(body.get("tools"))
        if tools:
            out["tools"] = tools
        _tool_choice(body.get("tool_choice"), out)
        _output(body, out)
        metadata = body.get("metadata")
        if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
            out["user"] = metadata["user_id"]
        stream = body.get("stream") is True
        if stream:
            out["stream"] = True
            out["stream_options"] = {"include_usage": True}
        return UpstreamRequest(
            path="/v1/chat/completions",
            body=orjson.dumps(out),
            stream=stream,
            model=name,
            headers=(("content-type", "application/json"),),
            include_usage=True,
        )

    def response(self, upstream: UpstreamRequest, *, created: int) -> ChatToMessages:
        return ChatToMessages(max_frame_bytes=self.max_frame_bytes)


# --------------------------------------------------------------------------- request


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if isinstance(system, str) and system:
        out.append({"role": "system", "content": system})
    elif isinstance(system, list) and system:
        parts = [_text_part(block, f"system[{i}]") for i, block in enumerate(system)]
        out.append({"role": "system", "content": parts})
    for i, message in enumerate(body.get("messages") or ()):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise refuse(f"{where}.role: Input should be 'user' or 'assistant'", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
        elif message["role"] == "user":
            out += _user(content, f"{where}.content")
        else:
            out.append(_assistant(content, f"{where}.content"))
    return out


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        raise refuse(f"{where}: Input should be a valid list", where, "invalid_type")
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            raise refuse(f"{where}.{j}: Input should be an object", f"{where}[{j}]")
    return content


def _text_part(block: Any, where: str) -> dict[str, Any]:
    if not isinstance(block, dict) or block.get("type") != "text":
        raise refuse(f"{where}: only text blocks are accepted here", where)
    return {"type": "text", "text": str(block.get("text", ""))}


def _user(content: Any, where: str) -> list[dict[str, Any]]:
    """Tool results first (as `tool` messages, answering the previous turn's calls),
    then one user message with the other blocks."""
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, where)):
        at = f"{where}[{j}]"
        kind = block.get("type")
        if kind == "text":
            parts.append(_text_part(block, at))
        elif kind == "image":
            parts.append(_image(block.get("source"), at))
        elif kind == "document":
            parts.append(_document(block, at))
        elif kind == "tool_result":
            results.append(_tool_result(block, at))
        elif kind not in ("thinking", "redacted_thinking"):
            raise refuse(f"{at}: a {kind!r} block cannot be sent to this model's provider", at)
    user = [{"role": "user", "content": parts}] if parts else []
    return results + user


def _image(source: Any, at: str) -> dict[str, Any]:
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise refuse(f"{at}.source: only base64 and URL images can be sent", f"{at}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: Mapping[str, Any], at: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "text" and isinstance(source.get("data"), str):
        return {"type": "text", "text": source["data"]}
    if kind == "base64" and source.get("media_type") == "application/pdf":
        title = block.get("title") if isinstance(block.get("title"), str) else "document.pdf"
        data = f"data:application/pdf;base64,{source.get('data')}"
        return {"type": "file", "file": {"filename": title, "file_data": data}}
    raise refuse(
        f"{at}.source: only base64 PDF and plain-text documents can be sent", f"{at}.source"
    )


def _tool_result(block: Mapping[str, Any], at: str) -> dict[str, Any]:
    ident = block.get("tool_use_id")
    if not isinstance(ident, str) or not ident:
        raise refuse(f"{at}.tool_use_id: Field required", f"{at}.tool_use_id")
    content = block.get("content", "")
    if isinstance(content, list):
        content = [_text_part(b, f"{at}.content[{k}]") for k, b in enumerate(content)]
    elif not isinstance(content, str):
        raise refuse(f"{at}.content: expected a string or text blocks", f"{at}.content")
    return {"role": "tool", "tool_call_id": ident, "content": content}


def _assistant(content: Any, where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, where)):
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            function = {"name": str(block.get("name", "")), "arguments": arguments}
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": function})
        elif kind not in ("thinking", "redacted_thinking"):
            at = f"{where}[{j}]"
            raise refuse(f"{at}: a {kind!r} block cannot be sent to this model's provider", at)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _sampling(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("top_k") is not None:
        raise refuse("top_k: not supported by this model's provider", "top_k")
    stop = body.get("stop_sequences")
    if stop:
        out["stop"] = stop


def _tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools or ()):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise refuse(f"{at}: the server tool {kind!r} cannot be sent to this provider", at)
        if not isinstance(tool.get("name"), str):
            raise refuse(f"{at}.name: Field required", f"{at}.name")
        function: dict[str, Any] = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
        if tool.get("strict") is True:
            function["strict"] = True
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, out: dict[str, Any]) -> None:
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif kind in _TOOL_CHOICE:
        out["tool_choice"] = _TOOL_CHOICE[kind]
    else:
        raise refuse("tool_choice: expected auto, any, tool or none", "tool_choice")
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


def _output(body: Mapping[str, Any], out: dict[str, Any]) -> None:
    """thinking / output_config -> reasoning_effort and response_format."""
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
        budget = thinking.get("budget_tokens")
        budget = budget if isinstance(budget, int) else 8192
        out["reasoning_effort"] = "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    config = body.get("output_config")
    if not isinstance(config, dict):
        return
    if config.get("effort") in _EFFORT:
        out["reasoning_effort"] = _EFFORT[config["effort"]]
    fmt = config.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = {"name": "output", "schema": fmt.get("schema") or {}}
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
