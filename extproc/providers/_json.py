"""Strict JSON for request bodies, with the gateway's error codes: one object, no
repeated key at any depth (in any letter case or Unicode form), typed fields; and the
few reads of answers that need no whole parse."""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from extproc.errors import RequestError


def loads(data: bytes | str | None) -> Any:
    """Parsed JSON, or None when it is not JSON (a decoder never raises on content)."""
    if data is None:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def uint(value: Any) -> int:
    """A token count as reported: non-negative int, anything else counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# No answer has this many tokens; past it a figure would overflow the stores (Redis
# and SQL integers are 64-bit, sums of micro-dollars stay exact below 2^53).
MAX_FIGURE = 1 << 40


def figure(value: Any) -> int | None:
    """A reported token count the SDKs read as a number (an int, or a float without a
    fraction: `12.0`), or None for anything else (a fraction, a string, a bool, a
    negative, null, absent, past MAX_FIGURE): a usage whose main figures are None is
    not trusted at all (the estimate stands), never metered as 0."""
    if type(value) is int:
        return value if 0 <= value <= MAX_FIGURE else None
    if type(value) is float and value.is_integer() and 0 <= value <= MAX_FIGURE:
        return int(value)
    return None


def figures(obj: dict[str, Any], *keys: str) -> list[int] | None:
    """The counts under `keys` (absent or null: 0, as formats that leave zeros out
    write them), or None when one of them is there but is no count (`figure`)."""
    out = []
    for key in keys:
        value = obj.get(key)
        if value is None:
            out.append(0)
            continue
        count = figure(value)
        if count is None:
            return None
        out.append(count)
    return out


def parse_json_object(body: bytes, expected: str) -> dict[str, Any]:
    """The request body as a JSON object, or the RequestError a client can act on."""
    if not body.strip():
        raise RequestError(f"The request body is empty; expected {expected}.", "missing_body")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("The request body is not valid UTF-8.", "invalid_encoding") from None
        raise RequestError(
            f"We could not parse the JSON body of your request ({exc}).", "invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise RequestError("The request body must be a JSON object.", "invalid_type")
    if not keys_proven_unique(body, obj):
        reject_duplicate_keys(body)  # the strict parse decides (and names the key)
    if _DIGIT_RUN in body.translate(_DIGITS):  # rare: a long digit run anywhere
        _reject_wide_integers(body)
    return obj


# orjson reads an integer beyond 64 bits as a float (2**64 becomes 1.8446744073709552e+19),
# where a provider's parser keeps it exact: one number, two readings. Every such integer
# has at least 19 digits; the exact check runs only on a body with such a run.
# Found by translating every digit to "0" and searching for 19 of them: both C loops,
# ~10x cheaper than the regex `\d{19}` (6.2 against 0.66 µs on a 0.5 KB body).
_DIGITS = bytes(0x30 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))
_DIGIT_RUN = b"0" * 19
_INT_RANGE = range(-(2**63), 2**64)


def _wide(text: str) -> int:
    value = int(text)
    if value not in _INT_RANGE:
        raise _WideInteger(text)
    return value


class _WideInteger(ValueError):
    pass


def _reject_wide_integers(body: bytes) -> None:
    """Refuse a body with an integer outside [-2**63, 2**64): orjson would not read it
    as the integer the client wrote."""
    try:
        json.loads(body, parse_int=_wide)
    except _WideInteger as exc:
        raise RequestError(
            f"The request body holds an integer beyond 64 bits ({str(exc)[:24]}...); "
            "send it as a string or a float.",
            "invalid_json",
        ) from None
    except RecursionError:  # deeper than Python's parser goes: refused as too deep
        raise RequestError(
            "The request body nests too deeply to check; flatten it.", "invalid_json"
        ) from None


class _DuplicateKey(ValueError):
    pass


def _fold(key: str) -> str:
    # Go's encoding/json matches field names case-insensitively with Unicode folding
    # (the long s in "\u017ftream" reads as "stream", the Kelvin sign as "k"); NFKC +
    # casefold covers both.
    return key.lower() if key.isascii() else unicodedata.normalize("NFKC", key).casefold()


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs) or (len(obj) > 1 and len({_fold(k) for k in obj}) != len(obj)):
        seen: set[str] = set()
        for key, _ in pairs:
            if _fold(key) in seen:
                raise _DuplicateKey(key)
            seen.add(_fold(key))
    return obj


def keys_proven_unique(body: bytes, obj: Any) -> bool:
    """True only when no object in `body` repeats a key (exactly, in another letter
    case or Unicode form), proven from orjson's parse `obj` of it at C speed; False
    means "not proven" (the strict parse decides). About 3 µs for a chat body where
    the strict parse costs about 15.

    Why it is exact: in valid JSON a colon outside a string follows a key, and orjson
    writes every key of its parse once and every colon inside a string literally. So
    re-serialised, `obj` has as many colons as `body` unless a repeated key's earlier
    copies (each with its colon) were dropped; an escaped colon (`\\u003a`) in `body`
    would add one back, so such a body is not proven here. The same count over the
    parse of the ASCII-lowercased re-serialisation (whose keys are literal: orjson
    escapes only quotes, backslashes and control characters) catches keys that differ
    only in ASCII letter case; a non-ASCII re-serialisation gets the fold of each
    object's keys instead (`_fold`, as the strict parse). A body deeper than orjson
    writes (255 levels) is refused here: the stages that rewrite a body (the model,
    usage, masks) could not, and would fail inside the exchange."""
    try:
        again = orjson.dumps(obj)
    except orjson.JSONEncodeError:  # deeper than orjson writes: no stage could rewrite it
        reject_duplicate_keys(body)  # a repeated key is named first, as for any body
        raise RequestError(
            "The request body nests too deeply for the gateway to re-encode; flatten it.",
            "invalid_json",
        ) from None
    if b"\\" in body and (b"\\u003a" in body or b"\\u003A" in body):
        return False
    colons = again.count(b":")
    if colons != body.count(b":"):
        return False  # a key repeated (as written, or decoded from escapes)
    if again.isascii():
        return orjson.dumps(orjson.loads(again.lower())).count(b":") == colons
    return _folds_unique(obj)


def _folds_unique(obj: Any) -> bool:
    """No object in the parse holds two keys of one fold (a walk, not a recursion)."""
    stack = [obj]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            n = len(node)
            if n > 1 and len(set(map(_fold, node))) != n:
                return False
            node = node.values()
        for value in node:
            if type(value) is dict or type(value) is list:
                stack.append(value)
    return True


def reject_duplicate_keys(body: bytes) -> None:
    """Refuse a body whose objects repeat a key (exactly, or in another letter case or
    Unicode form) at any depth: parsers disagree on which copy wins, so the provider
    could act on a value the policy never checked. The strict reference (a second
    parse, in Python's json); `keys_proven_unique` spares it for most bodies."""
    try:
        json.loads(body, object_pairs_hook=_unique_pairs)
    except RecursionError:  # orjson took it (its depth limit is higher): too deep here
        raise RequestError(
            "The request body nests too deeply to check; flatten it.", "invalid_json"
        ) from None
    except _DuplicateKey as exc:
        key = str(exc)
        shown = (
            key
            if len(key) <= 64 and key.isprintable()
            else key[:64].encode("ascii", "backslashreplace").decode() + "..."
        )
        raise RequestError(
            f"The request body repeats the key '{shown}' in one object (also in another "
            "letter case or Unicode form); send each key once.",
            "duplicate_key",
        ) from None


def require_string(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        raise RequestError(
            f"You must provide a {name} parameter.", "missing_required_parameter", name
        )
    if not isinstance(value, str) or not value:
        raise RequestError(f"Invalid '{name}': expected a non-empty string.", "invalid_type", name)
    return value


def request_model(obj: Mapping[str, Any], default: str | None = None) -> str:
    """The body's `model`; "" when absent, so a policy default can still fill it (the
    exchange refuses a request that is still without one after the policy stages)."""
    value = obj.get("model")
    if value is None:
        return default or ""
    if not isinstance(value, str) or not value:
        raise RequestError("Invalid 'model': expected a non-empty string.", "invalid_type", "model")
    return value


def optional_bool(obj: Mapping[str, Any], name: str) -> bool:
    value = obj.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"Invalid type for '{name}': expected a boolean.", "invalid_type", name)
    return value


def optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# The answer's own id and model where its first frame names them: OpenAI chat and
# Responses, Anthropic's message_start (`id`, `model`), Gemini (`responseId`,
# `modelVersion`). Escaped quotes inside texts can never match `"id"\s*:`.
_IDENTITY = re.compile(rb'"(id|responseId|model|modelVersion)"\s*:\s*"([^"\\]{1,200})"')
_IDENTITY_SCAN = 8192  # bytes of the first chunk looked at


def response_identity(data: bytes) -> tuple[str | None, str | None]:
    """(response id, response model) from the first bytes of an answer, None for what
    they do not name; the first of each wins (a top-level id comes before a tool call's)."""
    found: dict[str, str] = {}
    for match in _IDENTITY.finditer(data, 0, _IDENTITY_SCAN):
        key = b"id" if match.group(1) in (b"id", b"responseId") else b"model"
        name = key.decode()
        if name not in found:
            found[name] = match.group(2).decode("utf-8", "replace")
            if len(found) == 2:
                break
    return found.get("id"), found.get("model")


# A usage object's key, unescaped (inside a JSON string a quote is escaped, so this is
# a key): OpenAI, Anthropic and Bedrock write `usage`, Gemini `usageMetadata`.
_USAGE_OBJECT = re.compile(rb'"(usage|usageMetadata)"\s*:\s*\{')
_RAW = json.JSONDecoder()


def usage_in_tail(tail: bytes, completion_usage: Callable[[bytes], Any]) -> Any:
    """The usage of a whole answer too large to keep, from its last bytes: every API
    writes it after the answer's texts. The last usage object in `tail`, read as the
    format reads a whole answer's (`completion_usage`), or None."""
    found = None
    for found in _USAGE_OBJECT.finditer(tail):  # noqa: B007 - the last one
        pass
    if found is None:
        return None
    text = tail[found.end() - 1 :].decode("utf-8", "replace")
    try:
        obj, _ = _RAW.raw_decode(text)
    except ValueError:
        return None
    return completion_usage(orjson.dumps({found.group(1).decode(): obj}))
