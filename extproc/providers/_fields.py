"""The texts of a request beyond its message content: every other field a provider
reads as text (a message's `name`, `user`, tool descriptions and parameter schemas,
refusals, image URLs), so a prompt guard cannot be passed by putting the secret there.

Each format's `_request_slots` yields its content first (messages in order, so the
guard's joined scan sees adjacent parts next to each other) and then these extras.
A tool's parameter schema is one JSON slot (shown to guards as compact JSON and
parsed back), so descriptions, titles, enum values and defaults are all read.

An image URL is read as text (a card in a query string, a `data:` URL carrying plain
text), except a base64 `data:` URL: it is binary (an image, a file), not decoded, and
masking inside it would corrupt it, so it is left out (see docs/guards-evasion.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from extproc.providers._common import (
    Slot,
    content_slots,
    dicts,
    object_slot,
    string_slot,
    text_parts,
)


def _opt(slot: Slot | None) -> Iterator[Slot]:
    if slot is not None:
        yield slot


def url_slot(container: Any, key: str) -> Iterator[Slot]:
    """A URL read as text, unless it is a base64 `data:` URL."""
    value = container.get(key) if isinstance(container, dict) else None
    if not isinstance(value, str):
        return
    head = value[:256].lower()
    if head.startswith("data:") and ";base64," in head:
        return
    yield Slot(container, key)


def described(obj: Any, *schemas: str) -> Iterator[Slot]:
    """A tool's `description` and its parameter schema(s) (the first of `schemas`
    present as an object)."""
    if not isinstance(obj, dict):
        return
    yield from _opt(string_slot(obj, "description"))
    for key in schemas:
        slot = object_slot(obj, key)
        if slot is not None:
            yield slot
            return


# --------------------------------------------------------------------------- formats


def chat_extras(body: dict[str, Any]) -> Iterator[Slot]:
    """OpenAI chat: each message's `name`, `refusal`, refusal parts, image URLs and
    legacy `function_call` arguments; then tools, legacy functions, `user`."""
    for message in dicts(body.get("messages")):
        yield from _opt(string_slot(message, "name"))
        yield from _opt(string_slot(message, "refusal"))
        for part in dicts(message.get("content")):
            kind = part.get("type")
            if kind == "refusal":
                yield from _opt(string_slot(part, "refusal"))
            elif kind == "image_url":
                yield from url_slot(part.get("image_url"), "url")
            elif kind == "file" and isinstance(part.get("file"), dict):
                # Translated to Anthropic, it is a document's title.
                yield from _opt(string_slot(part["file"], "filename"))
        call = message.get("function_call")
        if isinstance(call, dict):
            yield from _opt(string_slot(call, "arguments", kind="tool_arguments"))
    for tool in dicts(body.get("tools")):
        yield from described(tool.get("function"), "parameters")
        yield from described(tool.get("custom"), "format")  # a custom tool's grammar
    for function in dicts(body.get("functions")):
        yield from described(function, "parameters")
    yield from _opt(string_slot(body, "user"))
    yield from _opt(string_slot(body, "safety_identifier"))  # `user`'s successor
    # The model reads these too: a predicted output, a response schema's descriptions.
    prediction = body.get("prediction")
    if isinstance(prediction, dict):
        yield from content_slots(prediction, "content")
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        yield from described(response_format.get("json_schema"), "schema")


def responses_extras(body: dict[str, Any]) -> Iterator[Slot]:
    """OpenAI Responses: image and file URLs of input items, tools, `user`."""
    input_items = body.get("input")
    for item in dicts(input_items):
        for part in dicts(item.get("content")):
            kind = part.get("type")
            if kind == "input_image":
                yield from url_slot(part, "image_url")
            elif kind == "input_file":
                yield from url_slot(part, "file_url")
            elif kind == "refusal":
                yield from _opt(string_slot(part, "refusal"))
        if item.get("type") == "reasoning":  # a summary given back is read as context
            yield from text_parts(item.get("summary"))
    for tool in dicts(body.get("tools")):
        yield from described(tool, "parameters")
        yield from _opt(object_slot(tool, "format"))  # a custom tool's grammar
    yield from _opt(string_slot(body, "user"))
    yield from _opt(string_slot(body, "safety_identifier"))
    # A stored prompt's variables are put into the prompt; a response schema is read.
    prompt = body.get("prompt")
    if isinstance(prompt, dict):
        yield from _variables(prompt.get("variables"))
    text = body.get("text")
    if isinstance(text, dict):
        yield from described(text.get("format"), "schema")


def _variables(variables: Any) -> Iterator[Slot]:
    """Prompt-template variables: strings, or parts with a `text`."""
    if not isinstance(variables, dict):
        return
    for key, value in variables.items():
        if isinstance(value, str):
            yield Slot(variables, key)
        elif isinstance(value, dict):
            yield from _opt(string_slot(value, "text"))


def anthropic_extras(body: dict[str, Any]) -> Iterator[Slot]:
    """Anthropic: image/document URLs, document titles, context and content blocks;
    tools; `metadata.user_id`."""
    for message in dicts(body.get("messages")):
        for block in dicts(message.get("content")):
            yield from _anthropic_block(block)
            if block.get("type") == "tool_result":
                for inner in dicts(block.get("content")):
                    yield from _anthropic_block(inner)
    for tool in dicts(body.get("tools")):
        yield from described(tool, "input_schema")
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        yield from _opt(string_slot(metadata, "user_id"))
    output = body.get("output_format")  # structured outputs: the schema is read
    if isinstance(output, dict):
        yield from _opt(object_slot(output, "schema"))


def _anthropic_block(block: dict[str, Any]) -> Iterator[Slot]:
    kind = block.get("type")
    if kind not in ("image", "document"):
        return
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "url":
            yield from url_slot(source, "url")
        elif source.get("type") == "content":
            for inner in dicts(source.get("content")):
                if inner.get("type") == "text":
                    yield from _opt(string_slot(inner, "text"))
    if kind == "document":
        yield from _opt(string_slot(block, "title"))
        yield from _opt(string_slot(block, "context"))


def gemini_extras(body: dict[str, Any]) -> Iterator[Slot]:
    """Gemini: function declarations (description, parameters), response schemas."""
    for tool in dicts(body.get("tools")):
        for key in ("functionDeclarations", "function_declarations"):
            for declaration in dicts(tool.get(key)):
                yield from described(
                    declaration,
                    "parameters",
                    "parametersJsonSchema",
                    "parameters_json_schema",
                )
    for content in dicts(body.get("contents")):
        for part in dicts(content.get("parts")):
            yield from _gemini_part(part)
    for key in ("generationConfig", "generation_config"):
        config = body.get(key)
        if isinstance(config, dict):
            for schema in _GEMINI_SCHEMAS:
                yield from _opt(object_slot(config, schema))


def _gemini_part(part: dict[str, Any]) -> Iterator[Slot]:
    """Executed code and its output (the model reads both), a file's URI."""
    for key, field in GEMINI_CODE:
        inner = part.get(key)
        if isinstance(inner, dict):
            yield from _opt(string_slot(inner, field))
    for key, field in (("fileData", "fileUri"), ("file_data", "file_uri")):
        yield from url_slot(part.get(key), field)


