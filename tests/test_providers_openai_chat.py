"""OpenAI Chat Completions (and Azure, vLLM, Ollama): the stream decoder's texts and
rewrite, request texts, whole answers, and errors as the openai SDK sees them."""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.providers import openai_chat, openai_counts
from extproc.providers.base import RequestError, TextDelta
from extproc.providers.openai_chat import AzureOpenAIChat, OpenAIChat, OpenAIChatStream
from tests.providers_helpers import (
    CARD,
    MASK,
    REPLAY,
    cut,
    cuts,
    mask_cards,
    out_of,
    raw_of,
    replay,
    rewrite_all,
    running_texts,
    usage_tuple,
)

HEAD = (
    '{"id":"chatcmpl-Fx1","object":"chat.completion.chunk","created":1735689600,'
    '"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_1a2b3c4d5e","choices":['
)


def frame(choices: str, usage: str = "null") -> bytes:
    return f'data: {HEAD}{choices}],"usage":{usage}}}\n\n'.encode()


def choice(delta: str, finish: str = "null", index: int = 0) -> str:
    return f'{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{finish}}}'


USAGE = (
    '{"prompt_tokens":31,"completion_tokens":17,"total_tokens":48,'
    '"prompt_tokens_details":{"cached_tokens":8,"audio_tokens":0},'
    '"completion_tokens_details":{"reasoning_tokens":5,"audio_tokens":0,'
    '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}'
)
FRAMES = [
    frame(choice('{"role":"assistant","content":"","refusal":null}')),
    frame(choice('{"reasoning_content":"User wants a card."}')),
    frame(choice('{"content":"Your card "}')),
    frame(choice(f'{{"content":"is {CARD}."}}')),
    frame(choice('{"content":" Bye"}', index=1)),
    frame(
        choice(
            '{"tool_calls":[{"index":0,"id":"call_Qm9v","type":"function",'
            '"function":{"name":"lookup","arguments":""}}]}'
        )
    ),
    frame(choice('{"tool_calls":[{"index":0,"function":{"arguments":"{\\"q\\": \\"x\\"}"}}]}')),
    frame(choice("{}", '"tool_calls"')),
    f'data: {HEAD}],"usage":{USAGE}}}\n\n'.encode(),
    b"data: [DONE]\n\n",
]
BODY = b"".join(FRAMES)
EXPECTED_TEXTS = {
    ("reasoning", 0): "User wants a card.",
    ("content", 0): f"Your card is {CARD}.",
    ("content", 1): " Bye",
    ("tool_arguments", 0): '{"q": "x"}',
}


def decoder(hide_usage: bool = False) -> OpenAIChatStream:
    return OpenAIChat.stream_decoder(hide_usage=hide_usage, max_frame_bytes=1 << 16)


@REPLAY
@given(st.data())
def test_any_chunking_meters_and_forwards_bytes_exactly(data):
    points = data.draw(cuts(BODY))
    dec = decoder()
    events = replay(dec, cut(BODY, points))
    assert raw_of(events) == BODY
    assert out_of(events) == BODY
    assert all(e.out is e.raw for e in events)
    assert usage_tuple(dec.usage) == (31, 17, 48, 8, 5, True)
    assert dec.finish_reason == "tool_calls"
    assert dec.content_events == 5
    assert running_texts(dec, events) == EXPECTED_TEXTS
    assert dec.buffered == 0


@REPLAY
@given(st.data())
def test_hidden_usage_drops_only_the_usage_frame_in_any_chunking(data):
    dec = decoder(hide_usage=True)
    events = replay(dec, cut(BODY, data.draw(cuts(BODY))))
    # Every frame but the usage-only one goes on byte for byte, `"usage":null` kept.
    assert out_of(events) == b"".join(FRAMES[:-2]) + FRAMES[-1]
    assert [e.out is e.raw for e in events].count(False) == 1
    assert usage_tuple(dec.usage) == (31, 17, 48, 8, 5, True)


