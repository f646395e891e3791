"""The translation fast paths agree with the reference paths byte for byte.

`AnthropicToOpenAI` reads a delta by byte search (`delta_string`) where the frame has
Anthropic's compact shape; the reference (`fast = False`) parses every frame through
the decoder. For any text (quotes, backslashes, control characters, non-ASCII, lone
surrogates as escapes), written by any JSON encoder (orjson, `json` with or without
`ensure_ascii`, hand-made escapes), with spacing changed, bytes corrupted, and cut into
any chunks, both give the same client bytes. The SSE framer's typed-frame fast path
gives the same `Frame` as the general parser.
"""

from __future__ import annotations

import json

import orjson
from hypothesis import given
from hypothesis import strategies as st

from extproc.dev import mock
from extproc.sse import SSEFramer, _make_frame, _parse_frame
from extproc.translate import ChatToAnthropic
from extproc.translate.base import UpstreamRequest
from extproc.translate.openai_from_anthropic import AnthropicToOpenAI, delta_string
from tests.providers_helpers import cut

UPSTREAM = UpstreamRequest("/v1/messages", b"{}", True, "claude-x", include_usage=True)
KINDS = {
    "text_delta": "text",
    "thinking_delta": "thinking",
    "input_json_delta": "partial_json",
}


class Reference(AnthropicToOpenAI):
    """Every frame through the decoder's parse."""

    __slots__ = ()
    fast = False


def encode(kind: str, text: str, index: int, how: str) -> bytes:
    """One `content_block_delta` data line as some encoder would write it."""
    obj = {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": kind, KINDS[kind]: text},
    }
    if how == "orjson":
        try:
            return orjson.dumps(obj)
        except TypeError:  # a lone surrogate: orjson cannot write it
            how = "ascii"
    if how == "ascii":  # \\uXXXX for everything non-ASCII (Python's json default)
        return json.dumps(obj, separators=(",", ":")).encode()
    if how == "spaced":  # another layout: the fast path must step aside
        return json.dumps(obj).encode()
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return raw.encode("utf-8", "surrogatepass")  # "utf8": raw UTF-8 (maybe invalid)


def frame(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def stream(deltas: list[bytes], tool: bool) -> bytes:
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x",
             "usage": {"input_tokens": 3, "output_tokens": 1}}}  # fmt: skip
    frames = [frame("message_start", orjson.dumps(start))]
    if tool:
        call = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
        block = {"type": "content_block_start", "index": 1, "content_block": call}
        frames.append(frame("content_block_start", orjson.dumps(block)))
    frames += [frame("content_block_delta", d) for d in deltas]
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
           "usage": {"output_tokens": 9}}  # fmt: skip
    frames.append(frame("message_delta", orjson.dumps(end)))
    frames.append(frame("message_stop", b'{"type":"message_stop"}'))
    return b"".join(frames)


def run(cls: type[AnthropicToOpenAI], native: bytes, points: list[int]) -> bytes:
    translator = cls(created=1, include_usage=True, max_frame_bytes=1 << 20)
    return b"".join(translator.feed(c) for c in cut(native, points)) + translator.finish()


def run_whole(native: bytes, points: list[int]) -> tuple[bytes, AnthropicToOpenAI]:
    """As the exchange feeds a stream no guard reads: `feed_whole` where it takes the
    chunk, else `feed`."""
    translator = AnthropicToOpenAI(created=1, include_usage=True, max_frame_bytes=1 << 20)
    out = b""
    for chunk in cut(native, points):
        whole = translator.feed_whole(chunk)
        if whole is None:
            out += translator.feed(chunk)
        else:
            out += whole[0] + whole[1]
    return out + translator.finish(), translator


def metered(translator: AnthropicToOpenAI) -> tuple:
    decoder = translator.decoder
    usage = decoder.usage
    return (decoder.content_events, decoder.finish_reason, decoder.done,
            usage.prompt_tokens, usage.completion_tokens)  # fmt: skip


def mutate(data: bytes, at: int, byte: int, how: str) -> bytes:
    if how == "none" or not data:
        return data
    at %= len(data)
    if how == "replace":
        return data[:at] + bytes([byte]) + data[at + 1 :]
    if how == "insert":
        return data[:at] + bytes([byte]) + data[at:]
    return data[:at]  # truncated


