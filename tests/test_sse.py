"""Tests for the incremental SSE framer (extproc/sse.py).

Upstream chunks are not frames: a fast provider coalesces many frames into one chunk and
a slow one splits them anywhere, even between the CR and LF of one line ending. These
tests pin the framer's contract: the same frames (raw bytes and parsed fields) whatever
the chunking, exact byte accounting, bounded memory, and WHATWG field parsing on bytes.

A small whole-input reference parser (`ref_frames`) serves as the oracle for the
property tests; it is deliberately naive (regex over the complete input) so that it is
obviously right, which the incremental framer cannot be.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.sse import Frame, FrameTooLarge, SSEFramer

# --------------------------------------------------------------------------- helpers

FrameKey = tuple[bytes, bytes | None, bytes | None, bytes | None, int | None]

_EOL = re.compile(rb"\r\n|\r|\n")


def key(frame: Frame) -> FrameKey:
    """Compare frames by value, independent of how the dataclass implements __eq__."""
    return (frame.raw, frame.data, frame.event, frame.id, frame.retry)


def fr(
    raw: bytes,
    data: bytes | None = None,
    event: bytes | None = None,
    id: bytes | None = None,
    retry: int | None = None,
) -> FrameKey:
    """Expected frame, written the way a reader of the spec would write it."""
    return (raw, data, event, id, retry)


def run(chunks: list[bytes], max_frame_bytes: int = 1 << 20) -> list[FrameKey]:
    """Feed all chunks, then finish; return every frame in order (finish's last)."""
    framer = SSEFramer(max_frame_bytes=max_frame_bytes)
    out: list[FrameKey] = []
    for chunk in chunks:
        out.extend(key(f) for f in framer.feed(chunk))
    tail = framer.finish()
    if tail is not None:
        out.append(key(tail))
    return out


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    """Cut data at the given offsets (duplicates give empty chunks, which must be fine)."""
    cuts = [0, *sorted(min(max(p, 0), len(data)) for p in points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def ref_parse_fields(raw: bytes) -> tuple[bytes | None, bytes | None, bytes | None, int | None]:
    """WHATWG field rules on the lines of one complete frame (a trailing CR ends a line)."""
    data_lines: list[bytes] = []
    event = id_ = None
    retry: int | None = None
    pos = 0
    lines: list[bytes] = []
    for m in _EOL.finditer(raw):
        lines.append(raw[pos : m.start()])
        pos = m.end()
    if pos < len(raw):
        lines.append(raw[pos:])
    for line in lines:
        if not line or line.startswith(b":"):
            continue
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data_lines.append(value)
        elif name == b"event":
            event = value
        elif name == b"id":
            id_ = value
        elif name == b"retry" and value and all(0x30 <= c <= 0x39 for c in value):
            retry = int(value)
    data = b"\n".join(data_lines) if data_lines else None
    return data, event, id_, retry


def ref_split(data: bytes, final: bool) -> tuple[list[bytes], int]:
    """Raw frames complete in `data`, and the offset where the held remainder starts.

    When not final, a CR at the very end is not yet a line ending (an LF may follow).
    """
    frames: list[bytes] = []
    start = pos = 0
    for m in _EOL.finditer(data):
        if not final and m.group() == b"\r" and m.end() == len(data):
            break
        line_empty = m.start() == pos
        pos = m.end()
        if line_empty:
            frames.append(data[start:pos])
            start = pos
    return frames, start


def ref_frames(data: bytes) -> list[FrameKey]:
    """All frames of a complete stream, the unterminated tail (if any) last."""
    raws, start = ref_split(data, final=True)
    if start < len(data):
        raws.append(data[start:])
    return [(raw, *ref_parse_fields(raw)) for raw in raws]


def ref_held(data: bytes) -> int:
    """Bytes a streaming framer must still hold after seeing exactly `data`."""
    _, start = ref_split(data, final=False)
    return len(data) - start


# ----------------------------------------------------------------- the reference itself


def test_reference_parser_sanity() -> None:
    """The oracle must agree with hand-written expectations, or the properties prove nothing."""
    assert ref_frames(b"data: a\r\n\r\n\ndata:b") == [
        fr(b"data: a\r\n\r\n", b"a"),
        fr(b"\n"),
        fr(b"data:b", b"b"),
    ]
    assert ref_held(b"data: a\n\r") == 9
    assert ref_held(b"data: a\n\r\n") == 0
    assert ref_held(b"data: a\n\rx") == 1


# ------------------------------------------------------------------ OpenAI-like streams


OPENAI_STREAM = [
    {"id": "c1", "object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant"}}]},
    {"id": "c1", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "Hel"}}]},
    {"id": "c1", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "lo"}}]},
    {"id": "c1", "choices": [{"delta": {}, "finish_reason": "stop"}]},
    {"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
]