def test_hidden_usage_whole_frames_without_the_usage_frame_are_untouched():
    """The hot path: a frame-aligned chunk that has no usage-only frame is handed back
    as the same object, which the exchange answers with "no mutation"."""
    dec = decoder(hide_usage=True)
    chunk = b"".join(FRAMES[:4])
    assert dec.feed_whole(chunk) is chunk
    assert dec.content_events == 3
    last = FRAMES[-2] + FRAMES[-1]
    assert dec.feed_whole(last) == FRAMES[-1]
    assert dec.done and usage_tuple(dec.usage) == (31, 17, 48, 8, 5, True)


def test_texts_and_rewrite_round_trip():
    dec = decoder()
    events = replay(dec, [BODY])
    for event in events:
        texts = dec.texts(event)
        out = dec.rewrite(event, [t.text for t in texts])
        if not texts:
            assert out is event.out
            continue
        assert out.startswith(b"data: ") and out.endswith(b"\n\n")
        assert orjson.loads(out[6:-2]) == orjson.loads(event.data)
        again = decoder()
        (copy,) = again.feed(out)
        assert again.texts(copy) == texts


def test_masking_a_card_rewrites_only_its_frame():
    dec = decoder()
    events = replay(dec, [BODY])
    masked = rewrite_all(dec, events, mask_cards)
    assert CARD.encode() not in masked
    check = decoder()
    after = replay(check, [masked])
    assert running_texts(check, after)[("content", 0)] == f"Your card is {MASK}."
    # Every other frame is forwarded byte for byte.
    assert masked == BODY.replace(FRAMES[3], b"".join(e.out for e in after[3:4]))
    assert usage_tuple(check.usage) == usage_tuple(dec.usage)


def test_rewrite_keeps_line_endings_and_usage_null_with_hidden_usage():
    dec = decoder(hide_usage=True)
    crlf = FRAMES[2].replace(b"\n", b"\r\n")
    (event,) = dec.feed(crlf)
    assert event.out is event.raw
    out = dec.rewrite(event, ["Masked "])
    assert out.endswith(b"\r\n\r\n") and b'"usage":null' in out
    assert orjson.loads(out[6:-4])["choices"][0]["delta"] == {"content": "Masked "}


def test_rewrite_needs_one_text_per_slot():
    dec = decoder()
    (event,) = dec.feed(FRAMES[2])
    with pytest.raises(ValueError, match="expected 1 texts"):
        dec.rewrite(event, [])


def test_content_frames_are_not_parsed(monkeypatch):
    calls = []
    real = openai_chat.loads
    monkeypatch.setattr(openai_chat, "loads", lambda d: calls.append(d) or real(d))
    dec = decoder()
    replay(dec, [b"".join(FRAMES[:-2]), FRAMES[-1]])
    assert calls == []
    dec.feed(FRAMES[-2])
    assert len(calls) == 1  # the usage chunk only


def test_vllm_and_ollama_reasoning_deltas():
    dec = decoder()
    (vllm,) = dec.feed(frame(choice('{"reasoning_content":"think"}')))
    (ollama,) = dec.feed(frame(choice('{"reasoning":"hmm"}')))
    assert vllm.is_content and ollama.is_content
    assert dec.texts(vllm) == [TextDelta(0, "think", "reasoning")]
    assert dec.texts(ollama) == [TextDelta(0, "hmm", "reasoning")]


def test_refusal_deltas_are_texts_a_guard_reads_and_masks():
    """A model's refusal is shown to the user like content: a guard must see it."""
    dec = decoder()
    (event,) = dec.feed(frame(choice(f'{{"refusal":"I cannot share {CARD}"}}')))
    assert event.is_content
    assert dec.texts(event) == [TextDelta(0, f"I cannot share {CARD}")]
    out = dec.rewrite(event, [f"I cannot share {MASK}"])
    assert orjson.loads(out[6:-2])["choices"][0]["delta"] == {"refusal": f"I cannot share {MASK}"}
    body = orjson.dumps(
        {"choices": [{"index": 0, "message": {"content": None, "refusal": f"No: {CARD}"}}]}
    )
    assert OpenAIChat.completion_texts(body) == [TextDelta(0, f"No: {CARD}", final=True)]


