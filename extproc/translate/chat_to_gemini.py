"""OpenAI Chat Completions client -> Gemini API upstream (`:generateContent`,
`:streamGenerateContent?alt=sse`).

Request: system/developer messages become `systemInstruction`; user parts text,
base64 images, PDF files and audio become `text` / `inlineData` parts (Gemini takes
no arbitrary image URL: refused); assistant tool calls `functionCall` parts and
`tool` messages `functionResponse` parts (Gemini answers by function name: the name
is looked up from the call id in the history); tools, tool_choice
(`toolConfig.functionCallingConfig`), stop, temperature, top_p, max tokens,
penalties, seed, response_format (`responseMimeType` + `responseJsonSchema`) and
reasoning_effort (`thinkingConfig.thinkingLevel`, thoughts included) go to
`generationConfig`. `n > 1` and logprobs are refused.

Response: Gemini's SSE elements (decoded and metered by
`providers.gemini.GeminiSSEStream`) become chat chunks; Gemini has no end marker, so
the stream is complete when the upstream closes after a finish reason. Function calls
arrive whole: each is one tool-call chunk with its id (Gemini's, or `call_<n>`) and
then one with all its arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

from extproc.providers._common import dicts, loads
from extproc.providers.base import StreamEvent, TextDelta
from extproc.providers.gemini import Gemini, GeminiSSEStream
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
_FINISH_KEY = b'"finishReason"'
_BLOCKED_KEY = b'"blockReason"'
_LEVELS = {"minimal": "MINIMAL", "low": "LOW", "medium": "MEDIUM", "high": "HIGH"}
_LEVELS["xhigh"] = "XHIGH"
_REFUSED = ("logprobs", "top_logprobs", "logit_bias", "audio", "prediction", "functions")


class ChatToGemini(ChatRequestTranslator):
    """The translator. `prefix` is the API root of the upstream path (`/v1beta` for
    the Gemini API; a Vertex route would pass its publisher path)."""

    target: ClassVar[str] = "gemini"

    def __init__(self, *, prefix: str = "/v1beta", max_frame_bytes: int = MAX_FRAME_BYTES):
        super().__init__(max_frame_bytes=max_frame_bytes)
        self.prefix = prefix.rstrip("/")

    def path(self, model: str, stream: bool) -> str:
        action = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"{self.prefix}/models/{quote(model, safe='')}:{action}"

    def translate(self, body: dict[str, Any]) -> dict[str, Any]:
        return _translate(body)


# --------------------------------------------------------------------------- request


def _translate(body: Mapping[str, Any]) -> dict[str, Any]:
    refuse_unsupported(body, dict.fromkeys(_REFUSED, (None, False)))
    out: dict[str, Any] = {}
    system, contents = _contents(body.get("messages") or [])
    if not contents:
        raise refuse("Invalid 'messages': at least one user message is required.", "messages")
    if system:
        out["systemInstruction"] = {"parts": system}
    out["contents"] = contents
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = [{"functionDeclarations": tools}]
    config = _tool_config(body.get("tool_choice"))
    if config is not None:
        out["toolConfig"] = config
    generation = _generation(body)
    if generation:
        out["generationConfig"] = generation
    return out


def _contents(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    names: dict[str, str] = {}  # tool call id -> function name, from the history
    return turns(
        messages,
        system=lambda content, where: _parts(content, where, text_only=True),
        user=_parts,
        assistant=lambda message, where: _model_parts(message, where, names),
        tool=lambda message, where: _function_response(message, where, names),
        key="parts",
        assistant_role="model",
    )


def _parts(content: Any, where: str, *, text_only: bool = False) -> list[dict[str, Any]]:
    out = []
    for at, kind, part in content_parts(content, where):
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"text": part["text"]})
        elif text_only:
            raise refuse(f"Invalid '{at}': only text parts are accepted here.", at)
        elif kind == "image_url":
            found = data_url_in(part.get("image_url"), "url")
            if found is None or not found[0].startswith("image/"):
                raise refuse(
                    f"Invalid '{at}.image_url.url': this model's provider takes images as "
                    "base64 data URLs only.",
                    f"{at}.image_url.url",
                )
            out.append({"inlineData": {"mimeType": found[0], "data": found[1]}})
        elif kind == "file":
            found = data_url_in(part.get("file"), "file_data")
            if found is None:
                raise refuse(
                    f"Invalid '{at}.file': only inline file_data is accepted.", f"{at}.file"
                )
            out.append({"inlineData": {"mimeType": found[0], "data": found[1]}})
        elif kind == "input_audio":
            audio = part.get("input_audio")
            fmt = audio.get("format") if isinstance(audio, dict) else None
            if fmt not in ("wav", "mp3") or not isinstance(audio.get("data"), str):
                raise refuse(f"Invalid '{at}.input_audio'.", f"{at}.input_audio")
            out.append({"inlineData": {"mimeType": f"audio/{fmt}", "data": audio["data"]}})
        else:
            raise refuse(f"Invalid '{at}': a {kind!r} part cannot be sent here.", at)
    return out


def _model_parts(message: Mapping[str, Any], where: str, names: dict[str, str]) -> list:
    content = message.get("content")
    parts = [] if content is None else _parts(
        [p for p in content if not (isinstance(p, dict) and p.get("type") == "refusal")]
        if isinstance(content, list) else content,
        f"{where}.content",
        text_only=True,
    )  # fmt: skip
    for j, call in enumerate(message.get("tool_calls") or ()):
        function, args = function_call(call, f"{where}.tool_calls[{j}]")
        if isinstance(call.get("id"), str):
            names[call["id"]] = function["name"]
        parts.append({"functionCall": {"name": function["name"], "args": args}})
    return parts


def _function_response(message: Mapping[str, Any], where: str, names: dict[str, str]) -> dict:
    ident = message.get("tool_call_id")
    name = names.get(ident) if isinstance(ident, str) else None
    if name is None:
        raise refuse(
            f"Invalid '{where}.tool_call_id': no earlier assistant tool call has this id "
            "(this model's provider answers calls by function name).",
            f"{where}.tool_call_id",
        )
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {"functionResponse": {"name": name, "response": {"result": content}}}


def _tools(tools: Any) -> list[dict[str, Any]]:
    out = []
    for _at, function in function_tools(tools, " here"):
        declaration: dict[str, Any] = {"name": function.get("name")}
        if isinstance(function.get("description"), str):
            declaration["description"] = function["description"]
        if isinstance(function.get("parameters"), dict):
            declaration["parameters"] = function["parameters"]
        out.append(declaration)
    return out


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice in ("none", "auto", "required"):
        mode = {"none": "NONE", "auto": "AUTO", "required": "ANY"}[choice]
        return {"functionCallingConfig": {"mode": mode}}
    function = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {
            "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [function["name"]]}
        }
    raise refuse("Invalid 'tool_choice'.", "tool_choice")


def _generation(body: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for source, target in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("presence_penalty", "presencePenalty"),
        ("frequency_penalty", "frequencyPenalty"),
        ("seed", "seed"),
    ):
        if body.get(source) is not None:
            config[target] = body[source]
    cap = max_tokens(body)
    if cap is not None:
        config["maxOutputTokens"] = cap
    stop = stop_list(body)
    if stop is not None:
        config["stopSequences"] = stop
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        config["responseMimeType"] = "application/json"
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise refuse("Invalid 'response_format.json_schema.schema'.", "response_format")
        config["responseMimeType"] = "application/json"
        config["responseJsonSchema"] = schema
    effort = body.get("reasoning_effort")
    if effort in _LEVELS:
        config["thinkingConfig"] = {"thinkingLevel": _LEVELS[effort], "includeThoughts": True}
    return config


# --------------------------------------------------------------------------- response


class GeminiToOpenAI(DecoderToOpenAI):
    """A Gemini answer (SSE stream or whole) for an OpenAI chat client."""

    __slots__ = ("_calls",)

    def __init__(self, *, created: int, include_usage: bool, max_frame_bytes: int, model: str):
        stream = GeminiSSEStream(max_frame_bytes)
        super().__init__(stream, created=created, include_usage=include_usage, model=model)
        self._calls = 0  # function calls so far: each gets its own OpenAI index

    def _event(self, event: StreamEvent, out: list[bytes]) -> None:
        if event.data is None:
            return
        if not self.writer.started:
            obj = json_object(event.data)
            if isinstance(obj.get("error"), dict):
                out.append(self._upstream_error(obj["error"]))
                return
            out.append(
                self.writer.start(_chat_id(obj), str(obj.get("modelVersion") or self._model))
            )
        elif event.data.startswith(b'{"error"'):
            obj = loads(event.data)
            out.append(self._upstream_error(obj.get("error") if isinstance(obj, dict) else {}))
            return
        writer = self.writer
        texts = self.texts(event)
        for delta in texts:
            out.append(writer.text(delta))
        # A call's arguments are a whole (final) text: a guard's version wins.
        arguments = [d.text for d in texts if d.kind == "tool_arguments" and d.final]
        for k, call in enumerate(self.decoder.tool_calls(event)):
            where = -1 - self._calls  # apart from the text channels (candidate indexes)
            self._calls += 1
            ident = call.id or f"call_{self._calls}"
            whole = arguments[k] if k < len(arguments) else call.arguments or "{}"
            out.append(writer.tool_start(where, ident, call.name))
            out.append(writer.text(TextDelta(where, whole, "tool_arguments")))
        data = event.data
        if _FINISH_KEY in data or _BLOCKED_KEY in data:
            # This element's own reason: the decoder's is already the whole chunk's.
            reason = Gemini.completion_finish_reason(data)
            if reason is not None:
                out.append(writer.finish(reason))

    def _upstream_error(self, error: Any) -> bytes:
        message = error.get("message") if isinstance(error, dict) else None
        status = error.get("status") if isinstance(error, dict) else None
        return self._fail(
            message if isinstance(message, str) else "The upstream stream failed.",
            status if isinstance(status, str) else "upstream_error",
        )

    def _end_of_stream(self) -> bytes:
        """Gemini ends by closing: complete after a finish reason, else truncated."""
        if self.decoder.finish_reason is not None:
            return self._complete()
        return super()._end_of_stream()

    def whole(self, body: bytes) -> bytes:
        obj = json_object(body)
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        candidate = next(iter(dicts(obj.get("candidates"))), {})
        content = candidate.get("content") if isinstance(candidate.get("content"), dict) else {}
        for part in dicts(content.get("parts")):
            if isinstance(part.get("text"), str):
                (thoughts if part.get("thought") is True else texts).append(part["text"])
            call = part.get("functionCall")
            if isinstance(call, dict):
                ident = (
                    call.get("id") if isinstance(call.get("id"), str) else f"call_{len(calls) + 1}"
                )
                calls.append(tool_call(ident, str(call.get("name", "")), call.get("args") or {}))
        return completion(
            ident=_chat_id(obj),
            created=self._created,
            model=str(obj.get("modelVersion") or self._model),
            texts=texts,
            thoughts=thoughts,
            tool_calls=calls,
            finish=Gemini.completion_finish_reason(body),
            usage=Gemini.completion_usage(body) or self.decoder.usage,
        )

    def error(self, status: int, headers: Mapping[str, str], body: bytes) -> TranslatedError:
        """google.rpc.Status -> OpenAI's error; the status name (RESOURCE_EXHAUSTED...)
        is the `code`."""
        obj = loads(body)
        if isinstance(obj, list) and obj:  # some Google errors come as a one-element array
            obj = obj[0]
        error = obj.get("error") if isinstance(obj, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        name = error.get("status") if isinstance(error, dict) else None
        return openai_error(status, headers, message, name)


def _chat_id(element: Mapping[str, Any]) -> str:
    ident = element.get("responseId")
    return f"chatcmpl-{ident}" if isinstance(ident, str) and ident else "chatcmpl-gateway"


ChatToGemini.answer = GeminiToOpenAI
