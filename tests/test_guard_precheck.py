"""The guards' pre-check (issue 14): a chunk of whole frames whose plain text (found by
byte search) no detector can match or hold is metered by byte counts and never parsed.
It must change nothing: the property test runs the same random streams through the
exchange with the pre-check on and off and compares what the client gets and what the
guards report."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from extproc.config import GuardConfig, GuardPatternConfig
from extproc.exchange import response
from extproc.policy.guards import detectors as det
from extproc.providers import openai_plain
from extproc.providers.openai_chat import OpenAIChat, OpenAIChatStream
from tests.test_exchange import CHAT, metadata
from tests.test_guard_stage import content_frames, guarded, split_anywhere

NO_EMAIL = tuple(d for d in det.expand(["pii", "secrets"]) if d != "email")
RULES = {
    "mask": (GuardConfig(name="pii", detectors=NO_EMAIL),),
    "mask+email+custom": (
        GuardConfig(
            name="pii",
            detectors=tuple(det.expand(["pii", "secrets"])),
            patterns=(GuardPatternConfig(name="employee-id", regex=r"EMP-\d{6}"),),
            keywords=("project falcon",),
        ),
    ),
    "log+mask": (
        GuardConfig(name="watch", action="log", detectors=("email", "ipv4")),
        GuardConfig(name="pii", detectors=("credit_card", "us_ssn", "api_key")),
    ),
    "reject": (GuardConfig(name="no-keys", action="reject", detectors=("api_key",)),),
}
# Detections, near misses and what they are made of, plain words, and the characters
# the byte search must read as the full parse does (escapes, non-ASCII, quotes).
PIECES = [
    "4111 1111 1111 1111", "123-45-6789", "jane.roe@example.org", "+1 (415) 555-2671",
    "DE89 3704 0044 0532 0130 00", "10.20.30.40", "fe80::1", "AKIAIOSFODNN7EXAMPLE",
    "Bearer abcdefghijklmnop0123456789", "sk-proj-abcdefghijklmnopqrstuvwx", "EMP-004217",
    "Project Falcon", "4111", "12", "sk-", "Bearer ", "bearer", "cafe", "be", ":", "@",
    "-----BEGIN", "the", "quick", "brown", "fox", "lantern", "orbit", " ", " ", ", ", ". ",
    "\n", '"quoted"', "back\\slash", "caf\u00e9", "\uff14\uff11", "\u200b", "tab\there",
]  # fmt: skip


@contextmanager
def precheck(on: bool) -> Iterator[None]:
    """The exchange builds its `StreamBody` with the pre-check on (the default) or off."""
    original = response.StreamBody
    if not on:
        response.StreamBody = partial(original, precheck=False)  # type: ignore[misc]
    try:
        yield
    finally:
        response.StreamBody = original  # type: ignore[misc]


def stream(rules: str, chunks: list[bytes], on: bool) -> tuple[bytes, dict, list]:
    """What the client gets, the guards' metadata and their findings' counters."""
    with precheck(on):
        run = guarded(*RULES[rules])
        run.request({**CHAT, "stream": True})
        client = run.respond(chunks)
    md = metadata(run.last)
    kept = {k: md.get(k) for k in ("guard_masked", "guard_logged", "guard_blocked")}
    findings = sorted(
        (tuple(sorted(s.labels.items())), s.value)
        for family in run.metrics.registry.collect()
        if family.name == "ai_gateway_guard_findings"
        for s in family.samples
        if s.name.endswith("_total")
    )
    return client, kept, findings


def frame_aligned(frames: list[bytes], rng: random.Random) -> list[bytes]:
    """Whole frames, several to a chunk at random (the chunks the pre-check takes)."""
    out, at = [], 0
    while at < len(frames):
        take = rng.randint(1, 4)
        out.append(b"".join(frames[at : at + take]))
        at += take
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=14),
    rules=st.sampled_from(sorted(RULES)),
    seed=st.integers(0, 2**32 - 1),
    anywhere=st.booleans(),
)
def test_precheck_masks_exactly_what_the_full_path_masks(pieces, rules, seed, anywhere):
    rng = random.Random(seed)
    text = "".join(pieces)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 10))))
    texts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    frames = content_frames(texts, usage=rng.random() < 0.5)
    chunks = split_anywhere(frames, rng) if anywhere else frame_aligned(frames, rng)
    assert stream(rules, chunks, on=True) == stream(rules, chunks, on=False)


@contextmanager
def parses() -> Iterator[list[int]]:
    """Counts the decoder's JSON parses of a frame (`texts` and `rewrite` go there)."""
    original = OpenAIChatStream._parsed
    count = [0]

    def counted(self, event):
        count[0] += 1
        return original(self, event)

    OpenAIChatStream._parsed = counted  # type: ignore[method-assign]
    try:
        yield count
    finally:
        OpenAIChatStream._parsed = original  # type: ignore[method-assign]