def sdk_stream(body: bytes):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    client = openai.OpenAI(
        api_key="sk-test",
        base_url="http://provider.test/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )


def test_error_event_raises_in_the_openai_sdk_after_the_text_so_far():
    dec = decoder()
    body = b"".join(FRAMES[:3]) + dec.error_event("blocked by policy", "content_blocked")
    seen = []
    with pytest.raises(openai.APIError, match="blocked by policy") as info:
        for chunk in sdk_stream(body):
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", None, "Your card "]
    assert info.value.body["code"] == "content_blocked"


# ------------------------------------------------------------------ requests

REQUEST = {
    "model": "gpt-4o-mini",
    "stream": True,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": f"card {CARD}"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ],
}  # fmt: skip


def test_request_texts_in_order_and_masked_in_place():
    info = OpenAIChat.parse_request(orjson.dumps(REQUEST))
    # Content first (in order), then the other fields read as text: the image URL.
    assert info.prompt_texts == ["Be brief.", f"card {CARD}", '{"a":1}', "42", "x"]
    body = OpenAIChat.replace_request_texts(info, [mask_cards(t) for t in info.prompt_texts])
    sent = orjson.loads(body)
    assert sent["messages"][1]["content"][0]["text"] == f"card {MASK}"
    assert sent["messages"][1]["content"][1]["type"] == "image_url"
    assert info.prompt_texts[1] == f"card {MASK}"
    # The usage switch is added to the masked body, not the original.
    assert CARD.encode() not in OpenAIChat.ensure_usage(info)


def test_azure_deployment_path_names_the_model():
    path = "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert AzureOpenAIChat.handles(path)
    assert AzureOpenAIChat.parse_request(orjson.dumps(body), path).model == "gpt-4o-prod"
    body["model"] = "gpt-4o-prod"  # the SDK sends the deployment in both places
    assert AzureOpenAIChat.parse_request(orjson.dumps(body), path).model == "gpt-4o-prod"
    # Azure serves the path's deployment: a body naming another model is refused, so
    # the policy never checks one model while another is served (security.md).
    body["model"] = "gpt-4o"
    with pytest.raises(RequestError) as refused:
        AzureOpenAIChat.parse_request(orjson.dumps(body), path)
    assert refused.value.code == "model_mismatch" and refused.value.param == "model"
    # Outside Azure's deployment paths a missing model stays empty for a policy default
    # to fill; the exchange refuses the request if it is still empty (test_exchange).
    assert OpenAIChat.parse_request(orjson.dumps({"messages": body["messages"]}), path).model == ""
    assert AzureOpenAIChat.client_credential({"api-key": "k1"}) == "k1"
    assert AzureOpenAIChat.client_credential({"authorization": "Bearer t"}) == "t"
    assert AzureOpenAIChat.upstream_auth("s") == [("api-key", "s")]
    assert OpenAIChat.upstream_auth("s") == [("authorization", "Bearer s")]


def test_whole_completion_texts_rewrite_and_finish():
    body = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"It is {CARD}", "refusal": None},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }
    )
    assert OpenAIChat.completion_texts(body) == [TextDelta(0, f"It is {CARD}", final=True)]
    assert OpenAIChat.completion_finish_reason(body) == "stop"
    new = OpenAIChat.rewrite_completion(body, [f"It is {MASK}"])
    assert orjson.loads(new)["choices"][0]["message"]["content"] == f"It is {MASK}"
    assert OpenAIChat.completion_usage(new).total_tokens == 7


def test_error_body_is_openai_shaped():
    err = orjson.loads(OpenAIChat.error_body(429, "slow down", "rate_limited"))["error"]
    assert err["message"] == "slow down" and err["code"] == "rate_limited"


