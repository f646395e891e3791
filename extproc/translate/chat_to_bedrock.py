"""OpenAI Chat Completions client -> Bedrock Converse / ConverseStream upstream.

Request: system/developer messages become `system` text blocks; user parts text,
base64 images (png, jpeg, gif, webp) and PDF files become `text` / `image` /
`document` blocks (Bedrock takes no image URL: refused); assistant tool calls
`toolUse` blocks and `tool` messages `toolResult` blocks in a user turn; tools and
tool_choice `toolConfig`; max tokens, temperature, top_p and stop `inferenceConfig`.
What Converse has no field for is refused (`n > 1`, response_format, penalties,
logprobs, reasoning_effort, tool_choice none while tools are in the history).

Response: the binary event stream (decoded and metered by
`providers.bedrock.BedrockStream`) becomes chat chunks: `messageStop` gives the
finish chunk, the `metadata` event after it the usage chunk and `[DONE]`; an
exception message ends the stream with an error the SDK raises. Requests are not
signed here (SigV4 lands with the wiring).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

from extproc.providers._common import dicts, loads
from extproc.providers.base import StreamEvent
from extproc.providers.bedrock import BedrockConverse, BedrockStream
from extproc.translate.base import (
    TranslatedError,
    data_url_in,
    json_object,
    openai_error,
    refuse,
)
from extproc.translate.chat_request import (
    ChatRequestTranslator,
    content_parts,
    function_call,
    function_tools,
    max_tokens,
    refuse_unsupported,
    stop_list,
    turns,
)
from extproc.translate.openai_out import DecoderToOpenAI, completion, tool_call

MAX_FRAME_BYTES = 1 << 20
# ConverseStream's event types; any other name is an exception (`:exception-type`).
_EVENTS = frozenset(
    {"messageStart", "contentBlockStart", "contentBlockDelta", "contentBlockStop",
     "messageStop", "metadata"}
)  # fmt: skip
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
_REFUSED = (
    "logprobs", "top_logprobs", "logit_bias", "audio", "prediction", "functions",
    "response_format", "presence_penalty", "frequency_penalty", "reasoning_effort",
)  # fmt: skip
_NEUTRAL = (None, False, 0, {"type": "text"})
_NAME = re.compile(r"[^A-Za-z0-9 \-()\[\]]")  # Bedrock's allowed document-name characters


class ChatToBedrock(ChatRequestTranslator):
    """The translator (settings only)."""

    target: ClassVar[str] = "bedrock_converse"

    def __init__(self, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        super().__init__(max_frame_bytes=max_frame_bytes)

    def path(self, model: str, stream: bool) -> str:
        return f"/model/{quote(model, safe='')}/{'converse-stream' if stream else 'converse'}"

    def translate(self, body: dict[str, Any]) -> dict[str, Any]:
        return _translate(body)


# --------------------------------------------------------------------------- request


def _translate(body: Mapping[str, Any]) -> dict[str, Any]:
    refuse_unsupported(body, dict.fromkeys(_REFUSED, _NEUTRAL))
    system, messages, history_tools = _messages(body.get("messages") or [])
    if not messages:
        raise refuse("Invalid 'messages': at least one user message is required.", "messages")
    out: dict[str, Any] = {"messages": messages}
    if system:
        out["system"] = system
    inference: dict[str, Any] = {}
    cap = max_tokens(body)
    if cap is not None:
        inference["maxTokens"] = cap
    for source, target in (("temperature", "temperature"), ("top_p", "topP")):
        if body.get(source) is not None:
            inference[target] = body[source]
    stop = stop_list(body)
    if stop is not None:
        inference["stopSequences"] = stop
    if inference:
        out["inferenceConfig"] = inference
    config = _tool_config(body.get("tools"), body.get("tool_choice"), history_tools)
    if config is not None:
        out["toolConfig"] = config
    return out


def _messages(messages: list[Any]) -> tuple[list[dict], list[dict], bool]:
    """(system blocks, messages, whether the history holds tool use)."""
    system, out = turns(
        messages,
        system=lambda content, where: _blocks(content, where, text_only=True),
        user=_blocks,
        assistant=_assistant,
        tool=_tool_result,
    )
    tools = any("toolUse" in b or "toolResult" in b for turn in out for b in turn["content"])
    return system, out, tools


def _blocks(content: Any, where: str, *, text_only: bool = False) -> list[dict[str, Any]]:
    blocks = []
    for at, kind, part in content_parts(content, where):
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"text": part["text"]})
        elif kind == "refusal" and text_only:
            continue
        elif text_only:
            raise refuse(f"Invalid '{at}': only text parts are accepted here.", at)
        elif kind == "image_url":
            found = data_url_in(part.get("image_url"), "url")
            if found is None or found[0] not in _IMAGE_FORMATS:
                raise refuse(
                    f"Invalid '{at}.image_url.url': this model's provider takes images as "
                    "base64 data URLs (png, jpeg, gif, webp) only.",
                    f"{at}.image_url.url",
                )
            source = {"bytes": found[1]}
            blocks.append({"image": {"format": _IMAGE_FORMATS[found[0]], "source": source}})
        elif kind == "file":
            blocks.append(_document(part.get("file"), at))
        else:
            raise refuse(f"Invalid '{at}': a {kind!r} part cannot be sent here.", at)
    return blocks


def _document(file: Any, at: str) -> dict[str, Any]:
    found = data_url_in(file, "file_data")
    if found is None or found[0] != "application/pdf":
        raise refuse(f"Invalid '{at}.file': only inline PDF file_data is accepted.", f"{at}.file")
    filename = file.get("filename") if isinstance(file.get("filename"), str) else "document"
    name = _NAME.sub(" ", filename.removesuffix(".pdf")).strip() or "document"
    return {"document": {"format": "pdf", "name": name, "source": {"bytes": found[1]}}}


def _assistant(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    blocks = _blocks(message.get("content"), f"{where}.content", text_only=True)
    for j, call in enumerate(message.get("tool_calls") or ()):
        function, args = function_call(call, f"{where}.tool_calls[{j}]")
        use = {"toolUseId": str(call.get("id", "")), "name": function["name"], "input": args}
        blocks.append({"toolUse": use})
    return blocks


def _tool_result(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    ident = message.get("tool_call_id")
    if not isinstance(ident, str) or not ident:
        raise refuse(f"Missing '{where}.tool_call_id'.", f"{where}.tool_call_id")
    content = _blocks(message.get("content"), f"{where}.content", text_only=True)
    return {"toolResult": {"toolUseId": ident, "content": content or [{"text": ""}]}}


def _tool_config(tools: Any, choice: Any, history: bool) -> dict[str, Any] | None:
    specs = []
    for _at, function in function_tools(tools):
        spec: dict[str, Any] = {"name": function.get("name")}
        if isinstance(function.get("description"), str):
            spec["description"] = function["description"]
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        spec["inputSchema"] = {"json": schema}
        specs.append({"toolSpec": spec})
    if choice == "none":
        if history:
            raise refuse(
                "tool_choice 'none' cannot be sent with tool calls in the history here.",
                "tool_choice",
            )
        return None
    if not specs:
        return None
    config: dict[str, Any] = {"tools": specs}
    if choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        config["toolChoice"] = {"tool": {"name": choice["function"].get("name")}}
    elif choice not in (None, "auto"):
        raise refuse("Invalid 'tool_choice'.", "tool_choice")
    return config


# --------------------------------------------------------------------------- response


class BedrockToOpenAI(DecoderToOpenAI):
    """A Converse answer (event stream or whole JSON) for an OpenAI chat client."""

    __slots__ = ()

    def __init__(self, *, created: int, include_usage: bool, max_frame_bytes: int, model: str):
        stream = BedrockStream(max_frame_bytes)
        super().__init__(stream, created=created, include_usage=include_usage, model=model)

    def _event(self, event: StreamEvent, out: list[bytes]) -> None:
        name = event.name
        if not self.writer.started:
            out.append(self.writer.start("chatcmpl-bedrock", self._model))
        if name == "contentBlockDelta" or name == "contentBlockStart":
            self._deltas(event, out)
        elif name == "messageStop":
            out.append(self.writer.finish(self.decoder.finish_reason))
        elif name == "metadata":
            out.append(self._complete())
        elif name is not None and name not in _EVENTS:  # an exception message
            obj = loads(event.data)
            message = obj.get("message") if isinstance(obj, dict) else None
            text = message if isinstance(message, str) else "The upstream stream failed."
            out.append(self._fail(text, name or "upstream_error"))

    def _end_of_stream(self) -> bytes:
        """Metadata missing after messageStop: complete (usage as far as known)."""
        if self.writer.finished:
            return self._complete()
        return super()._end_of_stream()

    def whole(self, body: bytes) -> bytes:
        obj = json_object(body)
        output = obj.get("output") if isinstance(obj.get("output"), dict) else {}
        message = output.get("message") if isinstance(output.get("message"), dict) else {}
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in dicts(message.get("content")):
            if isinstance(block.get("text"), str):
                texts.append(block["text"])
            use = block.get("toolUse")
            if isinstance(use, dict):
                ident, name = str(use.get("toolUseId", "")), str(use.get("name", ""))
                calls.append(tool_call(ident, name, use.get("input") or {}))
            reasoning = block.get("reasoningContent")
            text = reasoning.get("reasoningText") if isinstance(reasoning, dict) else None
            if isinstance(text, dict) and isinstance(text.get("text"), str):
                thoughts.append(text["text"])
        return completion(
            ident="chatcmpl-bedrock",
            created=self._created,
            model=self._model,
            texts=texts,
            thoughts=thoughts,
            tool_calls=calls,
            finish=BedrockConverse.completion_finish_reason(body),
            usage=BedrockConverse.completion_usage(body) or self.decoder.usage,
        )

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> TranslatedError:
        """`{"message"}` -> OpenAI's error; the exception name (from `x-amzn-ErrorType`
        or `__type`) is the `code`."""
        obj = json_object(body)
        lowered = {k.lower(): v for k, v in headers.items()}
        kind = lowered.get("x-amzn-errortype", "").split(":", 1)[0] or obj.get("__type")
        message = obj.get("message", obj.get("Message"))
        return openai_error(status, headers, message, kind or None)


ChatToBedrock.answer = BedrockToOpenAI
