"""The incremental JSON array splitter behind Gemini's non-SSE stream: any JSON, any
whitespace, any chunking -> the same elements, every byte accounted for, bounded."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.providers.jsonarray import JSONArraySplitter, MalformedJSONStream, Piece, State
from extproc.sse import FrameTooLarge
from tests.providers_helpers import REPLAY, cut, cuts

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
SPACE = st.lists(st.sampled_from([" ", "\n", "\r\n", "\t"]), max_size=3).map("".join)


def split_all(chunks: list[bytes], limit: int = 1 << 20) -> list[Piece]:
    splitter = JSONArraySplitter(limit)
    pieces: list[Piece] = []
    for chunk in chunks:
        pieces += splitter.feed(chunk)
    pieces += splitter.finish()
    return pieces


@st.composite
def arrays(draw) -> tuple[list, bytes]:
    values = draw(st.lists(JSON, max_size=6))
    parts = ["[", draw(SPACE)]
    for i, value in enumerate(values):
        if i:
            parts += [draw(SPACE), ",", draw(SPACE)]
        indent = draw(st.sampled_from([None, 2]))
        parts.append(json.dumps(value, indent=indent, ensure_ascii=draw(st.booleans())))
    parts += [draw(SPACE), "]", draw(SPACE)]
    return values, "".join(parts).encode()


@REPLAY
@given(arrays(), st.data())
def test_any_array_any_chunking_gives_its_elements_and_every_byte(case, data):
    values, body = case
    pieces = split_all(cut(body, data.draw(cuts(body))))
    assert b"".join(p.raw for p in pieces) == body
    assert [json.loads(p.raw) for p in pieces if p.element] == values
    assert pieces[-1].state == State.END


def test_strings_full_of_structure_and_escapes_byte_by_byte():
    values = [
        {"t": 'a "quoted" }] [{ \\ back\\slash \\"'},
        ["]", "[", "{", "}", "\\", '"'],
        "a string element with , and ]",
        {"nested": [[[{"deep": "\u00e9\u4e2d\U0001f600"}]]]},
        12345,
        True,
        None,
    ]
    body = json.dumps(values, ensure_ascii=False).encode()
    pieces = split_all([body[i : i + 1] for i in range(len(body))])
    assert [json.loads(p.raw) for p in pieces if p.element] == values
    assert b"".join(p.raw for p in pieces) == body


def test_backslash_as_the_last_byte_of_a_chunk():
    body = b'[{"a":"x\\\\"},{"b":"\\""}]'
    for at in range(1, len(body)):
        pieces = split_all([body[:at], body[at:]])
        assert [json.loads(p.raw) for p in pieces if p.element] == [{"a": "x\\"}, {"b": '"'}]


def test_elements_come_out_as_soon_as_they_end_and_fillers_are_not_held():
    splitter = JSONArraySplitter()
    first = splitter.feed(b'[{\n  "a": 1\n}\n,\r\n')
    assert [(p.raw, p.element) for p in first] == [
        (b"[", False), (b'{\n  "a": 1\n}', True), (b"\n,\r\n", False),
    ]  # fmt: skip
    assert splitter.buffered == 0 and splitter.state == State.NEXT
    assert splitter.feed(b'{"b": [1, 2') == []
    assert splitter.buffered == len(b'{"b": [1, 2')
    (done,) = splitter.feed(b"]}")
    assert done.raw == b'{"b": [1, 2]}' and done.state == State.AFTER
    (end,) = splitter.feed(b"\n]")
    assert end.state == State.END and splitter.finish() == []


def test_dribbled_bytes_are_scanned_once():
    """Resuming where the last scan stopped keeps byte-by-byte feeding linear."""
    element = json.dumps({"k": ["v" * 50] * 200, "s": "}{][" * 100}).encode()
    splitter = JSONArraySplitter()
    splitter.feed(b"[")
    for i, byte in enumerate(element[:-1]):
        assert splitter.feed(bytes([byte])) == []
        assert splitter._scan >= i  # never rewinds to the element start
    (piece,) = splitter.feed(element[-1:])
    assert piece.raw == element


def test_a_top_level_object_is_one_element():
    body = b'{\n  "candidates": [{"x": "]"}]\n}\n'
    pieces = split_all(cut(body, [3, 9, 20]))
    assert [p.raw for p in pieces if p.element] == [body.strip()]
    assert pieces[-1].state == State.END


def test_empty_array():
    pieces = split_all([b" [ ", b"] "])
    assert [p.element for p in pieces] == [False, False]
    assert pieces[-1].state == State.END


@pytest.mark.parametrize(
    "body",
    [b"x", b"[1 2]", b"[1,]", b"[,1]", b"[1]x", b"[1]]", b'[{"a":1}}', b'[{"a":1} {"b":2}]'],
)
def test_malformed_arrays_raise_a_stream_error_not_a_crash(body):
    with pytest.raises(MalformedJSONStream):
        split_all([body])


@pytest.mark.parametrize("body", [b"", b"[", b'[{"a":', b"[1,", b'[{"a":1}'])
def test_a_cut_array_raises_at_finish(body):
    with pytest.raises(MalformedJSONStream):
        split_all([body])


def test_element_size_is_bounded():
    splitter = JSONArraySplitter(max_element_bytes=64)
    splitter.feed(b'[{"a": "' + b"x" * 40)
    with pytest.raises(FrameTooLarge):
        splitter.feed(b"x" * 40)
    # Many small elements never accumulate: only the unfinished one is kept.
    splitter = JSONArraySplitter(max_element_bytes=64)
    splitter.feed(b"[")
    for _ in range(1000):
        splitter.feed(b'{"a": "' + b"y" * 40 + b'"},')
        assert splitter.buffered == 0
