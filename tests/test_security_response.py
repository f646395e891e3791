"""The response phase against a provider that sends what it likes (the fifth review,
docs/security.md): a fast path must answer what the full parse answers, and the
gateway must read what the client's SDK reads. Each attack here got through before
its fix (the last Anthropic test guards the hot path's cost instead)."""

from __future__ import annotations

import json
import random

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import GuardConfig
from extproc.providers import anthropic as anthropic_format
from extproc.providers._json import MAX_FIGURE, figure
from extproc.providers.anthropic import AnthropicMessages
from extproc.providers.bedrock import _usage_from as bedrock_usage
from extproc.providers.gemini import _usage_from as gemini_usage
from extproc.providers.openai_chat import OpenAIChat, usage_from
from extproc.providers.openai_responses import OpenAIResponses
from tests.test_exchange import CHAT, Run, metadata
from tests.test_guard_precheck import HEAD, precheck
from tests.test_guard_stage import guarded
from tests.test_providers_anthropic import ARGS, sdk_client
from tests.test_providers_openai_chat import sdk_stream
from tests.test_providers_openai_responses import sdk_events

CARDS = GuardConfig(name="pii", detectors=("credit_card",))
PII = GuardConfig(name="pii", detectors=("pii", "secrets"))
SECRETS = GuardConfig(name="secrets", detectors=("secrets",))
CARD = b"4111 1111 1111 1111"


def frame(choice: bytes, tail: bytes = b',"usage":null') -> bytes:
    return HEAD + choice + b"]" + tail + b"}\n\n"


def content(text: bytes, after: bytes = b"") -> bytes:
    return frame(b'{"index":0,"delta":{"content":"' + text + b'"}' + after + b"}")


ROLE = frame(b'{"index":0,"delta":{"role":"assistant","content":""}}')
END = frame(b'{"index":0,"delta":{},"finish_reason":"stop"}') + b"data: [DONE]\n\n"


def client_text(body: bytes) -> str:
    """Choice 0's content as the OpenAI SDK accumulates it (by `index`)."""
    text = ""
    for chunk in sdk_stream(body):
        for choice in chunk.choices or []:
            if choice.index == 0 and choice.delta.content:
                text += choice.delta.content
    return text


def guarded_stream(rule: GuardConfig, chunks: list[bytes], on: bool = True) -> tuple[bytes, dict]:
    with precheck(on):
        run = guarded(rule)
        run.request({**CHAT, "stream": True})
        client = run.respond(chunks)
    return client, metadata(run.last)


# -- the guards' pre-check: hidden text must not split a match ---------------------------

# Each hides " ok!" from the SDKs (JSON parsers keep the last of repeated keys; a
# choice nested elsewhere is none), though the byte search once read it as content.
HIDDEN = {
    "index repeated": content(b" ok!", b',"index":1'),
    "delta repeated": content(b" ok!", b',"delta":{}'),
    "choices repeated": HEAD + b'{"index":0,"delta":{"content":" ok!"}}],"choices":[]}\n\n',
    "choices nested": b'data: {"id":"c","x":{"choices":[{"index":0,"delta":{"content":" ok!"}}]}'
    b',"choices":[]}\n\n',
}


@pytest.mark.parametrize("name", sorted(HIDDEN))
@pytest.mark.parametrize(
    ("rule", "head", "rest"),
    [
        (CARDS, b"4111 1111 1111", b" 1111"),
        (PII, b"sk-proj-abcdefgh", b"ijklmnopqrstuvwx"),
        (SECRETS, b"sk-proj-abcdefgh", b"ijklmnopqrstuvwx"),
    ],
    ids=["card", "api_key", "api_key-secrets"],
)
def test_text_the_sdk_never_shows_cannot_split_a_secret_past_the_precheck(rule, name, head, rest):
    """The hidden frame rides in the chunk of the first half, so the pre-check saw the
    chunk's text end in " ok!" (no viable tail) and let it pass unparsed; the next chunk
    then no longer completed the match, while the SDK showed the two halves joined."""
    chunks = [ROLE, content(head) + HIDDEN[name], content(rest), END]
    shown = client_text(b"".join(chunks)).replace(" ok!", "")
    assert shown == (head + rest).decode()  # what the SDK shows unmasked, hidden text apart
    client, md = guarded_stream(rule, chunks)
    assert head not in client and md["guard_masked"] == 1
    assert (client, md) == guarded_stream(rule, chunks, on=False)