def openai_bytes(eol: bytes = b"\n") -> bytes:
    body = b"".join(b"data: " + json.dumps(c).encode() + eol + eol for c in OPENAI_STREAM)
    return body + b"data: [DONE]" + eol + eol


def test_openai_stream_in_one_chunk() -> None:
    stream = openai_bytes()
    framer = SSEFramer()
    frames = framer.feed(stream)
    assert [json.loads(f.data) for f in frames[:-1]] == OPENAI_STREAM
    assert frames[-1].data == b"[DONE]"
    assert b"".join(f.raw for f in frames) == stream
    assert framer.buffered == 0
    assert framer.finish() is None


def test_openai_frame_fields_and_types() -> None:
    frames = SSEFramer().feed(b'data: {"a":1}\n\n')
    assert len(frames) == 1
    frame = frames[0]
    assert isinstance(frame, Frame)
    assert type(frame.raw) is bytes
    assert type(frame.data) is bytes
    assert key(frame) == fr(b'data: {"a":1}\n\n', b'{"a":1}')


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_openai_stream_every_line_ending_and_chunking(eol: bytes) -> None:
    stream = openai_bytes(eol)
    expected = run([stream])
    assert len(expected) == len(OPENAI_STREAM) + 1
    assert [json.loads(f[1]) for f in expected[:-1]] == OPENAI_STREAM
    assert expected[-1][1] == b"[DONE]"
    assert run(bytewise(stream)) == expected
    assert run(split_at(stream, list(range(0, len(stream), 7)))) == expected


def test_frame_split_across_chunks_is_emitted_once_complete() -> None:
    framer = SSEFramer()
    assert framer.feed(b'data: {"choices":[{"delta"') == []
    assert framer.buffered == len(b'data: {"choices":[{"delta"')
    assert framer.feed(b':{"content":"hi"}}]}\n') == []
    frames = framer.feed(b"\ndata: [DO")
    assert [key(f) for f in frames] == [
        fr(
            b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
            b'{"choices":[{"delta":{"content":"hi"}}]}',
        )
    ]
    assert framer.buffered == len(b"data: [DO")
    assert [f.data for f in framer.feed(b"NE]\n\n")] == [b"[DONE]"]
    assert framer.buffered == 0


def test_coalesced_chunk_gives_all_frames_in_order_and_keeps_the_partial() -> None:
    framer = SSEFramer()
    frames = framer.feed(b"data: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4")
    assert [f.data for f in frames] == [b"1", b"2", b"3"]
    assert framer.buffered == len(b"data: 4")
    tail = framer.finish()
    assert tail is not None
    assert key(tail) == fr(b"data: 4", b"4")


def test_empty_chunks_are_harmless() -> None:
    framer = SSEFramer()
    assert framer.feed(b"") == []
    assert framer.buffered == 0
    assert framer.feed(b"data: x\n") == []
    assert framer.feed(b"") == []
    assert [f.data for f in framer.feed(b"\n")] == [b"x"]
    assert framer.feed(b"") == []
    assert framer.finish() is None


