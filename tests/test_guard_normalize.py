"""Guard evasions: a card or an email in other Unicode forms (full-width or other
scripts' digits, zero-width characters, NBSPs, other dashes, dots or slashes), split
across request parts or messages or stream chunks, or put in a field other than the
message content, is masked (or refused) like the plain one, and nothing else changes."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import GuardConfig, GuardsConfig
from extproc.policy.guards import detectors as det
from extproc.policy.guards.engine import Findings, GuardSet, scan_texts
from extproc.policy.guards.normalize import fold, normalize
from extproc.policy.guards.scanner import RunningText, find_hits
from extproc.providers.anthropic import AnthropicMessages as Anthropic
from extproc.providers.bedrock import BedrockConverse as Bedrock
from extproc.providers.gemini import Gemini
from extproc.providers.openai_chat import OpenAIChat
from extproc.providers.openai_responses import OpenAIResponses
from tests.test_guard_stream import DONE, SET, masker, other_event, text_event, text_of

CARDS = ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117"]
EMAIL = ("jane.roe", "example.org")

DIGIT_FORMS = [
    lambda d: d,
    lambda d: chr(0xFF10 + int(d)),  # full-width
    lambda d: chr(0x0660 + int(d)),  # Arabic-Indic
    lambda d: chr(0x0966 + int(d)),  # Devanagari
    lambda d: chr(0x1D7CE + int(d)),  # mathematical bold
    lambda d: chr(0x2080 + int(d)),  # subscript
]
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e", "\u2066"]
SEPARATORS = {
    "": [""],
    " ": [" ", "\u00a0", "\u202f", "\u2007", "\u2009", "\u3000"],
    "-": ["-", "\u2010", "\u2011", "\u2013", "\u2212", "\uff0d"],
    ".": [".", "\uff0e", "\u3002"],
    "/": ["/", "\uff0f"],
}
AT_FORMS = ["@", "\uff20", "\ufe6b"]
DOT_FORMS = [".", "\uff0e", "\u3002"]
# Filler that is never (part of) a detection, ASCII and not.
WORDS = [
    "the",
    "quick",
    "café",
    "nai\u0308ve",
    "日本語",
    "Grüße",
    "\uff46\uff55\uff4c\uff4c",
    "wide",
    "fox",
]
GAPS = [", ", "; ", " and ", "\n", ". ", "\u3001"]

PLAN = SET.plan("request", "r", "")
REJECT = GuardSet(
    GuardsConfig(rules=(GuardConfig(name="no-pii", action="reject", detectors=("pii",)),))
).plan("request", "r", "")


def _invisible(draw) -> str:
    return "".join(draw(st.lists(st.sampled_from(INVISIBLE), max_size=2)))


@st.composite
def evasive_card(draw) -> str:
    digits = draw(st.sampled_from(CARDS))
    groups = [4, 6, 5] if len(digits) == 15 else [4, 4, 4, 4]
    kind = draw(st.sampled_from(sorted(SEPARATORS)))
    if kind in "./" and kind:
        groups = [4, 4, 4, 4] if len(digits) == 16 else groups
    out = []
    at = 0
    for g, size in enumerate(groups):
        if g:
            out.append(draw(st.sampled_from(SEPARATORS[kind])))
        for i in range(size):
            if i:
                out.append(_invisible(draw))
            out.append(draw(st.sampled_from(DIGIT_FORMS))(digits[at]))
            at += 1
    return "".join(out)


def _wide(ch: str) -> str:
    return chr(ord(ch) - 0x21 + 0xFF01) if "!" <= ch <= "~" else ch


@st.composite
def evasive_email(draw) -> str:
    local, domain = EMAIL
    out = []
    for i, ch in enumerate(local + "@" + domain):
        if i:
            out.append(_invisible(draw))
        if ch == "@":
            out.append(draw(st.sampled_from(AT_FORMS)))
        elif ch == ".":
            out.append(draw(st.sampled_from(DOT_FORMS)) if i > len(local) else ch)
        else:
            out.append(_wide(ch) if draw(st.booleans()) else ch)
    return "".join(out)


@st.composite
def planted(draw):
    """(text, expected masked text, planted spans): evasive cards and emails between
    filler words."""
    text = expected = ""
    spans = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.booleans()):
            if draw(st.booleans()):
                plant, token = draw(evasive_card()), "<CREDIT_CARD>"
            else:
                plant, token = draw(evasive_email()), "<EMAIL>"
            spans.append((len(text), len(text) + len(plant)))
            text += plant
            expected += token
        else:
            words = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3)))
            text += words
            expected += words
        gap = draw(st.sampled_from(GAPS))
        text += gap
        expected += gap
    return text, expected, spans


def _cuts(draw, n: int, most: int = 12) -> list[int]:
    points = draw(st.lists(st.integers(1, max(1, n - 1)), max_size=most, unique=True))
    return sorted(p for p in points if 0 < p < n)


SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the view ------------------------------------------------------------------------


def test_view_folds_forms_and_drops_invisibles():
    assert fold("\uff14\uff11\u200b\u0661\u0967") == "4111"
    assert fold("a\u00a0b\u202fc\u3000d") == "a b c d"
    assert fold("x\u2212y\u2011z") == "x-y-z"
    assert fold("jane\uff20example\uff0eorg") == "jane@example.org"
    assert fold("4\u00ad1\ufeff1\u20601") == "4111"
    assert fold("日本語 café") == "日本語 café"


def test_ascii_is_its_own_view():
    text = "plain ascii 4111 1111 1111 1111"
    view, starts = normalize(text)
    assert view is text and starts is None


def test_hit_maps_back_to_the_original_span():
    text = "pay \uff14\u200b111 1111\u00a01111 1111 now"
    (hit,) = find_hits(PLAN.mask.scanner, text)
    assert text[hit.start : hit.end] == "\uff14\u200b111 1111\u00a01111 1111"


@pytest.mark.parametrize(
    "text",
    [
        "4111.1111.1111.1111",
        "4111/1111/1111/1111",
        "3782.822463.10005",
    ],
)
def test_cards_with_dots_or_slashes_are_masked(text):
    assert scan_texts(PLAN, [f"card {text} ok"], Findings()) == ["card <CREDIT_CARD> ok"]


@pytest.mark.parametrize(
    "text",
    ["10.20.30.40", "version 1.2.3.4", "pi 3.14159265358979", "2024/01/15", "4111.1111-1111.1111"],
)
def test_dotted_numbers_that_are_not_cards_stay(text):
    findings = Findings()
    out = scan_texts(PLAN, [text], findings)
    assert "<CREDIT_CARD>" not in out[0]
    assert not any(kind == "CREDIT_CARD" for _, kind in findings.masked)


# -- whole texts (requests, JSON answers) --------------------------------------------


@SETTINGS
@given(sample=planted())
def test_evasive_plants_are_masked_and_the_rest_unchanged(sample):
    text, expected, _ = sample
    assert scan_texts(PLAN, [text], Findings()) == [expected]


@SETTINGS
@given(sample=planted(), data=st.data())
def test_plants_split_across_parts_are_masked(sample, data):
    """The text cut into parts anywhere (content parts, messages): the token lands in
    the part where the match starts, the rest of the match leaves the later parts,
    and a part no plant touches is unchanged."""
    text, expected, spans = sample
    bounds = [0, *_cuts(data.draw, len(text), 4), len(text)]
    parts = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out = scan_texts(PLAN, parts, Findings())
    assert len(out) == len(parts)
    assert "".join(out) == expected
    for (a, b), part, got in zip(itertools.pairwise(bounds), parts, out, strict=True):
        if not any(s < b and a < e for s, e in spans):
            assert got == part


@SETTINGS
@given(card=evasive_card(), data=st.data())
def test_reject_guard_refuses_a_split_evasive_card(card, data):
    text = f"here: {card}, thanks"
    cut = data.draw(st.integers(7, len(text) - 9))
    findings = Findings()
    scan_texts(REJECT, ["hello", text[:cut], text[cut:]], findings)
    assert findings.rejected is not None and findings.rejected.type == "CREDIT_CARD"


def test_no_false_match_across_unrelated_parts():
    """Joined scanning adds matches only across a boundary: parts that are fine on
    their own and together stay as they are, counts included."""
    parts = ["order 12", "345 shipped", "mail jane", " later"]
    findings = Findings()
    assert scan_texts(PLAN, parts, findings) == parts
    assert not findings.masked


def test_card_next_to_digits_of_the_previous_part_is_still_masked():
    """The joined text reads `124111...` (no card), each part alone still has one."""
    parts = ["ref 12", "4111111111111111"]
    assert scan_texts(PLAN, parts, Findings()) == ["ref 12", "<CREDIT_CARD>"]


# -- streams -------------------------------------------------------------------------


@SETTINGS
@given(sample=planted(), data=st.data())
def test_running_text_finds_what_the_whole_view_finds(sample, data):
    text, _, _ = sample
    scanner = SET.plan("response", "r", "").mask.scanner
    whole = [(h.start, h.end, h.index) for h in find_hits(scanner, text)]
    running = RunningText([scanner])
    got = []
    at = 0
    for cut in [*_cuts(data.draw, len(text)), len(text)]:
        got += [(h.start, h.end, h.index) for h in running.feed(text[at:cut])[0]]
        at = cut
    got += [(h.start, h.end, h.index) for h in running.feed("", final=True)[0]]
    assert got == whole


@SETTINGS
@given(sample=planted(), data=st.data())
def test_streamed_evasions_are_masked_whatever_the_chunking(sample, data):
    text, expected, spans = sample
    bounds = [0, *_cuts(data.draw, len(text)), len(text)]
    events = [other_event(b"role")]
    events += [text_event(0, text[a:b]) for a, b in itertools.pairwise(bounds)]
    events.append(DONE)
    m = masker()
    out = []
    for i, event in enumerate(events):
        out += m.process([event], end=i == len(events) - 1)
    assert [e.raw for e in out] == [e.raw for e in events]
    assert "".join(text_of(e) for e in out if e.is_content) == expected
    content = [e for e in out if e.is_content]
    for event, (a, b) in zip(content, itertools.pairwise(bounds), strict=True):
        if not any(s < b and a < e for s, e in spans):
            assert event.out is event.raw


def test_zero_width_and_full_width_digit_in_later_chunks_are_held_then_masked():
    m = masker()
    assert m.process([text_event(0, "card 4111 1111 1111 111")], end=False) == []
    assert m.process([text_event(0, "\u200b")], end=False) == []  # still undecided
    out = m.process([text_event(0, "\uff11 ok."), DONE], end=True)
    assert [text_of(e) for e in out if e.is_content] == ["card <CREDIT_CARD>", "", " ok."]


def test_running_text_goes_back_to_offset_for_offset_after_unicode():
    """One non-ASCII chunk makes the running text keep an offset map; once it has
    scrolled out of what is kept, the map is dropped (no per-chunk cost that grows)."""
    scanner = PLAN.mask.scanner
    running = RunningText([scanner])
    running.feed("x\u200by ")
    assert running.starts is not None
    for _ in range(50):
        running.feed("plain words go by, ")
    assert running.starts is None
    hits = running.feed("4111 1111 1111 1111, ", final=True)[0]
    (hit,) = [h for h in hits if h.index == 0]
    assert hit.end - hit.start == len("4111 1111 1111 1111")
    assert hit.end == running.end - 2


# -- every field a provider reads as text --------------------------------------------

CARD = "4111 1111 1111 1111"
WIDE = "".join(chr(0xFF10 + int(c)) if c.isdigit() else c for c in CARD)
B64 = "data:image/png;base64,iVBORw0KGgo4111111111111111AAAA"


def _masked(wire, body: dict, path: str = "") -> dict:
    info = wire.parse_request(orjson.dumps(body), path)
    masked = scan_texts(PLAN, info.prompt_texts, Findings())
    return orjson.loads(wire.replace_request_texts(info, masked))


def _schema(text: str) -> dict:
    return {
        "type": "object",
        "properties": {"n": {"type": "string", "description": f"like {text}"}},
    }


def test_openai_chat_fields():
    body = {
        "model": "m",
        "user": WIDE,
        "messages": [
            {"role": "user", "name": f"n{WIDE}", "content": [
                {"type": "text", "text": "card 4111 1111"},
                {"type": "text", "text": " 1111 1111 ok"},
                {"type": "image_url", "image_url": {"url": f"https://x/?c={CARD}"}},
                {"type": "image_url", "image_url": {"url": B64}},
            ]},
            {"role": "assistant", "content": None, "refusal": f"no {WIDE}",
             "tool_calls": [{"id": "c", "type": "function",
                             "function": {"name": "f", "arguments": f'{{"c":"{WIDE}"}}'}}]},
        ],
        "tools": [{"type": "function", "function": {
            "name": "f", "description": f"d {CARD}", "parameters": _schema(WIDE)}}],
    }  # fmt: skip
    sent = _masked(OpenAIChat, body)
    assert sent["user"] == "<CREDIT_CARD>"
    user, assistant = sent["messages"]
    assert user["name"] == "n<CREDIT_CARD>"
    assert [p.get("text") for p in user["content"][:2]] == ["card <CREDIT_CARD>", " ok"]
    assert user["content"][2]["image_url"]["url"] == "https://x/?c=<CREDIT_CARD>"
    assert user["content"][3]["image_url"]["url"] == B64  # base64: not scanned, intact
    assert assistant["refusal"] == "no <CREDIT_CARD>"
    assert assistant["tool_calls"][0]["function"]["arguments"] == '{"c":"<CREDIT_CARD>"}'
    function = sent["tools"][0]["function"]
    assert function["description"] == "d <CREDIT_CARD>"
    assert function["parameters"]["properties"]["n"]["description"] == "like <CREDIT_CARD>"


def test_openai_responses_fields():
    body = {
        "model": "m",
        "user": WIDE,
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": f"a {WIDE}"},
            {"type": "input_image", "image_url": f"https://x/{CARD}.png"},
        ]}],
        "tools": [{"type": "function", "name": "f", "description": f"d {WIDE}",
                   "parameters": _schema(CARD)}],
    }  # fmt: skip
    sent = _masked(OpenAIResponses, body)
    assert sent["user"] == "<CREDIT_CARD>"
    parts = sent["input"][0]["content"]
    assert parts[0]["text"] == "a <CREDIT_CARD>"
    assert parts[1]["image_url"] == "https://x/<CREDIT_CARD>.png"
    assert sent["tools"][0]["description"] == "d <CREDIT_CARD>"
    assert sent["tools"][0]["parameters"]["properties"]["n"]["description"] == "like <CREDIT_CARD>"


def test_anthropic_fields():
    body = {
        "model": "m",
        "max_tokens": 10,
        "system": f"s {WIDE}",
        "metadata": {"user_id": WIDE},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": f"t {WIDE}"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t", "name": "f", "input": {"c": WIDE}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": f"r {WIDE}"},
                {"type": "image", "source": {"type": "url", "url": f"https://x/{CARD}"}},
            ]},
        ],
        "tools": [{"name": "f", "description": f"d {WIDE}", "input_schema": _schema(WIDE)}],
    }  # fmt: skip
    sent = _masked(Anthropic, body)
    assert sent["system"] == "s <CREDIT_CARD>"
    assert sent["metadata"]["user_id"] == "<CREDIT_CARD>"
    assert sent["messages"][0]["content"][0]["text"] == "t <CREDIT_CARD>"
    assert sent["messages"][1]["content"][0]["input"] == {"c": "<CREDIT_CARD>"}
    assert sent["messages"][2]["content"][0]["content"] == "r <CREDIT_CARD>"
    assert sent["messages"][2]["content"][1]["source"]["url"] == "https://x/<CREDIT_CARD>"
    tool = sent["tools"][0]
    assert tool["description"] == "d <CREDIT_CARD>"
    assert tool["input_schema"]["properties"]["n"]["description"] == "like <CREDIT_CARD>"


def test_gemini_fields():
    body = {
        "systemInstruction": {"parts": [{"text": f"s {WIDE}"}]},
        "contents": [{"role": "user", "parts": [{"text": "c 4111 1111"}, {"text": " 1111 1111"}]}],
        "tools": [{"functionDeclarations": [
            {"name": "f", "description": f"d {WIDE}", "parameters": _schema(WIDE)}]}],
    }  # fmt: skip
    sent = _masked(Gemini, body, "/v1beta/models/gemini-2.0-flash:generateContent")
    assert sent["systemInstruction"]["parts"][0]["text"] == "s <CREDIT_CARD>"
    assert [p["text"] for p in sent["contents"][0]["parts"]] == ["c <CREDIT_CARD>", ""]
    declaration = sent["tools"][0]["functionDeclarations"][0]
    assert declaration["description"] == "d <CREDIT_CARD>"
    assert declaration["parameters"]["properties"]["n"]["description"] == "like <CREDIT_CARD>"


def test_bedrock_fields():
    body = {
        "system": [{"text": f"s {WIDE}"}, {"guardContent": {"text": {"text": f"g {WIDE}"}}}],
        "messages": [{"role": "user", "content": [{"text": f"t {WIDE}"}]}],
        "toolConfig": {"tools": [{"toolSpec": {
            "name": "f", "description": f"d {WIDE}", "inputSchema": {"json": _schema(WIDE)}}}]},
    }  # fmt: skip
    sent = _masked(Bedrock, body, "/model/anthropic.claude-3-haiku/converse")
    assert sent["system"][0]["text"] == "s <CREDIT_CARD>"
    assert sent["system"][1]["guardContent"]["text"]["text"] == "g <CREDIT_CARD>"
    assert sent["messages"][0]["content"][0]["text"] == "t <CREDIT_CARD>"
    spec = sent["toolConfig"]["tools"][0]["toolSpec"]
    assert spec["description"] == "d <CREDIT_CARD>"
    assert spec["inputSchema"]["json"]["properties"]["n"]["description"] == "like <CREDIT_CARD>"


def test_detectors_module_is_not_asked_for_unicode():
    """The detectors read ASCII: what makes the difference is the view."""
    scanner = PLAN.mask.scanner
    assert scanner.find_all(WIDE) == []
    assert [h.index for h in find_hits(scanner, WIDE)] != []
    assert det.builtin("credit_card") in scanner.detectors


def test_match_running_on_into_the_next_part_is_masked_whole():
    """Parts join as a stream's chunks do: an address cut inside its domain is one
    address, so its tail in the next part goes too (fail safe)."""
    assert scan_texts(PLAN, ["mail jane@example.co", "m today"], Findings()) == [
        "mail <EMAIL>",
        " today",
    ]