MEMBERS = [
    b'"id":"c"', b'"model":"m"', b'"usage":null', b'"choices":[]', b'"choices":null',
    b'"choices":[{"index":0,"delta":{"content":"A"}}]',
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"B"}}]',
    b'"choices":[{"index":0,"delta":{"content":"C"},"index":1}]',
    b'"choices":[{"index":0,"delta":{"content":"D"},"delta":{}}]',
    b'"choices":[{"index":0,"delta":{"content":"E","content":"F"}}]',
    b'"choices":[{"index":0,"delta":{"content":"G"}},{"index":1,"delta":{"content":"H"}}]',
    b'"choices":[{"index":1,"delta":{"content":"I"}}]',
    b'"choices":[{"index":0,"delta":{"con\\u0074ent":"J"}}]',
    b'"choices":[{"index":0,"delta":{"content":"K"},"finish_reason":null}]',
    b'"x":{"choices":[{"index":0,"delta":{"content":"L"}}]}',
    b'"x":{"a":{"b":1}}', b'"usage":{"prompt_tokens":1,"completion_tokens_details":{"r":0}}',
]  # fmt: skip


def sdk_contents(chunk: bytes) -> list[str] | None:
    """Every text a client reads in these frames, as Python's json (the SDKs' parser)
    reads them, or None if one is not choice 0's content."""
    texts = []
    for line in chunk.split(b"\n\n")[:-1]:
        data = line.removeprefix(b"data: ")
        if data == b"[DONE]":
            continue
        obj = json.loads(data)
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            if choice.get("index") != 0 or set(delta) - {"role", "content"}:
                return None
            if isinstance(delta.get("content"), str):
                texts.append(delta["content"])
        if len(obj.get("choices") or []) > 1:
            return None
    return texts


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.sampled_from(MEMBERS), min_size=1, max_size=4), min_size=1, max_size=4))
def test_plain_text_is_what_the_sdk_reads_or_unsure(frames):
    """Any members, repeated keys and nested lookalikes included: where the pre-check
    answers, its text is exactly choice 0's content as the SDK's parser reads it."""
    chunk = b"".join(b"data: {" + b",".join(members) + b"}\n\n" for members in frames)
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    plain = decoder.plain_text(chunk)
    if plain is not None:
        texts = sdk_contents(chunk)
        assert texts is not None and plain == "".join(texts)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.lists(st.sampled_from(MEMBERS), min_size=1, max_size=4), min_size=2, max_size=5),
    st.integers(1, 4),
)
def test_plain_text_after_a_remembered_frame_is_what_the_sdk_reads_or_unsure(frames, cut):
    """The same with the frames over two chunks of one stream: the decoder remembers
    the shape of the first chunk's frames, and the second chunk's text is still
    exactly what the SDK reads, or unsure."""
    encoded = [b"data: {" + b",".join(members) + b"}\n\n" for members in frames]
    cut = min(cut, len(encoded) - 1)
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    for chunk in (b"".join(encoded[:cut]), b"".join(encoded[cut:])):
        plain = decoder.plain_text(chunk)
        if plain is not None:
            texts = sdk_contents(chunk)
            assert texts is not None and plain == "".join(texts)


# -- metering: the figure the SDK reads ------------------------------------------------