# ---------------------------------------------------------------------- line endings


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"data: a\r\n\r\n", [fr(b"data: a\r\n\r\n", b"a")]),
        (b"data: a\r\r", [fr(b"data: a\r\r", b"a")]),
        (b"data: a\n\n", [fr(b"data: a\n\n", b"a")]),
        # mixed endings inside one frame; "\n\r\n" is LF then a CRLF blank line
        (
            b"data: a\r\ndata: b\rdata: c\n\r\n",
            [fr(b"data: a\r\ndata: b\rdata: c\n\r\n", b"a\nb\nc")],
        ),
        # "\r\n\r" then LF: the CRLF ends the line, CR+LF is the blank line
        (b"data: a\r\n\r\ndata: b\n\n", [fr(b"data: a\r\n\r\n", b"a"), fr(b"data: b\n\n", b"b")]),
        # CR then LF-only blank line would be CRLF, so "\r\n" here is only one ending
        (b"data: a\r\ndata: b\r\n\n", [fr(b"data: a\r\ndata: b\r\n\n", b"a\nb")]),
        # LF then CR: two endings (LF CR is not a pair)
        (b"data: a\n\rdata: b\n\r", [fr(b"data: a\n\r", b"a"), fr(b"data: b\n\r", b"b")]),
    ],
    ids=["CRLF", "CR", "LF", "mixed", "CRLF-then-next", "CRLF-then-LF", "LF-CR"],
)
def test_line_endings(stream: bytes, expected: list[FrameKey]) -> None:
    assert run([stream]) == expected
    assert run(bytewise(stream)) == expected


def test_cr_at_chunk_end_then_lf_is_one_line_ending() -> None:
    """The classic split: CR ends one chunk, LF starts the next; that is ONE line end."""
    framer = SSEFramer()
    assert framer.feed(b"data: a\r") == []
    frames = framer.feed(b"\ndata: b\r\n\r\n")
    # if the CR and LF were taken as two endings, "data: a" would be a frame on its own
    assert [key(f) for f in frames] == [fr(b"data: a\r\ndata: b\r\n\r\n", b"a\nb")]
    assert framer.finish() is None


def test_blank_line_cr_at_chunk_end_waits_for_next_byte() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: a\r\n\r") == []  # may still become \r\n: raw not known yet
    assert framer.buffered == len(b"data: a\r\n\r")
    assert framer.feed(b"") == []  # an empty chunk decides nothing
    frames = framer.feed(b"\n")
    assert [key(f) for f in frames] == [fr(b"data: a\r\n\r\n", b"a")]
    assert framer.buffered == 0
    # and the LF must not also produce a spurious empty frame
    assert framer.finish() is None


def test_blank_line_cr_at_chunk_end_then_next_frame() -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: a\r\n\r") == []
    frames = framer.feed(b"data: b\r")
    assert [key(f) for f in frames] == [fr(b"data: a\r\n\r", b"a")]
    assert framer.buffered == len(b"data: b\r")
    frames = framer.feed(b"\r")
    assert frames == []  # "\r\r" at the end: the second CR may still pair with an LF
    frames = framer.feed(b"\n")
    assert [key(f) for f in frames] == [fr(b"data: b\r\r\n", b"b")]


def test_cr_only_stream_split_between_every_byte() -> None:
    stream = b"event: e\rdata: 1\r\rdata: 2\r\r"
    assert run(bytewise(stream)) == [
        fr(b"event: e\rdata: 1\r\r", b"1", event=b"e"),
        fr(b"data: 2\r\r", b"2"),
    ]


# ------------------------------------------------------------------- field parsing


@pytest.mark.parametrize(
    ("line", "data"),
    [
        (b"data: x", b"x"),
        (b"data:x", b"x"),
        (b"data:  x", b" x"),  # only one leading space is removed
        (b"data:\tx", b"\tx"),  # a tab is not a space
        (b"data: \tx", b"\tx"),
        (b"data:", b""),
        (b"data: ", b""),
        (b"data", b""),  # no colon: field name is the whole line, value empty
        (b"data: x ", b"x "),  # trailing spaces kept
        (b"data:x:y", b"x:y"),  # only the first colon splits
        (b"data: : x", b": x"),
        (b"data: \xff\xfe\x00", b"\xff\xfe\x00"),  # arbitrary bytes pass through
        ("data: héllo €".encode(), "héllo €".encode()),
    ],
)
def test_data_field_value(line: bytes, data: bytes) -> None:
    assert run([line + b"\n\n"]) == [fr(line + b"\n\n", data)]


def test_multiline_data_joined_with_lf() -> None:
    stream = b"data: line1\ndata:line2\ndata\ndata:  4\n\n"
    assert run([stream]) == [fr(stream, b"line1\nline2\n\n 4")]


def test_data_lines_interleaved_with_other_fields() -> None:
    stream = b"data: a\nevent: e\n: c\nid: 1\ndata: b\n\n"
    assert run([stream]) == [fr(stream, b"a\nb", event=b"e", id=b"1")]