@given(
    st.lists(st.sampled_from(["content", "arguments", "reasoning", "refusal", "x"]), max_size=8),
    st.lists(st.sampled_from(['":"', '":""', '":"a', '":null', '"', ":", " "]), max_size=8),
)
def test_text_deltas_counts_non_empty_texts_in_one_pass(keys, tails):
    """The one-pass count equals keys-with-a-string minus keys-with-an-empty-string."""
    # Pieces apart as in JSON (a comma between members): run together, one key's closing
    # quote could open the next and `bytes.count`, which does not overlap, would miss it.
    data = ",".join(f'"{k}{t}' for k, t in zip(keys, tails, strict=False)).encode()
    count = data.count
    texts = openai_counts.TEXT_KEYS
    expected = sum(map(count, texts)) - sum(count(key + b'"') for key in texts)
    assert openai_counts.text_deltas(data) == expected


# Where `"usage"` can sit in a frame, null or not, spaced or not, at the edges of the
# byte search (`feed_whole` decides "no usage figure here" without a parse).
USAGE_FRAMES = [
    *FRAMES,
    frame(choice('{"content":"a"}'), usage=" null"),
    frame(choice('{"content":"\\"usage\\":null"}')),
    frame(choice('{"content":"b"}'), usage='{"prompt_tokens":1,"completion_tokens":2}'),
    f'data: {{"usage":null,{HEAD[1:]}{choice("{}")}]}}\n\n'.encode(),
    f'data: {HEAD}{choice(chr(123) + chr(125))}],"usage":null,"usage":{USAGE}}}\n\n'.encode(),
    f'data: {HEAD}],"usage":null}}\n\n'.encode(),
    b'data: "usage":null\n\n',
    b'data: {"x":1,"usage"usage":null}\n\n',
    b"id: data: [DONE]\n\n",  # the end marker's bytes, not at a frame's start: no end
]


@given(st.lists(st.sampled_from(USAGE_FRAMES), min_size=1, max_size=6), st.booleans())
def test_whole_frames_meter_as_the_frame_by_frame_parse(frames, hide):
    """The byte search's answer (untouched, or the usage frame dropped) and its meter
    readings are those of the full parse of the same frames."""
    chunk = b"".join(frames)
    fast, full = decoder(hide_usage=hide), decoder(hide_usage=hide)
    whole = fast.feed_whole(chunk)
    assert whole is not None
    assert whole == out_of(full.feed(chunk))
    assert usage_tuple(fast.usage) == usage_tuple(full.usage)
    assert (fast.content_events, fast.finish_reason, fast.done) == (
        full.content_events,
        full.finish_reason,
        full.done,
    )


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b'"usage"',
                b":null",
                b',"usage":null',
                b'"usage":null',
                b",",
                b"\n\n",
                b"{",
                b"x",
                b'"usage":{"prompt_tokens":1}',
                b":",
                b'"',
                b' "usage" :null',
                b"null",
            ]
        ),
        max_size=14,
    ),
    st.integers(0, 40),
)
def test_the_usage_figure_search_stops_where_the_walk_over_each_key_does(pieces, start):
    """One regex search finds the `"usage"` the key-by-key walk stops at, wherever nulls,
    commas and keys sit (`null"usage"`, right after a null, is the walk's own answer)."""
    chunk = b"".join(pieces)
    start = min(start, len(chunk))
    assert openai_counts.usage_figure(chunk, start) == openai_counts.usage_walk(chunk, start)


@pytest.mark.parametrize(
    ("frames", "done"),
    [
        (b"data: [DONE]\n\n", True),
        (b'data: {"a":1}\n\ndata: [DONE]\n\n', True),
        (b"id: data: [DONE]\n\n", False),
        (b"data: [DONE]\n\nid: data: [DONE]\n\n", True),  # the last is none, the first is
        (b": data: [DONE]\n\ndata: {}\n\n", False),
        (b"data: [DONE]\n\ndata: [DONE]\n\n", True),
    ],
)
def test_the_end_marker_is_found_in_any_frame_of_a_chunk(frames, done):
    """The search from the end goes on past a marker that is not a frame of its own, and
    the meter says what the frame-by-frame parse says."""
    assert openai_counts.done_frames(frames) is done
    fast, full = decoder(hide_usage=False), decoder(hide_usage=False)
    fast.feed_whole(frames)
    full.feed(frames)
    assert fast.done == full.done == done