def metered(chunks: list[bytes], split: bool = False) -> tuple:
    run = Run()
    run.request({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    if split:  # every byte its own chunk: the frame-by-frame path
        chunks = [bytes([b]) for b in b"".join(chunks)]
    run.respond(chunks)
    md = metadata(run.last)
    return md["prompt_tokens"], md["completion_tokens"], md["usage_estimated"]


TEXT = content(b"hi there")
FIGURES = b'{"prompt_tokens":10,"completion_tokens":9999,"total_tokens":10009}'


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_a_usage_figure_after_a_null_usage_key_is_metered(split):
    """`"usage":null,"usage":{...}`: the SDKs keep the last key; the frame-by-frame
    path read the first, saw null, and metered an estimate of 1 completion token."""
    usage = HEAD + b'],"usage":null,"usage":' + FIGURES + b"}\n\n"
    body = [TEXT, usage, b"data: [DONE]\n\n"]
    assert [c.usage.completion_tokens for c in sdk_stream(b"".join(body)) if c.usage] == [9999]
    assert metered(body, split) == (10, 9999, False)


@pytest.mark.parametrize("marker", [b": [DONE]\n\n", b"id: [DONE]\n\n"])
def test_only_a_done_data_frame_ends_the_metering(marker):
    """A comment or an `id:` line that says `[DONE]` is no end marker to the SDK, which
    reads on: the byte search once settled there, before the usage (1 token)."""
    body = [TEXT, marker, TEXT, frame(b"", b',"usage":' + FIGURES), b"data: [DONE]\n\n"]
    assert metered(body) == metered(body, split=True) == (10, 9999, False)


NOT_COUNTS = {
    "fraction": 9999.5, "string": "9999", "bool": True, "negative": -5, "null": None,
    "huge": 2**64 - 1, "float huge": 1e308, "absent": ...,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NOT_COUNTS))
def test_a_completion_figure_that_is_no_count_is_estimated_not_zero(name):
    """Before, each of these was metered as 0 completion tokens, reported: free."""
    usage = {"prompt_tokens": 10, "completion_tokens": NOT_COUNTS[name]}
    if NOT_COUNTS[name] is ...:
        del usage["completion_tokens"]
    body = [TEXT, TEXT, frame(b"", b',"usage":' + json.dumps(usage).encode()), END[-14:]]
    _, completion, estimated = metered(body)
    assert estimated and completion == 2  # one per content delta, as with no usage


def test_a_figure_written_as_a_whole_float_is_that_count():
    assert figure(12.0) == 12 and figure(12) == 12 and figure(MAX_FIGURE + 1) is None
    usage = usage_from({"prompt_tokens": 10.0, "completion_tokens": 9999.0})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.reported) == (10, 9999, True)


def test_a_total_below_prompt_and_completion_is_not_believed():
    """A `count: total` token limit charges total_tokens: 1 would admit 10009."""
    usage = usage_from({"prompt_tokens": 10, "completion_tokens": 9999, "total_tokens": 1})
    assert usage.total_tokens == 10009


@pytest.mark.parametrize("bad", [1.5, "7", -1, True, 2**64])
def test_other_formats_estimate_a_figure_that_is_no_count(bad):
    assert not gemini_usage({"usageMetadata": {"promptTokenCount": 3,
                                               "candidatesTokenCount": bad}}).reported  # fmt: skip
    assert not bedrock_usage({"inputTokens": 3, "outputTokens": bad}).reported
    assert not AnthropicMessages._usage({"input_tokens": 3, "output_tokens": bad}).reported
    # Absent zeros (Gemini leaves them out) stay counts.
    assert gemini_usage({"usageMetadata": {"promptTokenCount": 3}}).prompt_tokens == 3


# -- typed streams: the data's type, as the SDKs dispatch -------------------------------

ABODY = {**ARGS, "stream": True}


def aev(name: bytes, obj: dict) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