def test_event_id_retry_fields() -> None:
    stream = b"event: message_start\nid: 42\nretry: 3000\ndata: {}\n\n"
    assert run([stream]) == [fr(stream, b"{}", event=b"message_start", id=b"42", retry=3000)]


def test_last_event_and_id_win() -> None:
    stream = b"event: a\nevent: b\nid: 1\nid:2\n\n"
    assert run([stream]) == [fr(stream, None, event=b"b", id=b"2")]


def test_empty_id_and_event_values() -> None:
    assert run([b"id: 1\nid\n\n"]) == [fr(b"id: 1\nid\n\n", id=b"")]
    assert run([b"event:\n\n"]) == [fr(b"event:\n\n", event=b"")]


def test_fields_do_not_leak_between_frames() -> None:
    stream = b"event: e\nid: 7\nretry: 10\ndata: a\n\ndata: b\n\n"
    assert run([stream]) == [
        fr(b"event: e\nid: 7\nretry: 10\ndata: a\n\n", b"a", event=b"e", id=b"7", retry=10),
        fr(b"data: b\n\n", b"b"),
    ]


@pytest.mark.parametrize(
    ("lines", "retry"),
    [
        (b"retry: 3000", 3000),
        (b"retry:0", 0),
        (b"retry: 007", 7),
        (b"retry: 3x", None),
        (b"retry: -5", None),
        (b"retry: +5", None),  # int() would accept this
        (b"retry:  5", None),  # value is " 5"; int() would accept this too
        (b"retry: 5 ", None),
        (b"retry: 1_000", None),  # int() accepts underscores
        (b"retry: 1.5", None),
        ("retry: ٣".encode(), None),  # Arabic-Indic digit: not ASCII
        (b"retry: 100\nretry: abc", 100),  # last VALID value
        (b"retry: 100\nretry: 200", 200),
        (b"retry", None),
    ],
)
def test_retry_only_ascii_digits(lines: bytes, retry: int | None) -> None:
    stream = lines + b"\n\n"
    assert run([stream]) == [fr(stream, retry=retry)]


def test_retry_empty_value_is_not_valid() -> None:
    """`retry:` has no digits at all, so it cannot be a reconnection time."""
    assert run([b"retry:\n\n"]) == [fr(b"retry:\n\n")]


@pytest.mark.parametrize(
    "line",
    [b"Data: x", b"DATA: x", b"data : x", b" data: x", b"dat: x", b"datas: x", b"foo: bar", b"foo"],
)
def test_unknown_fields_are_ignored(line: bytes) -> None:
    """Field names are case-sensitive and matched exactly; unknown ones are skipped."""
    stream = line + b"\ndata: y\n\n"
    assert run([stream]) == [fr(stream, b"y")]


def test_comments_are_ignored_and_comment_only_block_is_a_frame() -> None:
    stream = b": ping\n\ndata: a\n:comment\n: data: b\n\n:\n\n"
    assert run([stream]) == [
        fr(b": ping\n\n"),
        fr(b"data: a\n:comment\n: data: b\n\n", b"a"),
        fr(b":\n\n"),
    ]


# --------------------------------------------------------------------- blank lines


def test_blank_lines_between_frames_are_their_own_frames() -> None:
    stream = b"data: a\n\n\n\ndata: b\n\n"
    assert run([stream]) == [
        fr(b"data: a\n\n", b"a"),
        fr(b"\n"),
        fr(b"\n"),
        fr(b"data: b\n\n", b"b"),
    ]


def test_leading_blank_lines() -> None:
    assert run([b"\n\n\n"]) == [fr(b"\n"), fr(b"\n"), fr(b"\n")]
    assert run([b"\r\n\r\ndata: a\r\n\r\n"]) == [
        fr(b"\r\n"),
        fr(b"\r\n"),
        fr(b"data: a\r\n\r\n", b"a"),
    ]
    assert run([b"\r\r"]) == [fr(b"\r"), fr(b"\r")]


def test_event_without_data_is_a_frame_with_data_none() -> None:
    assert run([b"event: ping\n\n"]) == [fr(b"event: ping\n\n", None, event=b"ping")]


# ------------------------------------------------------------------------- finish()


def test_finish_on_fresh_framer_is_none() -> None:
    assert SSEFramer().finish() is None


