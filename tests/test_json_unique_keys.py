"""The duplicate-key pre-check (`keys_proven_unique`) is exactly as strict as the
strict parse it spares: on generated JSON (repeated keys at any depth, in other
letter cases and Unicode forms, written with escapes such as `"mod\\u0065l"`, colons
and quotes inside strings, escaped colons) a body it proves unique is one the strict
parse passes, and `parse_json_object` answers every body as the old "orjson, then
always the strict parse" did."""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extproc.errors import RequestError
from extproc.providers._json import (
    _reject_wide_integers,
    keys_proven_unique,
    parse_json_object,
    reject_duplicate_keys,
)

# Keys that collide exactly, by letter case, or only after NFKC + casefold: the long s
# (U+017F) reads as "s", the Kelvin sign as "k", U+1D3C as "O", the ligature as "fi".
KEYS = [
    "model", "Model", "MODEL", "m\u1d3cdel", "\uff4dodel",
    "stream", "\u017ftream", "STREAM",
    "k", "K", "\u212a",
    "fi", "\ufb01", "FI",
    "\u00e9", "e\u0301", "\u00c9",
    "a:b", 'a"b', "a\\b", "{", ":", "",
]  # fmt: skip
TEXT = st.text(alphabet='aA:"\\{},\u017f\u212a\u00e9\U0001f600\x1f\u2028 ', max_size=6)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)


def _pairs(children: st.SearchStrategy) -> st.SearchStrategy:
    key = st.one_of(st.sampled_from(KEYS), TEXT)
    return st.lists(st.tuples(key, children), max_size=5).map(_Obj)


class _Obj(list):
    """An object as written: its (key, value) pairs, repeats kept."""


VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), _pairs(children)),
    max_leaves=25,
)
DOCUMENTS = st.one_of(_pairs(VALUES), VALUES)


