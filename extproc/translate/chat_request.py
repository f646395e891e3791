"""What the three OpenAI-chat request translators (Anthropic, Bedrock, Gemini) share.

One place for the checks every target makes the same way (`n`, refused fields,
modalities), the walk over `messages` that merges consecutive turns of one role, the
parsing of an assistant's tool calls and a client's function tools, and the
`response()` factory. What differs per target (block shapes, wording of a refusal that
names the target's limits) stays in the translator and is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import orjson

from extproc.providers._common import loads
from extproc.translate.base import UpstreamRequest, refuse

ONE_CHOICE = "Invalid 'n': send n=1 (one choice per request here)."

Blocks = list[dict[str, Any]]


def refuse_unsupported(
    body: Mapping[str, Any], neutral: Mapping[str, tuple[Any, ...]], n_message: str = ONE_CHOICE
) -> None:
    """400 for `n > 1`, for a field in `neutral` holding other than its no-op values,
    and for output other than text."""
    n = body.get("n")
    if n is not None and n != 1:
        raise refuse(n_message, "n")
    for name, values in neutral.items():
        if body.get(name) not in values:
            raise refuse(f"'{name}' is not supported by this model's provider.", name)
    if body.get("modalities") not in (None, ["text"]):
        raise refuse("Only text output is supported by this model's provider.", "modalities")


def wants_usage(body: Mapping[str, Any]) -> bool:
    """A streaming request whose client asked for the usage chunk."""
    options = body.get("stream_options")
    return (
        body.get("stream") is True
        and isinstance(options, dict)
        and options.get("include_usage") is True
    )


def max_tokens(body: Mapping[str, Any]) -> Any:
    """The output cap as sent (`max_completion_tokens` wins over the older name)."""
    return body.get("max_completion_tokens", body.get("max_tokens"))


def stop_list(body: Mapping[str, Any]) -> Any:
    """`stop` as a list (None when absent)."""
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else stop


def content_parts(content: Any, where: str) -> Iterator[tuple[str, Any, Any]]:
    """(`where[j]`, type, part) for each part of a message's `content`; a non-empty
    string is one text part, a missing content none, anything else refused."""
    if isinstance(content, str):
        if content:
            yield where, "text", {"type": "text", "text": content}
        return
    if content is None:
        return
    if not isinstance(content, list):
        raise refuse(f"Invalid '{where}': expected a string or parts.", where, "invalid_type")
    for j, part in enumerate(content):
        yield f"{where}[{j}]", part.get("type") if isinstance(part, dict) else None, part


def turns(
    messages: list[Any],
    *,
    system: Callable[[Any, str], Blocks],
    user: Callable[[Any, str], Blocks],
    assistant: Callable[[Mapping[str, Any], str], Blocks],
    tool: Callable[[Mapping[str, Any], str], dict[str, Any]],
    key: str = "content",
    assistant_role: str = "assistant",
    sent_to: str = "here",
    objects_only: bool = False,
) -> tuple[Blocks, Blocks]:
    """(system blocks, turns): system/developer messages go to the system blocks, the
    rest to `{"role", key}` turns, consecutive turns of one role merged (a run of `tool`
    messages is one user turn, as the targets want the results of parallel calls).
    `system` and `user` get the message's content, `assistant` and `tool` the message."""
    head: Blocks = []
    out: Blocks = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if objects_only and not isinstance(message, dict):
            raise refuse(f"Invalid '{where}': expected an object.", where, "invalid_type")
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            head += system(message.get("content"), f"{where}.content")
            continue
        if role == "user":
            turn, blocks = "user", user(message.get("content"), f"{where}.content")
        elif role == "assistant":
            turn, blocks = assistant_role, assistant(message, where)
        elif role == "tool":
            turn, blocks = "user", [tool(message, where)]
        else:
            raise refuse(
                f"Invalid '{where}.role': {role!r} cannot be sent {sent_to}.", f"{where}.role"
            )
        if not blocks:
            continue
        if out and out[-1]["role"] == turn:
            out[-1][key].extend(blocks)
        else:
            out.append({"role": turn, key: blocks})
    return head, out


def function_call(call: Any, at: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """An assistant tool call's (`function`, arguments as an object); a call without a
    function name or whose arguments are not a JSON object in a string is refused."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise refuse(f"Invalid '{at}': expected a function call with a name.", at)
    arguments = function.get("arguments") or "{}"
    parsed = loads(arguments) if isinstance(arguments, str) else None
    if not isinstance(parsed, dict):
        raise refuse(
            f"Invalid '{at}.function.arguments': expected a JSON object in a string.",
            f"{at}.function.arguments",
        )
    return function, parsed


def function_tools(
    tools: Any, sent_to: str = "", *, need_function: bool = True
) -> Iterator[tuple[str, Any]]:
    """(`tools[i]`, its `function`) for each client tool; a tool other than a function
    (or, with `need_function`, without a `function` object) is refused ("only function
    tools can be sent" + `sent_to`)."""
    for i, tool in enumerate(tools or ()):
        at = f"tools[{i}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or (need_function and not isinstance(function, dict))
        ):
            raise refuse(f"Invalid '{at}': only function tools can be sent{sent_to}.", at)
        yield at, function


class ChatRequestTranslator:
    """An OpenAI-chat request translator: `request()` sends `translate(body)` as JSON to
    `path(model, stream)`, and `response()` builds `answer`, the response translator,
    with the upstream's model name. A target with other needs overrides either."""

    source: ClassVar[str] = "openai_chat"
    answer: ClassVar[Callable[..., Any]]

    def __init__(self, *, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes

    def path(self, model: str, stream: bool) -> str:
        raise NotImplementedError

    def translate(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def request(self, body: dict[str, Any], model: str | None = None) -> UpstreamRequest:
        """See `base.RequestTranslator.request`."""
        name = model or str(body.get("model") or "")
        stream = body.get("stream") is True
        return UpstreamRequest(
            path=self.path(name, stream),
            body=orjson.dumps(self.translate(body)),
            stream=stream,
            model=name,
            headers=(("content-type", "application/json"),),
            include_usage=wants_usage(body),
        )

    def response(self, upstream: UpstreamRequest, *, created: int) -> Any:
        return type(self).answer(
            created=created,
            include_usage=upstream.include_usage,
            max_frame_bytes=self.max_frame_bytes,
            model=upstream.model,
        )