@pytest.mark.parametrize("on", [True, False])
def test_plain_chunks_are_never_parsed_and_go_untouched(on):
    frames = content_frames(["Hello", " there,", " friend", " of", " mine."])
    with parses() as count, precheck(on):
        run = guarded(*RULES["mask"])
        run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert run.respond(frames) == b"".join(frames)
    assert (count[0] == 0) is on  # the same stream, parsed frame by frame without it


def test_a_chunk_that_may_match_takes_the_full_path_and_is_masked():
    frames = content_frames(["Card", " 4111 1111", " 1111 1111", " ok."])
    with parses() as count:
        run = guarded(*RULES["mask"])
        run.request({**CHAT, "stream": True})
        client = run.respond(frames)
    assert b"<CREDIT_CARD>" in client and b"4111" not in client
    assert count[0] > 0


def test_a_custom_pattern_without_a_prefix_closure_turns_the_precheck_off():
    """RE2-only syntax (`\\pL`) gets no viable-prefix regex: the guard then holds its
    width, so no text is quiet for it and every chunk is parsed, as before."""
    rule = GuardConfig(name="ids", patterns=(GuardPatternConfig(name="id", regex=r"ID\pL{3}"),))
    frames = content_frames(["Hello", " there"])
    with parses() as count:
        run = guarded(rule)
        run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert run.respond(frames) == b"".join(frames)
    assert count[0] > 0


HEAD = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":['


def chat_frame(choice: dict) -> bytes:
    return HEAD + orjson.dumps(choice) + b'],"usage":null}\n\n'


def raw_frame(content: bytes) -> bytes:
    """A frame whose content is written as given (escapes orjson would not write)."""
    return HEAD + b'{"index":0,"delta":{"content":"' + content + b'"}}],"usage":null}\n\n'