def _string(text: str, rnd: random.Random) -> str:
    """A JSON string, each character written as itself or escaped (either hex case)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\' or code < 0x20 or rnd.random() < 0.25:
            short = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "/": "\\/"}.get(ch)
            if short and rnd.random() < 0.5:
                out.append(short)
                continue
            units = [code]
            if code > 0xFFFF:  # a surrogate pair
                code -= 0x10000
                units = [0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)]
            for unit in units:
                hexa = f"{unit:04x}"
                out.append("\\u" + (hexa.upper() if rnd.random() < 0.5 else hexa))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _write(value: Any, rnd: random.Random) -> str:
    space = lambda: rnd.choice(["", "", " ", "\n\t"])  # noqa: E731
    if isinstance(value, _Obj):
        items = [f"{space()}{_string(k, rnd)}{space()}:{space()}{_write(v, rnd)}" for k, v in value]
        return "{" + ",".join(items) + space() + "}"
    if isinstance(value, list):
        return "[" + ",".join(space() + _write(v, rnd) for v in value) + "]"
    if isinstance(value, str):
        return _string(value, rnd)
    return json.dumps(value)  # big integers too: Python's json writes any


def _strict(body: bytes) -> str | None:
    """The reference: None when the strict parse passes, else its error message."""
    try:
        reject_duplicate_keys(body)
    except RequestError as exc:
        assert exc.code == "duplicate_key"
        return str(exc)
    return None


def _old_parse(body: bytes, expected: str) -> Any:
    """parse_json_object before the pre-check: orjson, then always the strict parse
    (and, as since, integers beyond 64 bits refused: orjson reads them as floats)."""
    obj = orjson.loads(body)
    if not isinstance(obj, dict):
        raise RequestError("The request body must be a JSON object.", "invalid_type")
    reject_duplicate_keys(body)
    _reject_wide_integers(body)
    return obj


def _outcome(parse, body: bytes) -> tuple:
    try:
        return ("ok", parse(body, "a JSON object"))
    except RequestError as exc:
        return ("refused", exc.code, str(exc))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS, st.randoms(use_true_random=False))
def test_the_pre_check_never_passes_a_body_the_strict_parse_refuses(doc, rnd) -> None:
    body = _write(doc, rnd).encode()
    obj = orjson.loads(body)
    strict = _strict(body)
    proven = keys_proven_unique(body, obj)
    event(f"strict {'passes' if strict is None else 'refuses'}, pre-check {proven}")
    if proven:
        assert strict is None, (body, strict)
    elif b"\\u003a" not in body.lower():  # the one body it leaves to the strict parse
        assert strict is not None, body  # no false alarm: the fast path is the usual one
    assert _outcome(parse_json_object, body) == _outcome(_old_parse, body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"a","mod\\u0065l":"b"}',
        b'{"model":"a","mod\\u0045l":"b"}',
        b'{"messages":[{"role":"user","content":"hi","content":"x"}]}',
        b'{"a":{"b":[{"c":1}]},"x":[[{"k":{"deep":1,"DEEP":2}}]]}',
        '{"stream":true,"\u017ftream":false}'.encode(),
        b'{"\\u017ftream":true,"stream":false}',
        '{"k":1,"\u212a":2,"text":"\u00e9t\u00e9"}'.encode(),
        b'{"a":1,"a":2,"b":"\\u003a"}',  # the escaped colon makes up for the dropped key
        b'{"a":1,"a":2,"b":"\\u003A"}',
        b'{"Content":"x:y","content":"z"}',
        '{"model":"x","messages":[{"role":"user","Role":"assistant","content":"\u65e5"}]}'.encode(),
        b'{"a":' + b"[" * 300 + b'{"k":1,"k":2}' + b"]" * 300 + b"}",  # past orjson's writer
    ],
)
def test_repeated_keys_are_refused_whatever_the_path(body: bytes) -> None:
    with pytest.raises(RequestError) as info:
        parse_json_object(body, "a JSON object")
    assert info.value.code == "duplicate_key"
    assert info.value.status == 400


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"a: \\"b\\": {c}"}]}',
        '{"model":"x","messages":[{"role":"user","content":"Gr\u00f6\u00dfe: \u65e5"}]}'.encode(),
        b'{"model":"gpt-4o","Modelx":1,"input":[1,2,3]}',
        b'{"a":{"model":1},"b":{"Model":2}}',  # the same key in two objects is fine
    ],
)
def test_bodies_without_repeats_are_proven_on_the_fast_path(body: bytes) -> None:
    assert keys_proven_unique(body, orjson.loads(body))
    assert parse_json_object(body, "a JSON object") == orjson.loads(body)


def test_a_body_too_deep_for_the_strict_parse_is_a_400_not_a_crash() -> None:
    depth = 1010  # orjson's parser takes it, Python's json recurses too deep
    body = b'{"a":' + b"[" * depth + b'{"k":1,"k":2}' + b"]" * depth + b"}"
    with pytest.raises(RequestError) as info:
        parse_json_object(body, "a JSON object")
    assert info.value.code == "invalid_json"
    assert info.value.status == 400


@pytest.mark.parametrize("escaped_colon", [False, True])
def test_a_body_deeper_than_the_gateway_can_re_encode_is_a_400(escaped_colon: bool) -> None:
    """orjson reads 1024 levels but writes 255: a body in between would pass the checks
    and then fail inside the exchange, where a stage rewrites it (the model, usage)."""
    depth = 300
    note = b',"n":"a\\u003ab"' if escaped_colon else b""
    body = b'{"a":' + b'{"p":' * depth + b"{}" + b"}" * depth + note + b"}"
    with pytest.raises(RequestError) as info:
        parse_json_object(body, "a JSON object")
    assert info.value.code == "invalid_json"
    assert info.value.status == 400
    assert "nests too deeply" in str(info.value)
    shallow = b'{"a":' + b'{"p":' * 200 + b"{}" + b"}" * 200 + note + b"}"
    assert parse_json_object(shallow, "a JSON object") == orjson.loads(shallow)