MESSAGE = {
    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test-model",
    "content": [], "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1},
}  # fmt: skip
A_START = aev(b"message_start", {"type": "message_start", "message": MESSAGE})
A_BLOCK = aev(b"content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}})  # fmt: skip


def a_delta(text: str, name: bytes = b"content_block_delta") -> bytes:
    return aev(name, {"type": "content_block_delta", "index": 0,
                      "delta": {"type": "text_delta", "text": text}})  # fmt: skip


STOP = {
    "type": "message_delta",
    "delta": {"stop_reason": "end_turn"},
    "usage": {"output_tokens": 20},
}
A_STOP = aev(b"message_stop", {"type": "message_stop"})
A_END = (
    aev(b"content_block_stop", {"type": "content_block_stop", "index": 0})
    + aev(b"message_delta", STOP)
    + A_STOP
)


def anthropic_stream(chunks: list[bytes]) -> tuple[bytes, dict]:
    run = guarded(CARDS)
    run.request(ABODY, path="/v1/messages")
    client = run.respond(chunks)
    return client, metadata(run.last)


def sdk_text(body: bytes) -> str:
    with sdk_client(body).messages.stream(**ARGS) as stream:
        return "".join(stream.text_stream)


@pytest.mark.parametrize("name", [b"message_stop", b"content_block_stop", b"x"])
def test_an_event_line_naming_another_type_ends_the_stream(name):
    """The Anthropic SDK reads the data's `type`: this frame is a text delta to it. The
    gateway went by the `event:` line and passed the card unguarded (and, for
    `message_stop`, settled there)."""
    card = a_delta("card 4111 1111 1111 1111 ok", name)
    body = [A_START, A_BLOCK, card, A_END]
    assert CARD.decode() in sdk_text(b"".join(body))
    client, md = anthropic_stream(body)
    assert CARD not in client and md["reason"] == "malformed_stream"
    assert b"event: error" in client


def test_a_repeated_type_key_ends_the_stream():
    """`{"type":"content_block_stop",...,"type":"content_block_delta",...}`: the last
    key wins in every parser, so the SDK shows the text."""
    data = (b'{"type":"content_block_stop","index":0,"type":"content_block_delta",'
            b'"delta":{"t\\u0079pe":"text_delta","text":"4111 1111 1111 1111"}}')  # fmt: skip
    hidden = b"event: content_block_stop\ndata: " + data + b"\n\n"
    assert CARD.decode() in sdk_text(A_START + A_BLOCK + hidden + A_END)
    client, md = anthropic_stream([A_START, A_BLOCK, hidden, A_END])
    assert CARD not in client and md["reason"] == "malformed_stream"


def test_a_block_that_opens_with_text_is_guarded():
    """The SDK's final message keeps a text block's opening text; it was not scanned."""
    block = aev(b"content_block_start", {"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": "4111 1111 1111 1111"}})  # fmt: skip
    body = [A_START, block, a_delta(" ok"), A_END]
    with sdk_client(b"".join(body)).messages.stream(**ARGS) as stream:
        assert CARD.decode() in stream.get_final_message().content[0].text
    client, md = anthropic_stream(body)
    assert CARD not in client and md["guard_masked"] == 1


def test_an_anthropic_event_without_its_type_line_ends_the_stream():
    """The SDKs skip it, a client of its own may show it: read either way, it could
    hide text inside a card number or show one unguarded."""
    bare = a_delta("ok!").split(b"\n", 1)[1]
    _, md = anthropic_stream([A_START, A_BLOCK, a_delta("a"), bare, A_END])
    assert md["reason"] == "malformed_stream"


def test_a_usage_under_another_event_line_ends_the_stream():
    usage = aev(b"content_block_delta", {"type": "message_delta", "delta": {},
                                         "usage": {"output_tokens": 9999}})  # fmt: skip
    body = A_START + A_BLOCK + a_delta("hi") + usage + A_STOP
    with sdk_client(body).messages.stream(**ARGS) as stream:
        assert stream.get_final_message().usage.output_tokens == 9999
    assert anthropic_stream([body])[1]["reason"] == "malformed_stream"


def test_canonical_anthropic_deltas_are_still_not_parsed(monkeypatch):
    """The check is byte search for the frames providers send (a parse per delta would
    cost the hot path): only the usage events are parsed, as before."""
    calls = []
    real = anthropic_format.loads
    monkeypatch.setattr(anthropic_format, "loads", lambda d: calls.append(d) or real(d))
    decoder = AnthropicMessages.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    ping = b'event: ping\ndata: {"type": "ping"}\n\n'
    decoder.feed(A_START + ping + a_delta("a") + a_delta('say "x"\n') + A_END)
    assert len(calls) == 2 and decoder.usage.completion_tokens == 20