def text_frame(text: str, index: int = 0) -> bytes:
    return chat_frame({"index": index, "delta": {"content": text}, "finish_reason": None})


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (text_frame(" hello"), " hello"),
        (text_frame(" a") + text_frame(" b") + b"data: [DONE]\n\n", " a b"),
        (text_frame('say "hi"\n\\ / x'), 'say "hi"\n\\ / x'),
        (raw_frame(b"\\u0041\\\\u0041"), "A\\u0041"),  # an escape, an escaped backslash
        (chat_frame({"index": 0, "delta": {"role": "assistant", "content": ""}}), ""),
        (chat_frame({"index": 0, "delta": {}, "finish_reason": "stop"}), ""),
        (text_frame("caf\u00e9"), None),  # the normalised view must see it
        (raw_frame(b"caf\\u00e9"), None),  # non-ASCII by escape
        (text_frame(" hi", index=1), None),  # another channel
        (chat_frame({"index": 0, "delta": {"content": None}}), None),
        (
            chat_frame(
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "x"}}]},
                }
            ),
            None,
        ),
        (chat_frame({"index": 0, "delta": {"reasoning_content": "r", "content": "c"}}), None),
        (chat_frame({"index": 0, "delta": {"reasoning": "r"}}), None),
        (chat_frame({"index": 0, "delta": {"refusal": "no 4111"}}), None),  # guarded too
        (
            chat_frame(
                {"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}}
            ),
            "",
        ),
        (  # the usage frame's "reasoning_tokens" is no text
            text_frame(" a")
            + HEAD
            + b'],"usage":{"completion_tokens_details":{"reasoning_tokens":5}}}\n\n',
            " a",
        ),
        (text_frame(" hello")[:-1], None),  # not whole frames
        # A key spelt with an escape is the same key to every JSON parser (the client's
        # and the full path's), but not to a byte search: never skip such a chunk.
        (text_frame(" a") + HEAD + b'{"index":0,"delta":{"con\\u0074ent":"4111"}}]}\n\n', None),
        (HEAD + b'{"index":0,"delta":{"refus\\u0061l":"4111"}}]}\n\n', None),
        (HEAD + b'{"index":1,"del\\u0074a":{"content":"4111"}}]}\n\n', None),
        (text_frame(" hello").replace(b"\n", b"\r\n"), None),
    ],
)
def test_plain_text_reads_what_the_full_parse_reads_or_says_unsure(chunk, expected):
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    assert decoder.plain_text(chunk) == expected
    if expected is not None:
        events = decoder.feed(chunk)
        assert "".join(d.text for e in events for d in decoder.texts(e)) == expected


def test_plain_text_after_a_split_frame_is_unsure():
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    frame = text_frame(" hello")
    decoder.feed(frame[:10])
    assert decoder.plain_text(frame[10:]) is None


DELTA_KEYS = ["role", "content", "refusal", "reasoning_content", "reasoning", "tool_calls"]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=8).map(lambda t: (0, {"content": t})),  # the remembered shape
            st.tuples(
                st.integers(0, 1),
                st.dictionaries(
                    st.sampled_from(DELTA_KEYS),
                    st.one_of(st.none(), st.text(max_size=6)),
                    max_size=3,
                ),
            ),
        ),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 12),
)
def test_plain_text_is_the_parse_of_choice_0_content_or_unsure(frames, group):
    """Whatever a delta holds, the byte search either gives exactly the texts the full
    parse gives the guards (all of them choice 0's content) or says unsure; over a
    stream in chunks of `group` frames too, where most frames are read by the bytes
    around the last regex-read frame's text."""
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    encoded = []
    for index, delta in frames:
        if "tool_calls" in delta:
            delta = {**delta, "tool_calls": [{"index": 0, "function": {"arguments": "x"}}]}
        encoded.append(chat_frame({"index": index, "delta": delta, "finish_reason": None}))
    for at in range(0, len(encoded), group):
        chunk = b"".join(encoded[at : at + group])
        plain = decoder.plain_text(chunk)
        parser = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
        texts = [d for e in parser.feed(chunk) for d in parser.texts(e)]
        decoder.feed(chunk)
        if plain is not None:
            assert all((d.channel, d.kind) == (0, "content") for d in texts)
            assert plain == "".join(d.text for d in texts)


