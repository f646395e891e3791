"""The stream masker: whatever the chunking, every planted detection is masked and
nothing else changes; frames keep their number and order, untouched ones their bytes;
a reject guard ends the stream before the offending text leaves."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import GuardConfig, GuardsConfig
from extproc.policy import StreamBlocked
from extproc.policy.guards import detectors as det
from extproc.policy.guards.engine import Entry, GuardSet
from extproc.policy.guards.scanner import RunningText, Scanner
from extproc.policy.guards.stream import GuardStream
from extproc.providers.base import StreamEvent, TextDelta

# (planted text, what the client must see instead), all valid detections.
PLANTS = [
    ("4111 1111 1111 1111", "<CREDIT_CARD>"),
    ("5555-5555-5555-4444", "<CREDIT_CARD>"),
    ("123-45-6789", "<US_SSN>"),
    ("jane.roe@example.org", "<EMAIL>"),
    ("+1 (415) 555-2671", "<PHONE>"),
    ("020 7946 0958", "<PHONE>"),
    ("DE89 3704 0044 0532 0130 00", "<IBAN>"),
    ("10.20.30.40", "<IP_ADDRESS>"),
    ("2001:db8::ff00:42:8329", "<IP_ADDRESS>"),
    ("AKIAIOSFODNN7EXAMPLE", "<AWS_ACCESS_KEY>"),
    ("Bearer abcdefghijklmnop0123456789", "Bearer <BEARER_TOKEN>"),
    ("sk-proj-abcdefghijklmnopqrstuvwx", "<API_KEY>"),
    (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
        "<PRIVATE_KEY>",
    ),
    ("EMP-004217", "<EMPLOYEE_ID>"),
    ("Project Falcon", "<KEYWORD>"),
]
# Filler that can never be (part of) a detection: lower-case words, spaces, commas.
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then"]

GUARDS = GuardsConfig(
    rules=(
        GuardConfig(
            name="pii",
            detectors=tuple(det.expand(["pii", "secrets"])),
            patterns=(),
            keywords=("project falcon",),
        ),
    )
)


def _guards_with_pattern() -> GuardSet:
    from extproc.config import GuardPatternConfig

    rules = (
        GuardConfig(
            name="pii",
            detectors=tuple(det.expand(["pii", "secrets"])),
            patterns=(GuardPatternConfig(name="employee_id", regex=r"EMP-\d{6}"),),
            keywords=("project falcon",),
        ),
    )
    return GuardSet(GuardsConfig(rules=rules))


SET = _guards_with_pattern()


class FakeDecoder:
    """A minimal wire format: `data: {"c": channel, "t": text}` frames."""

    def texts(self, event: StreamEvent) -> list[TextDelta]:
        obj = orjson.loads(event.data)
        return [TextDelta(obj["c"], obj["t"])]

    def rewrite(self, event: StreamEvent, texts: list[str]) -> bytes:
        obj = orjson.loads(event.data)
        obj["t"] = texts[0]
        return b"data: " + orjson.dumps(obj) + b"\n\n"


def text_event(channel: int, text: str) -> StreamEvent:
    data = orjson.dumps({"c": channel, "t": text})
    raw = b"data: " + data + b"\n\n"
    return StreamEvent(raw, raw, data, is_content=bool(text))


def other_event(name: bytes) -> StreamEvent:
    raw = b'data: {"other":"' + name + b'"}\n\n'
    return StreamEvent(raw, raw, raw[6:-2])


DONE = StreamEvent(b"data: [DONE]\n\n", b"data: [DONE]\n\n", b"[DONE]", is_done=True)


def text_of(event: StreamEvent) -> str:
    return orjson.loads(event.out[6:-2])["t"]


def masker(report=None) -> GuardStream:
    plan = SET.plan("response", "r", "")
    return GuardStream(plan, FakeDecoder(), report or (lambda action, entry, repeat: None))


@st.composite
def planted_texts(draw):
    """(text, expected masked text, planted spans) with detections between words."""
    parts: list[tuple[str, str, bool]] = []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            plant, token = draw(st.sampled_from(PLANTS))
            parts.append((plant, token, True))
        else:
            words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4))
            parts.append((" ".join(words), " ".join(words), False))
        # Numbers separated by a bare space run into each other ("4111 1111 1111 1111
        # 4111..." is one long number to any reader): separate with words or punctuation.
        parts.append((draw(st.sampled_from([", ", "; ", " and ", "\n", ". "])), "", False))
    text = expected = ""
    spans = []
    for plain, masked, is_plant in parts:
        if is_plant:
            spans.append((len(text), len(text) + len(plain)))
        expected += masked if is_plant else plain
        text += plain
    assert len(expected) > 0
    return text, expected, spans


def cuts(draw, n: int) -> list[int]:
    points = draw(st.lists(st.integers(1, max(1, n - 1)), max_size=12, unique=True))
    return sorted(p for p in points if 0 < p < n)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=planted_texts(), data=st.data())
def test_text_split_anywhere_scans_like_whole(sample, data):
    text, _, _ = sample
    scanner = SET.plan("response", "r", "").mask.scanner
    whole = [(h.start, h.end, h.index) for h in scanner.find_all(text)]
    running = RunningText([scanner])
    got = []
    at = 0
    for cut in [*cuts(data.draw, len(text)), len(text)]:
        got += [(h.start, h.end, h.index) for h in running.feed(text[at:cut])[0]]
        at = cut
    got += [(h.start, h.end, h.index) for h in running.feed("", final=True)[0]]
    assert got == whole


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=st.lists(planted_texts(), min_size=1, max_size=2), data=st.data())
def test_planted_detections_masked_and_nothing_else_changes(samples, data):
    """Random texts (one or two channels, interleaved), random frame splits, random
    batches of frames per call: every detection masked, every other byte kept."""
    frames: list[tuple[int, int, int]] = []  # (channel, start, end)
    for channel, (text, _, _) in enumerate(samples):
        bounds = [0, *cuts(data.draw, len(text)), len(text)]
        frames += [(channel, a, b) for a, b in itertools.pairwise(bounds)]
    order = data.draw(st.permutations(range(len(frames))))
    # Keep each channel's frames in order, interleave channels at random.
    by_channel = {c: [f for f in frames if f[0] == c] for c in range(len(samples))}
    sequence = []
    for i in order:
        sequence.append(by_channel[frames[i][0]].pop(0))
    events = [other_event(b"role")]
    for channel, a, b in sequence:
        events.append(text_event(channel, samples[channel][0][a:b]))
    events += [other_event(b"finish"), DONE]
    # Random batches, as chunks of an HTTP body coalesce frames.
    batches, at = [], 0
    while at < len(events):
        size = data.draw(st.integers(1, 4))
        batches.append(events[at : at + size])
        at += size
    m = masker()
    out = []
    for i, batch in enumerate(batches):
        out += m.process(batch, end=i == len(batches) - 1)
    # Same frames, same order.
    assert [e.raw for e in out] == [e.raw for e in events]
    # Each channel's text is the expected masked text.
    for channel, (_, expected, _spans) in enumerate(samples):
        got = "".join(
            text_of(e) for e in out if e.is_content and orjson.loads(e.data)["c"] == channel
        )
        assert got == expected
    # A frame that carries no planted text goes out byte for byte.
    for event, (channel, a, b) in zip([e for e in out if e.is_content], sequence, strict=True):
        spans = samples[channel][2]
        if not any(s < b and a < e for s, e in spans):
            assert event.out is event.raw


def test_card_split_across_frames_is_held_then_masked_in_the_first():
    m = masker()
    assert m.process([text_event(0, "Card: 4111 1111")], end=False) == []
    assert m.held == 1
    out = m.process([text_event(0, " 1111 1111"), text_event(0, " ok")], end=False)
    assert [text_of(e) for e in out] == ["Card: <CREDIT_CARD>", ""]
    assert m.held == 1  # " ok" could still grow into an email local part
    out = m.process([DONE], end=True)
    assert [e.out for e in out] == [text_event(0, " ok").raw, DONE.raw]


def test_untouched_stream_is_returned_as_is():
    m = masker()
    events = [other_event(b"role"), text_event(0, "hello, "), text_event(0, "world. ")]
    assert m.process(events, end=False) is events


def test_reject_blocks_before_the_text_leaves():
    rules = (
        GuardConfig(name="pii", detectors=("email",)),
        GuardConfig(name="no-keys", action="reject", detectors=("api_key",)),
    )
    plan = GuardSet(GuardsConfig(rules=rules)).plan("response", "r", "")
    seen: list[tuple[str, str]] = []

    def report(action: str, entry: Entry, repeat: bool) -> None:
        seen.append((action, entry.guard.name))
        if action == "reject":
            raise StreamBlocked("blocked", "guard_blocked")

    m = GuardStream(plan, FakeDecoder(), report)
    out = m.process([text_event(0, "first, "), text_event(0, "key: sk-proj-abcdefghij")], False)
    assert [text_of(e) for e in out] == ["first, "]  # the key's frame waits
    with pytest.raises(StreamBlocked):
        m.process([text_event(0, "klmnopqrstuv0123 done")], end=False)
    assert seen == [("reject", "no-keys")]


def test_whole_text_event_is_masked_alone():
    """A closing event that repeats the whole text (Responses' `.done`) is scanned on
    its own and not appended to the running text."""

    class Repeating(FakeDecoder):
        def texts(self, event):
            obj = orjson.loads(event.data)
            return [TextDelta(obj["c"], obj["t"], final=obj.get("final", False))]

    m = GuardStream(SET.plan("response", "r", ""), Repeating(), lambda a, e, r: None)
    data = orjson.dumps({"c": 0, "t": "mail a@example.com", "final": True})
    event = StreamEvent(b"data: " + data + b"\n\n", b"data: " + data + b"\n\n", data, True)
    (out,) = m.process([event], end=False)
    assert text_of(out) == "mail <EMAIL>"


def test_scanner_holds_only_the_viable_tail():
    scanner = Scanner([det.builtin("credit_card")], 16384)
    hits, release = scanner.scan("pay 4111 1111", 0, final=False)
    assert hits == [] and release == len("pay ")
    hits, release = scanner.scan("pay 4111 1111 1111 1111 now", 0, final=False)
    assert len(hits) == 1 and release == len("pay 4111 1111 1111 1111 now")


def test_max_holdback_bounds_what_is_kept():
    scanner = Scanner([det.custom("ANY", r"\w+\.")], 64)
    running = RunningText([scanner])
    for _ in range(100):
        running.feed("abcdefghij")
    assert running.end - running.positions[0] <= 64
    assert len(running.text) <= 64 + det.CONTEXT_CHARS + 10


def test_other_wire_formats_mask_alike():
    """The masker only speaks the neutral decoder interface: Anthropic's events too."""
    from extproc.providers import format_for

    decoder = format_for("anthropic").stream_decoder(hide_usage=False, max_frame_bytes=1 << 20)

    def event(name: str, obj: dict) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

    def delta(text: str) -> bytes:
        body = {"type": "text_delta", "text": text}
        return event(
            "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": body}
        )

    start = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    wire = [event("content_block_start", start)]
    wire += [delta(t) for t in ["Card", " 4111 1111", " 1111 1111", " ok."]]
    wire.append(event("message_stop", {"type": "message_stop"}))
    m = GuardStream(SET.plan("response", "r", ""), decoder, lambda a, e, r: None)
    out = b""
    for i, chunk in enumerate(wire):
        out += b"".join(e.out for e in m.process(decoder.feed(chunk), end=i == len(wire) - 1))
    texts = [
        orjson.loads(line[6:])["delta"]["text"]
        for line in out.split(b"\n")
        if line.startswith(b"data: ") and b"text_delta" in line
    ]
    assert texts == ["Card", " <CREDIT_CARD>", "", " ok."]
    assert out.count(b"event: ") == len(wire)