def test_finish_after_complete_frames_is_none() -> None:
    framer = SSEFramer()
    framer.feed(b"data: a\n\n")
    assert framer.finish() is None


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (b"data: [DONE]", fr(b"data: [DONE]", b"[DONE]")),
        (b"data: [DONE]\n", fr(b"data: [DONE]\n", b"[DONE]")),
        (b"data: [DONE]\r\n", fr(b"data: [DONE]\r\n", b"[DONE]")),
        (b"data: x\r", fr(b"data: x\r", b"x")),  # trailing lone CR is a line end
        (b"data: x\n\r", fr(b"data: x\n\r", b"x")),  # complete, but held for the CR
        (b"data: a\ndata: b", fr(b"data: a\ndata: b", b"a\nb")),
        (b"data: a\rdata", fr(b"data: a\rdata", b"a\n")),
        (b"data", fr(b"data", b"")),
        (b"\r", fr(b"\r")),
        (b": keepalive", fr(b": keepalive")),
        (b"event: e\nid: 9\nretry: 5", fr(b"event: e\nid: 9\nretry: 5", None, b"e", b"9", 5)),
        (b"dat", fr(b"dat")),
    ],
)
def test_finish_returns_unterminated_tail(tail: bytes, expected: FrameKey) -> None:
    framer = SSEFramer()
    assert framer.feed(b"data: first\n\n" + tail)[0].data == b"first"
    frame = framer.finish()
    assert frame is not None
    assert key(frame) == expected
    # and byte by byte gives the same
    assert run(bytewise(tail)) == [expected]


# -------------------------------------------------------------- size limit / memory


def test_incomplete_frame_over_the_limit_raises() -> None:
    framer = SSEFramer(max_frame_bytes=100)
    with pytest.raises(FrameTooLarge):
        framer.feed(b"data: " + b"x" * 200)


def test_frame_too_large_is_an_exception() -> None:
    assert issubclass(FrameTooLarge, Exception)


def test_limit_counts_the_whole_frame_not_just_the_current_line() -> None:
    framer = SSEFramer(max_frame_bytes=100)
    with pytest.raises(FrameTooLarge):
        for _ in range(20):
            framer.feed(b"data: 0123456789\n")  # 17 bytes a line, never a blank line


def test_limit_boundary_is_exceeds_not_reaches() -> None:
    """An incomplete frame of exactly max_frame_bytes is allowed; one more byte is not."""
    framer = SSEFramer(max_frame_bytes=10)
    assert framer.feed(b"data: 1234") == []
    assert framer.buffered == 10
    with pytest.raises(FrameTooLarge):
        framer.feed(b"5")


def test_frame_of_exactly_the_limit_passes_bytewise() -> None:
    frame = b"data: 1234\n\n"
    framer = SSEFramer(max_frame_bytes=len(frame))
    out = []
    for b in bytewise(frame * 3):
        out.extend(framer.feed(b))
        assert framer.buffered <= len(frame)
    assert [f.data for f in out] == [b"1234"] * 3


def test_many_small_frames_far_beyond_the_limit_do_not_raise() -> None:
    """Only the incomplete frame counts; a big coalesced chunk of small frames is fine."""
    frame = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'
    stream = frame * 20_000  # ~1 MB
    framer = SSEFramer(max_frame_bytes=len(frame) + 8)
    frames = framer.feed(stream)
    assert len(frames) == 20_000
    assert framer.buffered == 0
    frames = []
    for chunk in split_at(stream[:50_000], list(range(0, 50_000, 97))):
        frames.extend(framer.feed(chunk))
    assert framer.buffered < len(frame)
    assert all(f.raw == frame for f in frames)


def test_buffered_stays_bounded_until_the_raise() -> None:
    limit = 64
    framer = SSEFramer(max_frame_bytes=limit)
    chunk = b"data: 0123456789abcdef"  # 22 bytes, never terminated
    with pytest.raises(FrameTooLarge):
        for _ in range(100):
            framer.feed(chunk)
            assert framer.buffered <= limit + len(chunk)


def test_buffered_stays_bounded_bytewise_until_the_raise() -> None:
    limit = 50
    framer = SSEFramer(max_frame_bytes=limit)
    fed = 0
    with pytest.raises(FrameTooLarge):
        for b in bytewise(b"data: " + b"z" * 1000):
            framer.feed(b)
            fed += 1
            assert framer.buffered <= limit + 1
    assert fed <= limit + 1  # raised as soon as the limit was crossed, not much later