R_SEQ = iter(range(1000))


def rev(name: bytes, obj: dict) -> bytes:
    obj = {"type": name.decode(), "sequence_number": next(R_SEQ), **obj}
    return b"event: " + name + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def test_a_responses_event_line_naming_another_type_ends_the_stream():
    created = rev(b"response.created", {"response": {"id": "r", "object": "response",
                  "status": "in_progress", "output": [], "model": "m"}})  # fmt: skip
    delta = {"item_id": "i", "output_index": 0, "content_index": 0,
             "delta": "4111 1111 1111 1111", "logprobs": []}  # fmt: skip
    disguised = rev(b"response.output_text.delta", delta).replace(
        b"event: response.output_text.delta", b"event: response.in_progress"
    )
    events = sdk_events(created + disguised)
    assert any(getattr(e, "delta", None) == CARD.decode() for e in events)
    run = guarded(CARDS)
    run.request({"model": "gpt-4.1-mini", "input": "hi", "stream": True}, path="/v1/responses")
    client = run.respond([created, disguised])
    assert CARD not in client and metadata(run.last)["reason"] == "malformed_stream"
    assert OpenAIResponses.name == "openai_responses"


def test_legacy_function_call_arguments_are_masked():
    """A `functions` request's answer streams `delta.function_call.arguments`; the
    SDKs show it, the guards did not read it."""
    call = b'{"index":0,"delta":{"function_call":{"name":"f","arguments":"4111 1111 1111 1111"}}}'
    chunks = [ROLE, frame(call), END]
    assert any(c.choices and c.choices[0].delta.function_call for c in sdk_stream(b"".join(chunks)))
    client, md = guarded_stream(CARDS, chunks)
    assert CARD not in client and md["guard_masked"] == 1


def test_random_hidden_frames_never_change_what_is_masked():
    """Hidden frames sprinkled in at random: pre-check on and off agree."""
    rng = random.Random(5)
    for _ in range(30):
        frames = [content(b"4111 1111 1111 "), rng.choice(list(HIDDEN.values())), content(b"1111")]
        rng.shuffle(frames)
        chunks = [ROLE, b"".join(frames[:2]), frames[2], END]
        assert guarded_stream(CARDS, chunks) == guarded_stream(CARDS, chunks, on=False)


# -- "no text here" decided by bytes: only in the exact empty shapes ---------------------


def is_guarded(decoder, wire: bytes) -> bool:
    """The frame's texts reach the guards, and the card is among them."""
    events = decoder.feed(wire)
    return any(
        event.is_content and any(CARD.decode() in d.text for d in decoder.texts(event))
        for event in events
    )


@pytest.mark.parametrize(
    "delta",
    [
        {"type": "text_delta", "text": CARD.decode(), "x": ""},  # ends in `:""}}`
        {"type": "signature_delta", "type ": 0, "text": CARD.decode()},
    ],
    ids=["empty-other-key", "signature-named"],
)
def test_an_anthropic_delta_is_no_text_only_in_the_exact_empty_shapes(delta):
    obj = {"type": "content_block_delta", "index": 0, "delta": delta}
    if "type " in delta:  # a second `type` key: the last (text_delta) is what parsers keep
        data = orjson.dumps(obj).replace(b'"type ":0', b'"type":"text_delta"')
    else:
        data = orjson.dumps(obj)
    wire = b"event: content_block_delta\ndata: " + data + b"\n\n"
    assert CARD.decode() in sdk_text(A_START + A_BLOCK + wire + A_END)
    decoder = AnthropicMessages.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    assert is_guarded(decoder, A_START + A_BLOCK + wire)


def test_a_responses_delta_is_empty_only_as_its_one_plain_delta():
    obj = {"type": "response.output_text.delta", "sequence_number": 3, "item_id": "i",
           "output_index": 0, "content_index": 0, "delta": CARD.decode(),
           "logprobs": [{"token": "", "delta": ""}]}  # fmt: skip
    wire = b"event: response.output_text.delta\ndata: " + orjson.dumps(obj) + b"\n\n"
    assert any(getattr(e, "delta", None) == CARD.decode() for e in sdk_events(wire))
    assert is_guarded(
        OpenAIResponses.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16), wire
    )


