"""OpenAI Chat Completions client -> Anthropic Messages upstream.

Request: system and developer messages become `system` blocks; user/assistant
content parts (text, image URL or base64 image, base64 PDF file) become blocks; an
assistant's `tool_calls` become `tool_use` blocks and `tool` messages `tool_result`
blocks in a user turn; tools, tool_choice, parallel_tool_calls, stop,
temperature/top_p, max_tokens / max_completion_tokens (Anthropic requires one: the
translator's default otherwise), response_format json_schema (Anthropic's
`output_config.format`), reasoning_effort (`output_config.effort`) and `user` are
mapped. What Anthropic cannot do is refused with a 400 naming the part (`n > 1`,
audio parts, logprobs, a temperature above 1...), never dropped silently.

Response: the Anthropic SSE stream (decoded by `providers.anthropic.AnthropicStream`,
which also meters it) becomes `chat.completion.chunk`s; a whole Messages answer a
`chat.completion`; an Anthropic error an OpenAI one (`openai_from_anthropic`).
docs/translation.md has the tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from extproc.translate.base import UpstreamRequest, data_url, data_url_in, refuse
from extproc.translate.chat_request import (
    ChatRequestTranslator,
    function_call,
    function_tools,
    refuse_unsupported,
    turns,
    wants_usage,
)
from extproc.translate.openai_from_anthropic import AnthropicToOpenAI

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
MAX_FRAME_BYTES = 1 << 20
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh"}
# Chat fields with no Anthropic equivalent that change the answer: refused unless
# they hold their no-op value (None, or the value given here).
_REFUSED_UNLESS = {
    "logprobs": False,
    "top_logprobs": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "audio": None,
    "prediction": None,
    "web_search_options": None,
    "functions": None,
    "function_call": None,
}
_NEUTRAL = {name: (None, value) for name, value in _REFUSED_UNLESS.items()}
_ONE_CHOICE = (
    "Invalid 'n': this model's provider returns one choice per request; send n=1 "
    "or several requests."
)
_HERE = "to this model's provider"


class ChatToAnthropic(ChatRequestTranslator):
    """The translator (settings only; one per route). `default_max_tokens` fills
    Anthropic's required `max_tokens` when the client sent neither OpenAI field."""

    target: ClassVar[str] = "anthropic_messages"

    def __init__(
        self,
        *,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        super().__init__(max_frame_bytes=max_frame_bytes)
        self.default_max_tokens = default_max_tokens

    def request(self, body: dict[str, Any], model: str | None = None) -> UpstreamRequest:
        """`body` as `OpenAIChat.parse_request` accepted it; `model` the upstream's
        model name when an alias renamed it."""
        out, include_usage = _translate(body, self.default_max_tokens)
        name = model or str(body.get("model") or "")
        out = {"model": name, **out}
        return UpstreamRequest(
            path="/v1/messages",
            body=orjson.dumps(out),
            stream=out.get("stream") is True,
            model=name,
            headers=(
                ("content-type", "application/json"),
                ("anthropic-version", ANTHROPIC_VERSION),
            ),
            include_usage=include_usage,
        )

    def response(self, upstream: UpstreamRequest, *, created: int) -> AnthropicToOpenAI:
        """The model name comes from Anthropic's `message_start`, not the request."""
        return AnthropicToOpenAI(
            created=created,
            include_usage=upstream.include_usage,
            max_frame_bytes=self.max_frame_bytes,
        )


# --------------------------------------------------------------------------- request


def _translate(body: dict[str, Any], default_max_tokens: int) -> tuple[dict[str, Any], bool]:
    refuse_unsupported(body, _NEUTRAL, _ONE_CHOICE)
    out: dict[str, Any] = {}
    system, messages = _messages(body.get("messages") or [])
    out["max_tokens"] = _max_tokens(body, default_max_tokens)
    if system:
        out["system"] = system
    if not messages:
        raise refuse(
            "Invalid 'messages': at least one user or assistant message is required.",
            "messages",
            "invalid_value",
        )
    out["messages"] = messages
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        if not all(isinstance(s, str) for s in stop):
            raise refuse("Invalid 'stop': expected a string or an array of strings.", "stop")
        out["stop_sequences"] = stop
    elif stop is not None:
        raise refuse("Invalid 'stop': expected a string or an array of strings.", "stop")
    temperature = body.get("temperature")
    if temperature is not None:
        if not _number(temperature) or not 0 <= temperature <= 1:
            raise refuse(
                "Invalid 'temperature': this model's provider accepts 0 to 1.", "temperature"
            )
        out["temperature"] = temperature
    top_p = body.get("top_p")
    if top_p is not None:
        if not _number(top_p) or not 0 <= top_p <= 1:
            raise refuse("Invalid 'top_p': expected a number from 0 to 1.", "top_p")
        out["top_p"] = top_p
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"), bool(tools))
    if choice is not None:
        out["tool_choice"] = choice
    config = _output_config(body.get("response_format"), body.get("reasoning_effort"))
    if config:
        out["output_config"] = config
    user = body.get("user", body.get("safety_identifier"))
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    if body.get("stream") is True:
        out["stream"] = True
    return out, wants_usage(body)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _max_tokens(body: Mapping[str, Any], default: int) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise refuse(f"Invalid '{name}': expected an integer >= 1.", name, "invalid_value")
        return value
    return default


def _messages(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, Anthropic messages). Consecutive turns of one role are merged
    (a run of `tool` messages is one user turn of `tool_result` blocks, as Anthropic
    wants the results of parallel calls)."""
    return turns(
        messages,
        system=_text_blocks,
        user=_user_blocks,
        assistant=_assistant_blocks,
        tool=_tool_result,
        sent_to=_HERE,
        objects_only=True,
    )


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for j, part in enumerate(_parts(content, where)):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise refuse(
                f"Invalid '{where}[{j}]': only text parts are accepted here.", f"{where}[{j}]"
            )
        if part["text"]:
            blocks.append({"type": "text", "text": part["text"]})
    return blocks


def _parts(content: Any, where: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if not isinstance(content, list):
        raise refuse(
            f"Invalid '{where}': expected a string or an array of parts.", where, "invalid_type"
        )
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise refuse(f"Invalid '{where}[{j}]': expected an object.", f"{where}[{j}]")
    return content


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for j, part in enumerate(_parts(content, where)):
        at = f"{where}[{j}]"
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), at))
        elif kind == "file":
            blocks.append(_document(part.get("file"), at))
        else:
            raise refuse(
                f"Invalid '{at}': a {kind!r} part cannot be sent to this model's provider "
                "(text, image_url and PDF file parts can).",
                at,
            )
    return blocks


def _image(image: Any, at: str) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else None
    if not isinstance(url, str) or not url:
        raise refuse(f"Invalid '{at}.image_url.url': expected a URL.", f"{at}.image_url.url")
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    found = data_url(url)
    if found is None or found[0] not in _IMAGE_TYPES:
        raise refuse(
            f"Invalid '{at}.image_url.url': expected an http(s) URL or a base64 data URL of "
            "a JPEG, PNG, GIF or WebP image.",
            f"{at}.image_url.url",
        )
    media_type, data = found
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _document(file: Any, at: str) -> dict[str, Any]:
    found = data_url_in(file, "file_data")
    if found is None or found[0] != "application/pdf":
        raise refuse(
            f"Invalid '{at}.file': only inline PDF files (file_data as a base64 data URL) "
            "can be sent to this model's provider.",
            f"{at}.file",
        )
    source = {"type": "base64", "media_type": "application/pdf", "data": found[1]}
    block: dict[str, Any] = {"type": "document", "source": source}
    if isinstance(file.get("filename"), str):
        block["title"] = file["filename"]
    return block


def _assistant_blocks(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    content = message.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    else:
        for j, part in enumerate(_parts(content, f"{where}.content")):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                if part["text"]:
                    blocks.append({"type": "text", "text": part["text"]})
            elif kind != "refusal":  # a past refusal is the model's own words: dropped
                raise refuse(
                    f"Invalid '{where}.content[{j}]': only text parts are accepted here.",
                    f"{where}.content[{j}]",
                )
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise refuse(
            f"Invalid '{where}.tool_calls': expected an array.",
            f"{where}.tool_calls",
            "invalid_type",
        )
    for j, call in enumerate(calls or ()):
        blocks.append(_tool_use(call, f"{where}.tool_calls[{j}]"))
    return blocks


def _tool_use(call: Any, at: str) -> dict[str, Any]:
    function, parsed = function_call(call, at)
    ident = call.get("id")
    if not isinstance(ident, str) or not ident:
        raise refuse(f"Invalid '{at}.id': expected a string.", f"{at}.id")
    return {"type": "tool_use", "id": ident, "name": function["name"], "input": parsed}


def _tool_result(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    ident = message.get("tool_call_id")
    if not isinstance(ident, str) or not ident:
        raise refuse(
            f"Missing '{where}.tool_call_id'.",
            f"{where}.tool_call_id",
            "missing_required_parameter",
        )
    content = message.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": ident}
    if isinstance(content, str):
        block["content"] = content
    else:
        block["content"] = _text_blocks(content, f"{where}.content")
    return block


def _tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for at, function in function_tools(tools, f" {_HERE}", need_function=False):
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise refuse(
                f"Missing '{at}.function.name'.",
                f"{at}.function.name",
                "missing_required_parameter",
            )
        schema = function.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        elif not isinstance(schema, dict):
            raise refuse(
                f"Invalid '{at}.function.parameters': expected a JSON schema object.",
                f"{at}.function.parameters",
            )
        spec: dict[str, Any] = {"name": function["name"], "input_schema": schema}
        if isinstance(function.get("description"), str):
            spec["description"] = function["description"]
        if function.get("strict") is True:
            spec["strict"] = True
        out.append(spec)
    return out


def _tool_choice(choice: Any, parallel: Any, has_tools: bool) -> dict[str, Any] | None:
    mapped: dict[str, Any] | None = None
    if choice is None:
        if has_tools and parallel is False:
            mapped = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "auto":
        mapped = {"type": "auto"}
    elif choice == "required":
        mapped = {"type": "any"}
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and isinstance(choice["function"].get("name"), str)
    ):
        mapped = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise refuse(
            "Invalid 'tool_choice': expected none, auto, required or a function.", "tool_choice"
        )
    if mapped is not None and parallel is False:
        mapped["disable_parallel_tool_use"] = True
    return mapped


def _output_config(response_format: Any, effort: Any) -> dict[str, Any]:
    config: dict[str, Any] = {}
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise refuse(
                "Invalid 'response_format.json_schema.schema': expected an object.",
                "response_format.json_schema.schema",
            )
        config["format"] = {"type": "json_schema", "schema": schema}
    elif kind == "json_object":
        raise refuse(
            "'response_format' json_object has no equivalent at this model's provider; "
            "send a json_schema instead.",
            "response_format",
        )
    elif kind not in (None, "text"):
        raise refuse("Invalid 'response_format'.", "response_format")
    if effort is not None and effort != "none":
        if effort not in _EFFORT:
            raise refuse("Invalid 'reasoning_effort'.", "reasoning_effort")
        config["effort"] = _EFFORT[effort]
    return config


__all__ = ["AnthropicToOpenAI", "ChatToAnthropic"]