# ------------------------------------------------------------- large / linear stream


def test_large_stream_fed_one_byte_at_a_time() -> None:
    """~200 KB byte by byte; an O(n^2) framer would crawl here (no timing asserted)."""
    small = [
        b'data: {"i": %d, "pad": "%s"}%s%s' % (i, b"x" * 40, eol, eol)
        for i, eol in zip(range(1200), [b"\n", b"\r\n", b"\r"] * 400, strict=True)
    ]
    big_payload = b"y" * 70_000
    big_multi = b"".join(b"data: line%05d\r\n" % i for i in range(3000)) + b"\r\n"
    stream = (
        b"".join(small[:600])
        + b"event: big\ndata: "
        + big_payload
        + b"\n\n"
        + big_multi
        + b"".join(small[600:])
        + b"data: [DONE]"  # unterminated: comes out of finish()
    )
    assert len(stream) > 200_000
    framer = SSEFramer()
    frames: list[Frame] = []
    for i in range(len(stream)):
        frames.extend(framer.feed(stream[i : i + 1]))
        assert framer.buffered < 100_000
    tail = framer.finish()
    assert tail is not None
    frames.append(tail)

    assert b"".join(f.raw for f in frames) == stream
    assert len(frames) == 1200 + 2 + 1
    datas = [f.data for f in frames]
    assert [json.loads(d)["i"] for d in datas[:600]] == list(range(600))
    assert frames[600].event == b"big"
    assert datas[600] == big_payload
    assert datas[601] == b"\n".join(b"line%05d" % i for i in range(3000))
    assert [json.loads(d)["i"] for d in datas[602:-1]] == list(range(600, 1200))
    assert datas[-1] == b"[DONE]"


# -------------------------------------------------------------- property: round trip

_VALUE_ATOMS = [b" ", b":", b"a", b"0", b"{", b'"', b"\t", b"\xc3\xa9", b"\xff", b"data: ", b"x"]
_no_eol = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
field_value = st.one_of(
    _no_eol,
    st.lists(st.sampled_from(_VALUE_ATOMS), max_size=8).map(b"".join),
)
# NUL is excluded from ids: WHATWG ignores an id containing NUL, the spec here doesn't say.
id_value = field_value.map(lambda b: b.replace(b"\x00", b""))
digits = st.from_regex(rb"\A[0-9]{1,12}\Z")
bad_retry = st.tuples(
    st.from_regex(rb"\A[0-9]{0,4}\Z"),
    st.sampled_from([b"x", b"-", b"+", b" ", b"_", b".", b"\xd9\xa3", b":"]),
    st.from_regex(rb"\A[0-9]{0,4}\Z"),
).map(b"".join)
unknown_name = st.one_of(
    st.sampled_from(
        [b"Data", b"DATA", b"data ", b" data", b"dat", b"datas", b"Event", b"ID", b"x"]
    ),
    st.binary(min_size=1, max_size=6).filter(
        lambda n: not (set(n) & {10, 13, 58}) and n not in (b"data", b"event", b"id", b"retry")
    ),
)

field = st.one_of(
    st.tuples(st.just("data"), field_value),
    st.tuples(st.just("event"), field_value),
    st.tuples(st.just("id"), id_value),
    st.tuples(st.just("retry"), digits),
    st.tuples(st.just("retry"), bad_retry),
    st.tuples(st.just("comment"), field_value),
    st.tuples(unknown_name.map(lambda n: "unknown:" + n.hex()), field_value),
)
event_strategy = st.lists(field, max_size=6)
eol = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def serialised_stream(draw: st.DrawFn) -> tuple[bytes, list[FrameKey]]:
    """Events -> wire bytes with random endings/spacing, plus the fields we expect back."""
    out = bytearray()
    expected: list[tuple[bytes | None, bytes | None, bytes | None, int | None]] = []
    prev_eol = b""

    def emit(line: bytes) -> None:
        nonlocal prev_eol
        ending = draw(eol)
        if not line and prev_eol == b"\r" and ending == b"\n":
            ending = b"\r"  # CR then an LF-terminated empty line would merge into CRLF
        out.extend(line + ending)
        prev_eol = ending

    for fields in draw(st.lists(event_strategy, max_size=6)):
        data_lines: list[bytes] = []
        ev = id_ = None
        retry = None
        for kind, value in fields:
            if kind == "comment":
                emit(b":" + value)
                continue
            name = bytes.fromhex(kind[8:]) if kind.startswith("unknown:") else kind.encode()
            if value.startswith(b" "):
                sep = b": "
            elif value == b"":
                sep = draw(st.sampled_from([b"", b":", b": "]))
            else:
                sep = draw(st.sampled_from([b":", b": "]))
            emit(name + sep + value)
            if kind == "data":
                data_lines.append(value)
            elif kind == "event":
                ev = value
            elif kind == "id":
                id_ = value
            elif kind == "retry" and value.isdigit():
                retry = int(value)
        emit(b"")
        expected.append((b"\n".join(data_lines) if data_lines else None, ev, id_, retry))
    return bytes(out), expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=serialised_stream(), data=st.data())