# Members after the choices: OpenAI's per-frame `"obfuscation"`, the bench's stamp, the
# usage, and what must make a frame unsure (a second `"choices"`, which a parser keeps).
AFTER_MEMBERS = [
    b"", b',"usage":null', b',"obfuscation":"aB3x"', b',"bench_t":1712345678901',
    b',"usage":{"prompt_tokens":3,"completion_tokens_details":{"reasoning_tokens":1}}',
    b',"choices":null', b',"choices":[]', b',"choices" : []', b',"x":"\\u0041"',
    b',"x":[1]', b',"x":"a\nb"', b',"x":"]"',
    # The same members up to a last value that differs (read without the regex), and
    # that value followed by what must not be read so.
    b',"bench_t":1', b',"bench_t":20', b',"obfuscation":"q7"', b',"usage":null,"bench_t":3',
    b',"bench_t":4,"choices":[]', b',"bench_t":5,"choices":null', b',"obfuscation":"a","b":"c"',
    b',"bench_t":"x"}]', b',"x":1,"usage":null', b',"x":1,"usage":2',
]  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(max_size=6), st.sampled_from(AFTER_MEMBERS)), min_size=1, max_size=10
    ),
    st.integers(1, 5),
)
def test_plain_text_reads_frames_whose_members_after_the_choices_differ(frames, group):
    """Frames that differ after the choices as well as in their text (most read by the
    remembered shape, the rest by a small regex): the byte search gives exactly the
    texts the full parse gives, or says unsure, and it is unsure for any frame the
    SDKs would read otherwise (a second `"choices"` hides the first)."""
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    encoded = [
        HEAD + orjson.dumps({"index": 0, "delta": {"content": text}}) + b"]" + after + b"}\n\n"
        for text, after in frames
    ]
    for at in range(0, len(encoded), group):
        chunk = b"".join(encoded[at : at + group])
        plain = decoder.plain_text(chunk)
        decoder.feed(chunk)
        if plain is None:
            continue
        shown = []  # what a client's JSON parser shows: the last `choices` of each frame
        for frame in encoded[at : at + group]:
            choices = orjson.loads(frame[6:]).get("choices") or []
            shown += [c["delta"].get("content") or "" for c in choices if c["index"] == 0]
        assert plain == "".join(shown)
        assert all(b'"choices"' not in f.split(b"]", 1)[1] for f in encoded[at : at + group])


# What a frame may carry that the metering reads: text keys outside the delta, finish
# reasons before, in and after the choices, usage figures (null, an object, twice).
METERED_HEADS = [
    HEAD,
    HEAD.replace(b'"model":"m",', b'"model":"m","refusal":"r","finish_reason":"h",'),
    HEAD.replace(b'"model":"m",', b'"model":"m","usage":7,'),
]
METERED_CHOICE_TAILS = [
    b"",
    b',"logprobs":null,"finish_reason":null',
    b',"finish_reason":"stop"',
    b',"finish_reason":""',
    b',"refusal":"no"',
]
METERED_AFTER = [
    *AFTER_MEMBERS[:6],
    b',"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}',
    b',"usage":null,"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}',
    b',"finish_reason":"late"', b',"content":"top"', b',"refusal":""', b',"usage":nul',
]  # fmt: skip


def metered_state(decoder: OpenAIChatStream) -> tuple:
    return decoder.content_events, decoder.finish_reason, decoder.usage, decoder.done


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(METERED_HEADS),
    st.sampled_from(METERED_CHOICE_TAILS),
    st.lists(
        st.tuples(
            st.sampled_from(["", " a", " word", "4111", 'q"uote']),
            st.sampled_from(METERED_AFTER),
            st.booleans(),
            st.sampled_from([*[None] * 10, *METERED_CHOICE_TAILS]),  # another shape
        ),
        min_size=1,
        max_size=10,
    ),
    st.booleans(),
    st.integers(1, 4),
)
@example(  # a shape with another count learnt after frames read by the first
    HEAD,
    b"",
    [(" a", b"", False, None), (" b", b"", False, None), (" c", b"", False, b',"refusal":"x"')],
    False,
    4,
)
def test_chunks_the_pre_check_read_are_metered_as_without_it(head, tail, frames, hide, group):
    """Frames `plain_text` read by the remembered shape are metered from that shape
    (`feed_whole` skips their byte counts), one to a chunk or `group`: the client gets
    what a decoder that never ran the pre-check sends (the hidden usage frame
    dropped), and the meter reads what it reads, chunk by chunk: text deltas, finish
    reason, usage, the end."""
    checked = OpenAIChat.stream_decoder(hide_usage=hide, max_frame_bytes=1 << 16)
    plain = OpenAIChat.stream_decoder(hide_usage=hide, max_frame_bytes=1 << 16)
    encoded = [chat_frame({"index": 0, "delta": {"role": "assistant", "content": ""}})]
    for text, after, ends, other in frames:
        choice = b'{"index":0,"delta":{"content":' + orjson.dumps(text) + b"}"
        choice += (tail if other is None else other) + b"}"
        encoded.append(head + choice + b"]" + after + b"}\n\n")
        if ends:  # the usage-only frame (hidden where the gateway asked for it), the end
            encoded.append(HEAD + b'],"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n')
            encoded.append(b"data: [DONE]\n\n")
    chunks = [b"".join(encoded[at : at + group]) for at in range(0, len(encoded), group)]
    for chunk in chunks:
        checked.plain_text(chunk)
        got, want = checked.feed_whole(chunk), plain.feed_whole(chunk)
        if got is None:
            got = b"".join(e.out for e in checked.feed(chunk))
        if want is None:
            want = b"".join(e.out for e in plain.feed(chunk))
        assert got == want
        assert metered_state(checked) == metered_state(plain)