def test_a_bedrock_delta_is_empty_only_as_the_one_empty_text():
    from tests.test_providers_bedrock import decoder as bedrock_decoder
    from tests.test_providers_bedrock import delta as bedrock_delta
    from tests.test_providers_bedrock import message

    wire = bedrock_delta(0, {"toolUse": {"input": CARD.decode()}, "x": {"text": ""}}, 3)
    assert is_guarded(bedrock_decoder(), wire)
    # `text` twice (once spelt with an escape): parsers keep the card, not the "".
    payload = b'{"contentBlockIndex":0,"delta":{"text":"","t\\u0065xt":"' + CARD + b'"}}'
    assert json.loads(payload)["delta"]["text"] == CARD.decode()
    headers = [(":event-type", "contentBlockDelta"), (":content-type", "application/json"),
               (":message-type", "event")]  # fmt: skip
    assert is_guarded(bedrock_decoder(), message(headers, payload))


GEMINI_PARTS = {
    "escaped key": b'{"t\\u0065xt":"4111 1111 1111 1111"}',
    "snake_case call": b'{"function_call":{"name":"f","args":{"card":"4111 1111 1111 1111"}}}',
    "code": b'{"executableCode":{"language":"PYTHON","code":"print(\\"4111 1111 1111 1111\\")"}}',
    "code output": b'{"codeExecutionResult":{"outcome":"OUTCOME_OK",'
    b'"output":"4111 1111 1111 1111"}}',
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GEMINI_PARTS))
def test_gemini_parts_the_sdk_reads_reach_the_guards(name):
    from google.genai import types

    from extproc.providers.gemini import Gemini
    from tests.test_providers_gemini import sdk_client as gemini_client

    data = b'{"candidates":[{"content":{"role":"model","parts":[' + GEMINI_PARTS[name] + b"]}}]}"
    wire = b"data: " + data + b"\n\n"
    chunks = list(gemini_client(wire).models.generate_content_stream(model="m", contents="x"))
    part = chunks[0].candidates[0].content.parts[0]
    assert isinstance(part, types.Part) and "4111 1111 1111 1111" in str(part)
    decoder = Gemini.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    assert is_guarded(decoder, wire)


def test_the_end_marker_is_its_own_frame_whatever_the_text_says():
    """A model may write `[DONE]` in its text: the marker frame after it still ends the
    stream (settled there); a comment saying it does not."""
    decoder = OpenAIChat.stream_decoder(hide_usage=False, max_frame_bytes=1 << 16)
    assert decoder.feed_whole(content(b"say [DONE]") + b": [DONE]\n\n") is not None
    assert not decoder.done
    assert decoder.feed_whole(content(b"[DONE]") + b"data: [DONE]\n\n") is not None
    assert decoder.done


ODD_FRAMINGS = {
    "no space after data:": b"data:" + frame(b"", b',"usage":' + FIGURES)[6:],
    "multi-line data": HEAD + b'],\ndata: "usage":' + FIGURES + b"}\n\n",
    "event line": b"event: message\n" + frame(b"", b',"usage":' + FIGURES),
    "CRLF": frame(b"", b',"usage":' + FIGURES).replace(b"\n", b"\r\n"),
    "spaced null first": HEAD + b'],"usage": null,"usage":' + FIGURES + b"}\n\n",
}


@pytest.mark.parametrize("name", sorted(ODD_FRAMINGS))
def test_odd_framings_meter_what_the_sdk_reads(name):
    """Held: the byte search steps aside (or reads alike) for every framing the SDK
    accepts; whole chunks and byte-split ones meter the SDK's figure."""
    body = [TEXT, ODD_FRAMINGS[name], b"data: [DONE]\n\n"]
    figures = [c.usage.completion_tokens for c in sdk_stream(b"".join(body)) if c.usage]
    assert figures == [9999]
    assert metered(body) == metered(body, split=True) == (10, 9999, False)