def test_property_serialised_events_round_trip(
    stream: tuple[bytes, list[FrameKey]], data: st.DataObject
) -> None:
    wire, expected = stream
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=12), label="split points")
    frames = run(split_at(wire, points))
    assert [f[1:] for f in frames] == expected
    assert b"".join(f[0] for f in frames) == wire


# ------------------------------------------------- property: arbitrary bytes, any chunking

_TOKENS = [b"\r", b"\n", b"\r\n", b":", b"d", b"a", b"t", b" ", b"x", b"1", b"\xff"]
_TOKENS += [b"data", b"data:", b"data: ", b"event:", b"id:", b"retry:"]
sse_ish = st.lists(
    st.one_of(st.sampled_from(_TOKENS), st.sampled_from([b"\r", b"\n", b":"])), max_size=80
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(stream=sse_ish, data=st.data())
def test_property_any_two_chunkings_agree(stream: bytes, data: st.DataObject) -> None:
    points_a = data.draw(st.lists(st.integers(0, len(stream)), max_size=15), label="chunking A")
    points_b = data.draw(st.lists(st.integers(0, len(stream)), max_size=15), label="chunking B")
    frames_a = run(split_at(stream, points_a))
    frames_b = run(split_at(stream, points_b))
    assert frames_a == frames_b
    assert b"".join(f[0] for f in frames_a) == stream
    assert run([stream]) == frames_a
    assert run(bytewise(stream)) == frames_a


@settings(max_examples=200, deadline=None)
@given(stream=sse_ish, data=st.data())
def test_property_matches_whole_input_reference(stream: bytes, data: st.DataObject) -> None:
    """Frames, fields and `buffered` after every feed match the naive whole-input parser."""
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=15), label="chunking")
    framer = SSEFramer()
    got: list[FrameKey] = []
    fed = 0
    for chunk in split_at(stream, points):
        got.extend(key(f) for f in framer.feed(chunk))
        fed += len(chunk)
        assert framer.buffered == ref_held(stream[:fed])
        # everything emitted so far is exactly the stream minus what is held
        assert b"".join(f[0] for f in got) == stream[: fed - framer.buffered]
    tail = framer.finish()
    if tail is not None:
        got.append(key(tail))
    assert got == ref_frames(stream)


@settings(max_examples=150, deadline=None)
@given(stream=sse_ish, limit=st.integers(1, 40), data=st.data())
def test_property_size_limit(stream: bytes, limit: int, data: st.DataObject) -> None:
    """Frames within the limit never raise; a frame well over it raises when fed bytewise."""
    frames = ref_frames(stream)
    longest = max((len(f[0]) for f in frames), default=0)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=15), label="chunking")
    if longest <= limit:
        assert run(split_at(stream, points), max_frame_bytes=limit) == frames
        return
    framer = SSEFramer(max_frame_bytes=limit)
    chunks = split_at(stream, points)
    for chunk in chunks:
        try:
            framer.feed(chunk)
        except FrameTooLarge:
            break
        assert framer.buffered <= limit + len(chunk)
    if longest > limit + 1:
        # bytewise, such a frame is held incomplete with more than `limit` bytes at some point
        framer = SSEFramer(max_frame_bytes=limit)
        with pytest.raises(FrameTooLarge):
            for b in bytewise(stream):
                framer.feed(b)
                assert framer.buffered <= limit