def test_a_frame_with_a_second_choices_after_one_of_the_remembered_shape_is_unsure():
    """The second frame begins as the first and ends as it does, with a second
    `"choices"` between (a parser keeps the last): its text is not plain, and the
    reading again by the regex must not remember the first frame's shape and take
    the second by it again (found by tests/test_security_response.py)."""
    choice = b'"choices":[{"index":0,"delta":{"content":"A"}}]'
    chunk = b"data: {" + choice + b"}\n\ndata: {" + choice + b"," + choice + b"}\n\n"
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    assert decoder.plain_text(chunk) is None


def test_a_chunk_of_no_frame_is_unsure_before_and_after_a_frame_s_shape_is_known():
    """Blank lines around a line that is no `data:` frame: the SDKs show nothing of it,
    and the byte search must not read it as a text (before any frame, the remembered
    head is a marker that no frame begins with, but a chunk may)."""
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    assert decoder.plain_text(b"\n\nX\n\n") is None
    assert decoder.plain_text(text_frame(" hello")) == " hello"
    assert decoder.plain_text(b"\n\nX\n\n") is None


def test_a_text_that_breaks_out_of_the_last_frame_s_string_is_read_by_the_regex():
    """The bytes around the last plain frame's text are reused only for a text of plain
    characters: a quote, a backslash or a newline in between could close the string
    and write another member (a second content, which the SDKs show) or another
    frame. Such a chunk is read as a decoder that never saw a frame reads it."""
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    assert decoder.plain_text(text_frame(" hello")) == " hello"
    assert decoder.plain_text(text_frame(" again")) == " again"  # the shape, reused
    head, tail = text_frame("").split(b'"content":""')
    head += b'"content":"'
    tail = b'"' + tail
    cases = {
        b'x","content":"4111 1111 1111 1111': None,  # a second content member
        b'x\\"4111\\"': 'x"4111"',  # escaped quotes stay in the string
        b'x"}}]}\n\ndata: {"choices":[{"index":0,"delta":{"content":"4111': "x4111",
        b"caf\xc3\xa9": None,
    }
    for inside, expected in cases.items():
        chunk = head + inside + tail
        fresh = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
        assert decoder.plain_text(chunk) == fresh.plain_text(chunk) == expected, inside