GEMINI_CODE = (
    ("executableCode", "code"),
    ("executable_code", "code"),
    ("codeExecutionResult", "output"),
    ("code_execution_result", "output"),
)
_GEMINI_SCHEMAS = (
    "responseSchema",
    "response_schema",
    "responseJsonSchema",
    "response_json_schema",
)


def bedrock_extras(body: dict[str, Any]) -> Iterator[Slot]:
    """Bedrock Converse: guard content blocks, tool specs (description, input schema)."""
    for block in dicts(body.get("system")):
        yield from _guard_content(block)
    for message in dicts(body.get("messages")):
        for block in dicts(message.get("content")):
            yield from _guard_content(block)
    config = body.get("toolConfig")
    if isinstance(config, dict):
        for tool in dicts(config.get("tools")):
            spec = tool.get("toolSpec")
            if isinstance(spec, dict):
                yield from _opt(string_slot(spec, "description"))
                schema = spec.get("inputSchema")
                if isinstance(schema, dict):
                    yield from _opt(object_slot(schema, "json"))
    # Merged into the model's own request body: any text in it reaches the model.
    yield from _opt(object_slot(body, "additionalModelRequestFields"))
    # A managed prompt's variables (`{"name": {"text": ...}}`) go into its prompt.
    variables = body.get("promptVariables")
    if isinstance(variables, dict):
        for value in variables.values():
            if isinstance(value, dict):
                yield from _opt(string_slot(value, "text"))


def _guard_content(block: dict[str, Any]) -> Iterator[Slot]:
    guard = block.get("guardContent")
    text = guard.get("text") if isinstance(guard, dict) else None
    if isinstance(text, dict):
        yield from _opt(string_slot(text, "text"))