deltas = st.lists(
    st.tuples(
        st.sampled_from(sorted(KINDS)),
        st.text(max_size=16),
        st.sampled_from([0, 1, 7, 12345]),
        st.sampled_from(["orjson", "ascii", "utf8", "spaced"]),
        st.tuples(
            st.integers(0, 10**4),
            st.sampled_from(b'"\\}0a \x00\x1f\x7f\xc3\xa9\xed\xff\n\r'),
            st.sampled_from(["none", "none", "none", "replace", "insert", "truncate"]),
        ),
    ),
    max_size=8,
)


@given(deltas, st.booleans(), st.lists(st.integers(0, 10**5), max_size=6))
def test_fast_and_reference_paths_write_the_same_bytes(cases, tool, points) -> None:
    datas = [mutate(encode(k, t, i, how), *m) for k, t, i, how, m in cases]
    native = stream(datas, tool)
    assert run(AnthropicToOpenAI, native, points) == run(Reference, native, points)


@given(deltas, st.booleans(), st.lists(st.integers(0, 10**5), max_size=6), st.booleans())
def test_the_whole_chunk_path_writes_and_meters_as_the_reference(cases, tool, points, cr):
    datas = [mutate(encode(k, t, i, how), *m) for k, t, i, how, m in cases]
    native = stream(datas, tool)
    if cr:  # CRLF line endings: the whole-chunk path steps aside
        native = native.replace(b"\n", b"\r\n")
    reference = Reference(created=1, include_usage=True, max_frame_bytes=1 << 20)
    expected = b"".join(reference.feed(c) for c in cut(native, points)) + reference.finish()
    got, translator = run_whole(native, points)
    assert got == expected
    assert metered(translator) == metered(reference)


def test_a_coalesced_stream_is_taken_whole() -> None:
    """The mock provider's stream in one chunk goes through `feed_whole` (so the
    property above compares two paths)."""
    translator = ChatToAnthropic()
    upstream = translator.request(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    frames = mock.build_anthropic_stream(orjson.loads(upstream.body), mock.MockOptions(tokens=8))
    response = translator.response(upstream, created=1)
    whole = response.feed_whole(b"".join(frames))
    assert whole is not None and whole[1] == b""
    assert whole[0].endswith(b"data: [DONE]\n\n") and response.decoder.content_events == 8


@given(st.text(max_size=24))
def test_a_compact_delta_is_read_by_byte_search(text: str) -> None:
    """The shape Anthropic sends takes the fast path (so the property above compares
    two paths, not one), with the JSON string orjson would write."""
    try:
        data = orjson.dumps(
            {
                "type": "content_block_delta",
                "index": 3,
                "delta": {"type": "text_delta", "text": text},
            }
        )
    except TypeError:  # a lone surrogate
        return
    assert delta_string(data) == ("content", 3, orjson.dumps(text))


def test_the_mock_providers_stream_takes_the_fast_path() -> None:
    translator = ChatToAnthropic()
    upstream = translator.request(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    frames = mock.build_anthropic_stream(orjson.loads(upstream.body), mock.MockOptions(tokens=8))
    data = [f.data for f in SSEFramer().feed(b"".join(frames))]
    found = [d for d in data if d is not None and delta_string(d) is not None]
    assert len(found) == 8


def test_a_leading_zero_index_or_another_shape_takes_the_parse() -> None:
    compact = b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a"}}'
    assert delta_string(compact) == ("content", 0, b'"a"')
    assert delta_string(compact.replace(b'"index":0', b'"index":01')) is None
    assert delta_string(compact.replace(b'"a"', b'"a\\"')) is None  # escaped closing quote
    assert delta_string(compact.replace(b"text_delta", b"signature_delta")) is None
    assert delta_string(compact.replace(b'"a"', b'"\\u00e9"')) == ("content", 0, '"é"'.encode())


lines = st.binary(max_size=12).filter(lambda b: b"\n" not in b and b"\r" not in b)


@given(lines, lines, st.sampled_from([b"event: ", b"event:", b"data: ", b": "]))
def test_the_typed_frame_fast_path_parses_as_the_general_parser(name, data, head) -> None:
    raw = head + name + b"\ndata: " + data + b"\n\n"
    assert _make_frame(raw) == _parse_frame(raw)