@pytest.mark.parametrize("last", [b',"bench_t":1712345678901', b',"obfuscation":"aB3x"'])
def test_a_text_that_breaks_out_of_a_stamped_frame_s_string_is_read_by_the_regex(last):
    """The same for frames that end in a member whose value changes every frame (the
    bench's stamp, OpenAI's obfuscation), which the remembered bytes up to that value
    and one search read (`openai_plain._led`): the text it reads ends at the first
    quote and holds no backslash, newline or non-ASCII byte, and the value is plain
    (digits, or letters and digits in quotes), else the chunk is read by the regex."""

    def frame(inside: bytes, value: bytes | None = None) -> bytes:
        body = b'{"index":0,"delta":{"content":"' + inside + b'"}}]' + last
        if value is not None:
            body = body[: body.rindex(b":") + 1] + value
        return HEAD + body + b"}\n\n"

    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    assert decoder.plain_text(frame(b" hello")) == " hello"
    assert decoder.plain_text(frame(b" again", b"42")) == " again"  # the shape, reused
    assert decoder.plain_text(frame(b" more", b'"Zz9"')) == " more"
    cases = {
        frame(b'x","content":"4111 1111 1111 1111'): None,  # a second content member
        frame(b'x\\"4111\\"'): 'x"4111"',  # escaped quotes stay in the string
        frame(b"a\\u0034\\u0031\\\\1"): "a41\\1",  # escapes, read as the parser reads them
        frame(b"caf\xc3\xa9"): None,
        frame(b"a\rb"): None,  # a CR ends the SSE line: the SDKs read no such text
        frame(b" hello")[:-1]: None,  # not a whole frame
        frame(b"x", b'"a\\"'): None,  # the value's quote escaped: the object never ends
        frame(b"x", b'"a b"'): "x",  # not plain: the regex reads it
        # A value that ends the frame early, and a frame after it with a text.
        frame(b"x", b'1}\n\ndata: {"choices":[{"index":0,"delta":{"content":"4111"}}]'): "x4111",
        # A frame without its closing quote, then the remembered bytes as a frame.
        frame(b"x")[: len(HEAD) + 32] + b"\n\n" + frame(b"")[len(HEAD) + 31 :]: None,
    }
    for chunk, expected in cases.items():
        fresh = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
        assert decoder.plain_text(chunk) == fresh.plain_text(chunk) == expected, chunk
        decoder.plain_text(frame(b" reset"))  # the stamped shape again


def test_an_upstream_that_varies_its_members_does_not_grow_the_compiled_leads():
    """Each new set of members after the text is a new lead; at most `_LEDS_MAX` of
    them are compiled per process (a hostile upstream could send a new one in every
    frame), and past that the compares read the frames, alike."""
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    for i in range(openai_plain._LEDS_MAX + 40):
        head = HEAD.replace(b'"created":1', b'"created":%d' % i)  # read by the regex
        member = b',"k%s":' % bytes(97 + int(d) for d in str(i))  # a key of letters
        for n in (1, 22):
            chunk = head + b'{"index":0,"delta":{"content":" w"}}]' + member + b"%d}\n\n" % n
            assert decoder.plain_text(chunk) == " w"
    assert len(openai_plain._LEDS) <= openai_plain._LEDS_MAX


def stamped(text: bytes, stamp: int) -> bytes:
    """A frame as the bench sends it: a stamp after the choices, new in every frame."""
    choice = b'{"index":0,"delta":{"content":"' + text + b'"}}'
    return HEAD + choice + b'],"bench_t":%d}\n\n' % stamp


_EARLY = b'"object":"chat.completion.chunk","created":1,"model":"m",'
_SECOND_CHOICES = b'"choices":[{"index":0,"delta":{"content":"X"}}],'


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"choices":[', b'"choicez":['),  # no choices: the SDKs show nothing
        (b'"index":0', b'"index":1'),  # another channel
        (_EARLY, _SECOND_CHOICES.ljust(len(_EARLY) - 1) + b","),  # a first `"choices"`
        (b'"id":"c"', b'"id":"d"'),  # another id: the same text, still read
    ],
)
def test_a_run_of_frames_is_read_by_the_shape_only_where_each_begins_as_the_head(old, new):
    """Most frames of a chunk are read by the remembered shape (`PlainText._read`): each
    must begin with the remembered head as well as end as the shape does. A frame whose
    bytes from the text on fit the shape but whose head differs, at the same length
    (a key spelt otherwise, another index, a member before the choices), is read as
    a decoder that never saw a frame reads it."""
    assert len(old) == len(new)
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    assert decoder.plain_text(stamped(b" a", 1) + stamped(b" b", 2)) == " a b"
    assert decoder.plain_text(stamped(b" c", 3)) == " c"  # the shape, remembered
    for at in range(4):
        frames = [stamped(b" w%d" % i, 10 + i) for i in range(4)]
        frames[at] = stamped(b" 4111", 20).replace(old, new, 1)
        chunk = b"".join(frames)
        fresh = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
        parser = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
        shown = "".join(d.text for e in parser.feed(chunk) for d in parser.texts(e))
        got = decoder.plain_text(chunk)
        assert got == fresh.plain_text(chunk), (at, got)
        assert got in (None, shown), (at, got, shown)
        decoder.plain_text(stamped(b" reset", 30))


@pytest.mark.parametrize("texts", [[b" a", b"", b"", b" b"], [b"", b"", b""], [b" x", b""]])
def test_empty_texts_read_by_the_shape_are_not_metered_as_text_deltas(texts):
    """A frame of the shape with an empty content is no text delta to the meter: the
    read by the shape counts its empty texts as the full read does."""
    checked = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    plain = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    learn = stamped(b" first", 1) + stamped(b" second", 2)
    chunk = b"".join(stamped(t, 10 + i) for i, t in enumerate(texts))
    for part in (learn, chunk):
        assert checked.plain_text(part) is not None
        got = checked.feed_whole(part)
        want = plain.feed_whole(part)
        assert got is not None and want is not None
        assert got == want == part
        assert metered_state(checked) == metered_state(plain)
    assert checked._plain.shaped == len(texts)  # read by the shape, not the regex


def openai_frame(delta: bytes, stamp: bytes) -> bytes:
    """A frame as OpenAI writes it: logprobs and finish reason, then its obfuscation."""
    choice = b'{"index":0,"delta":{' + delta + b'},"logprobs":null,"finish_reason":null}'
    return HEAD + choice + b'],"usage":null,"obfuscation":"' + stamp + b'"}\n\n'


@pytest.mark.parametrize("refusal", [b',"refusal":null', b""])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("every", [False, True])
def test_content_frames_after_a_role_frame_are_read_by_its_shape_without_the_role(
    refusal, group, every
):
    """OpenAI's first frame carries the role (and `"refusal":null`), the ones after it
    neither: the shape learnt from the role frame, without them, reads the first
    content frame too (no frame regex for it), with the texts and the metering of a
    decoder that never ran the pre-check. A stream whose every frame carries the role
    (`every`) learns that shape from its second frame and is read alike."""
    role = b'"role":"assistant",'
    frames = [openai_frame(role + b'"content":""' + refusal, b"Ab1")]
    for i, text in enumerate([" one", " two", " 4111", " three", " four", " five"]):
        delta = (role if every else b"") + b'"content":' + orjson.dumps(text)
        frames.append(openai_frame(delta + (refusal if every else b""), b"x%d" % i))
    checked = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    plain = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    parser = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    chunks = [b"".join(frames[at : at + group]) for at in range(0, len(frames), group)]
    for n, chunk in enumerate(chunks):
        shown = "".join(d.text for e in parser.feed(chunk) for d in parser.texts(e))
        assert checked.plain_text(chunk) == shown
        read = checked._plain
        by_shape = read.shaped if read.read_chunk is chunk else 0
        first = 2 if every else 1  # the first frame read by the shape
        in_chunk = range(n * group, min(len(frames), (n + 1) * group))
        assert by_shape == sum(at >= first for at in in_chunk)
        assert checked.feed_whole(chunk) == plain.feed_whole(chunk) == chunk
        assert metered_state(checked) == metered_state(plain)
