"""The request phase's fast paths against their slow references, on adversarial input,
and the holes the fifth review closed (docs/security.md, "Request phase, fifth
review"): a client's copy of the failover stash, a compressed request body."""

from __future__ import annotations

import random

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extproc.errors import RequestError
from extproc.failover.attempt import Attempt
from extproc.failover.plan import STASH_KEY
from extproc.paths import PathRefused, _canonical, canonical
from extproc.policy import Shared, build_policy
from extproc.policy.guards.anywhere import nothing_anywhere
from extproc.providers._json import keys_proven_unique, parse_json_object
from tests.test_exchange import body_msg, headers_msg
from tests.test_failover import _attempt_headers, _sets, config_of, policy_metrics
from tests.test_guard_request_prefilter import ANYWHERE, BUILTIN_PLAN, PIECES, _exact, _scan
from tests.test_json_unique_keys import DOCUMENTS, _strict, _write
from tests.test_models_policy import ENV, error_of, post

# -- paths: the plain-path check against the character walk ------------------------------

# Characters, not segments: every byte class the walk treats apart (structure, escapes
# of what must never be encoded, dots, controls, non-ASCII letters and digits that
# `[A-Za-z0-9]` must not take for ASCII ones: the Kelvin sign, a full-width A, ٣).
PATH_CHARS = [
    "/", "/", "/", ".", ".", "a", "Z", "0", "-", "_", "~", ":", "?", "#", ";", "\\",
    "%2F", "%2e", "%2E", "%5C", "%3A", "%3a", "%41", "%7E", "%25", "%zz", "%", "%0",
    " ", "\t", "\n", "\x00", "\x7f", "\u212a", "\uff21", "\u0663", "\u00e9", "=", "&", "@",
]  # fmt: skip
RAW_PATHS = st.lists(st.sampled_from(PATH_CHARS), max_size=14).map("".join)


def _answer(check, raw: str) -> str | type:
    try:
        return check(raw)
    except PathRefused:
        return PathRefused


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(["", "/", "/v1/", "/v1/chat/"]), RAW_PATHS)
def test_the_plain_path_check_answers_as_the_walk_on_any_characters(head: str, tail: str):
    raw = head + tail
    fast = _answer(canonical, raw)
    event(f"{'refused' if fast is PathRefused else 'read'}")
    assert fast == _answer(_canonical, raw)


# -- JSON: the duplicate-key proof at the depths where the rules change -------------------


def _nest(inner: str, depth: int, rnd: random.Random) -> str:
    for _ in range(depth):
        inner = rnd.choice(["[{}]", '{{"k":{}}}', '{{"a":0,"k":{}}}']).format(inner)
    return inner


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS, st.integers(245, 262), st.randoms(use_true_random=False))
def test_the_proof_holds_around_the_re_encoding_depth(doc, depth: int, rnd) -> None:
    """Repeated keys under ~255 levels of arrays and objects: a body the pre-check
    proves is one the strict parse passes, and whatever `parse_json_object` answers is
    the strict answer, or the too-deep refusal (which must name a repeated key first)."""
    body = ('{"model":"m","x":' + _nest(_write(doc, rnd), depth, rnd) + "}").encode()
    strict = _strict(body)
    try:
        parse_json_object(body, "a JSON object")
        answer = None
    except RequestError as exc:
        answer = exc.code
    event(f"strict {'passes' if strict is None else 'refuses'}, answer {answer}")
    if strict is not None:
        assert answer == "duplicate_key", body[-200:]
    else:
        assert answer in (None, "invalid_json")
        if answer is None:  # accepted: it re-encodes, and nothing was proven wrongly
            orjson.dumps(orjson.loads(body))
    obj = orjson.loads(body)
    try:
        proven = keys_proven_unique(body, obj)
    except RequestError:
        return
    assert not proven or strict is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","model":"m"}',
        b'{"model":1e308,"model":-0.0}',
        b'{"a\\u0000":1,"a\\u0000":2}',
        b'{"\\ud83d\\ude00":1,"\xf0\x9f\x98\x80":2}',  # one key, escaped and raw
        b'{"x":"\\u003a","a":1,"a":2}',  # an escaped colon cannot pay for a dropped key
        b'{"x":"\\u003A","a":1,"A":2}',
        b'{"a" : 1 ,\n\t"A" : 2}',
    ],
)
def test_repeats_the_colon_count_could_miss_are_refused(body: bytes) -> None:
    with pytest.raises(RequestError) as info:
        parse_json_object(body, "a JSON object")
    assert info.value.code == "duplicate_key"


@pytest.mark.parametrize(
    "body",
    [
        b"\xef\xbb\xbf{}",  # a BOM: Python's json would take it, orjson (the gate) does not
        b'{"a":1}{"a":2}',
        b'{"a":1} x',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":18446744073709551616}',  # orjson would read a float, json an integer
        b'{"a":[1,-9223372036854775809]}',
        b'{"a":1e400}',
        b'{"a":"\\ud800"}',
        b'{"a":"\x00"}',
    ],
)
def test_what_orjson_refuses_never_reaches_the_key_checks(body: bytes) -> None:
    """Python's json (the strict key check) reads some of these (a BOM, a big integer, a
    lone surrogate): orjson refuses them first, so no body is read two ways."""
    with pytest.raises(RequestError) as info:
        parse_json_object(body, "a JSON object")
    assert info.value.code in ("invalid_json", "invalid_encoding")


# -- guards: the one RE2 search over control whitespace and the NUL separator -------------

# What the prefilter must map by hand: Python's `\s` on str takes \x0b, \x0c and
# \x1c-\x1f, RE2's does not; NUL is the separator of the joined search; NEL and U+2028
# become line breaks in the normalised view; a BOM and U+180E are removed.
EXTRA = ["\t", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x85", "\u2028", "\ufeff"]
NASTY_TEXTS = st.lists(
    st.lists(st.sampled_from([*PIECES, *EXTRA, *EXTRA]), max_size=20).map("".join),
    min_size=1,
    max_size=4,
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(NASTY_TEXTS)
def test_the_joined_search_never_clears_what_the_exact_scan_finds(texts: list[str]) -> None:
    cleared = nothing_anywhere(ANYWHERE, texts)
    event(f"cleared: {cleared}")
    if cleared:
        assert _scan(_exact(BUILTIN_PLAN), texts) == (texts, {}, {}, None)


def test_a_card_split_by_control_whitespace_is_not_cleared() -> None:
    for sep in ("\x0b", "\x1c", "\x1f", "\x0c"):
        texts = [f"card 4111{sep}1111{sep}1111{sep}1111"]
        found = _scan(_exact(BUILTIN_PLAN), texts)
        if found[1]:  # the exact scan masks it: the joined search must not clear it
            assert not nothing_anywhere(ANYWHERE, texts), repr(sep)


# -- a client's failover stash ---------------------------------------------------------


def test_a_client_cannot_choose_the_failover_attempts_path() -> None:
    """The upstream attempt sets `:path` (and picks a translation) from the body key
    `x-ai-gateway`, which the router-level stage writes for a target in another API.
    A client's own copy sent the request, with the provider's key, to any path
    (`/v1/fine_tuning/jobs`) the policy never classified: it is refused, and nothing
    is acquired for it."""
    config = config_of()
    chat = {"model": "fo", "messages": [{"role": "user", "content": "hi"}]}
    for stash in (
        {"path": "/v1/fine_tuning/jobs", "api": ""},
        {"path": "/v1/chat/completions", "api": "anthropic_messages"},
        "anything",
    ):
        _, answer = post(config, None, {**chat, STASH_KEY: stash})
        status, error = error_of(answer)
        assert status == 400 and error["code"] == "invalid_request", error
        assert error["param"] == STASH_KEY and STASH_KEY in error["message"]
    # The same request without it goes to the alias's targets.
    _, answer = post(config, None, chat)
    sent = orjson.loads(answer.request_body.response.body_mutation.body)
    assert sent["model"] == "m-a" and STASH_KEY not in sent


def test_the_attempt_still_takes_the_gateways_own_stash() -> None:
    """What the refusal protects: the attempt obeys the stash in the body it gets."""
    policy = build_policy(config_of(), Shared(), ENV)
    attempt = Attempt(policy, policy_metrics(policy))
    attempt.on(_attempt_headers("fo", 0, {":method": "POST", ":path": "/v1/chat/completions"}))
    sent = {"model": "m-a", "messages": [], STASH_KEY: {"api": "", "path": "/v1/x"}}
    response = attempt.on(body_msg(orjson.dumps(sent))).request_body.response
    assert _sets(response.header_mutation)[":path"] == "/v1/x"


# -- a compressed request body -----------------------------------------------------------


def _headers_answer(extra: dict[str, str], path: str = "/v1/chat/completions"):
    from tests.test_exchange import Run
    from tests.test_models_policy import config_of as models_config

    config = models_config()
    run = Run(config)
    run.ex.policy = build_policy(config, Shared(), ENV)
    headers = {
        ":method": "POST",
        ":path": path,
        "content-type": "application/json",
        "authorization": "Bearer key-a",
        **extra,
    }
    return run.send(headers_msg(headers, route="v1"))


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate", "identity,gzip", "GZIP", "x"])
def test_a_compressed_request_body_is_a_415_before_the_body(coding: str) -> None:
    """The stages read the body's bytes as JSON: a body the provider would decompress
    first was read by nobody. Refused at the headers, said as such (not 'not UTF-8')."""
    answer = _headers_answer({"content-encoding": coding})
    status, error = error_of(answer)
    assert status == 415 and error["code"] == "unsupported_content_encoding", error
    assert "uncompressed" in error["message"]


@pytest.mark.parametrize("extra", [{}, {"content-encoding": "identity"}])
def test_an_identity_body_goes_on_to_the_body_phase(extra: dict[str, str]) -> None:
    answer = _headers_answer(extra)
    assert answer.HasField("request_headers"), answer


@pytest.mark.parametrize(
    "body",
    [
        b'{"max_tokens":18446744073709551615,"n":-9223372036854775808}',  # the edges
        b'{"a":"12345678901234567890123456789"}',  # digits in a string are text
        b'{"a":1.2345678901234567890123,"b":12345678901234567890e3}',  # floats either way
    ],
)
def test_64_bit_integers_and_long_digit_strings_pass(body: bytes) -> None:
    assert parse_json_object(body, "a JSON object") == orjson.loads(body)


# -- the model in the path and in the body -----------------------------------------------

GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
AZURE_PATH = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
SAY = [{"role": "user", "content": "x"}]
VERTEX_MODEL = "projects/p/locations/l/publishers/google/models/gemini-2.5-pro"
VERTEX_PATH = f"/v1/{VERTEX_MODEL}:generateContent"
G = "gemini-2.5-flash"


@pytest.mark.parametrize(
    ("fmt", "path", "body"),
    [
        ("gemini", GEMINI_PATH, {"model": "gemini-2.5-pro", "contents": []}),
        ("gemini", GEMINI_PATH, {"model": "models/gemini-2.5-pro", "contents": []}),
        ("gemini", GEMINI_PATH, {"model": 7, "contents": []}),
        ("gemini", VERTEX_PATH, {"model": VERTEX_MODEL.replace("google", "evil"),
                                 "contents": []}),
        ("azure", AZURE_PATH, {"model": "gpt-4o", "messages": SAY}),
        ("azure", AZURE_PATH, {"model": "GPT-4o-mini", "messages": SAY}),
    ],
)  # fmt: skip
def test_a_body_naming_another_model_than_the_path_is_refused(fmt, path, body) -> None:
    """The provider serves the model of the path (Azure's deployment, Gemini's
    `models/{model}`); the policy must check that one, so a body naming another is
    a 400, not a model checked while another is served."""
    from extproc.providers import AzureOpenAIChat, Gemini

    parse = {"gemini": Gemini, "azure": AzureOpenAIChat}[fmt].parse_request
    with pytest.raises(RequestError) as refused:
        parse(orjson.dumps(body), path)
    assert refused.value.code == "model_mismatch" and refused.value.param == "model"


@pytest.mark.parametrize(
    ("fmt", "path", "body", "model"),
    [
        ("gemini", GEMINI_PATH, {"contents": []}, G),
        ("gemini", GEMINI_PATH, {"model": G, "contents": []}, G),
        ("gemini", GEMINI_PATH, {"model": f"models/{G}", "contents": []}, G),
        ("gemini", VERTEX_PATH, {"model": VERTEX_MODEL, "contents": []}, "gemini-2.5-pro"),
        ("azure", AZURE_PATH, {"messages": SAY}, "gpt-4o-mini"),
        ("azure", AZURE_PATH, {"model": "gpt-4o-mini", "messages": SAY}, "gpt-4o-mini"),
    ],
)  # fmt: skip
def test_the_same_model_in_both_places_is_the_model(fmt, path, body, model) -> None:
    from extproc.providers import AzureOpenAIChat, Gemini

    parse = {"gemini": Gemini, "azure": AzureOpenAIChat}[fmt].parse_request
    assert parse(orjson.dumps(body), path).model == model


# -- text fields the guards did not read -------------------------------------------------

SECRET = "4111 1111 1111 1111"
USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"n": {"type": "string", "description": SECRET}}}


@pytest.mark.parametrize(
    ("fmt", "path", "body"),
    [
        ("chat", "/v1/chat/completions", {"model": "m", "messages": USER,
                                          "prediction": {"type": "content", "content": SECRET}}),
        ("chat", "/v1/chat/completions", {"model": "m", "messages": USER, "prediction": {
            "type": "content", "content": [{"type": "text", "text": SECRET}]}}),
        ("chat", "/v1/chat/completions", {"model": "m", "messages": USER, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "description": SECRET}}}),
        ("chat", "/v1/chat/completions", {"model": "m", "messages": USER, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}),
        ("responses", "/v1/responses", {"model": "m", "input": "hi",
                                        "prompt": {"id": "p", "variables": {"v": SECRET}}}),
        ("responses", "/v1/responses", {"model": "m", "input": "hi", "prompt": {
            "id": "p", "variables": {"v": {"type": "input_text", "text": SECRET}}}}),
        ("responses", "/v1/responses", {"model": "m", "input": "hi", "text": {"format": {
            "type": "json_schema", "name": "x", "schema": SCHEMA}}}),
        ("gemini", GEMINI_PATH, {"contents": [], "generationConfig": {"responseSchema": SCHEMA}}),
        ("gemini", GEMINI_PATH, {"contents": [],
                                 "generation_config": {"response_json_schema": SCHEMA}}),
        ("bedrock", "/model/m/converse", {"messages": [],
                                          "promptVariables": {"v": {"text": SECRET}}}),
        ("bedrock", "/model/m/converse", {"messages": [],
                                          "additionalModelRequestFields": {"x": [SECRET]}}),
        ("chat", "/v1/chat/completions", {"model": "m", "messages": USER, "tools": [{
            "type": "custom", "custom": {"name": "t", "description": SECRET}}]}),
        ("chat", "/v1/chat/completions", {"model": "m", "messages": USER, "tools": [{
            "type": "custom", "custom": {"name": "t", "format": {
                "type": "grammar", "grammar": {"syntax": "lark", "definition": SECRET}}}}]}),
        ("responses", "/v1/responses", {"model": "m", "input": [{"type": "reasoning", "id": "r",
            "summary": [{"type": "summary_text", "text": SECRET}]}]}),
        ("responses", "/v1/responses", {"model": "m", "input": "hi", "tools": [{
            "type": "custom", "name": "t", "format": {"type": "grammar", "definition": SECRET}}]}),
        ("chat", "/v1/chat/completions", {"model": "m", "messages": USER,
                                          "safety_identifier": SECRET}),
        ("responses", "/v1/responses", {"model": "m", "input": "hi", "safety_identifier": SECRET}),
        ("chat", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"filename": SECRET, "file_data": "data:x;base64,AA=="}}]}]}),
        ("anthropic", "/v1/messages", {"model": "m", "max_tokens": 5, "messages": USER,
            "output_format": {"type": "json_schema", "schema": SCHEMA}}),
        ("gemini", GEMINI_PATH, {"contents": [{"role": "model", "parts": [
            {"executableCode": {"language": "PYTHON", "code": f"print('{SECRET}')"}}]}]}),
        ("gemini", GEMINI_PATH, {"contents": [{"role": "user", "parts": [
            {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": SECRET}}]}]}),
        ("gemini", GEMINI_PATH, {"contents": [{"role": "user", "parts": [
            {"fileData": {"mimeType": "text/plain", "fileUri": f"https://x.test/?c={SECRET}"}}]}]}),
    ],
)  # fmt: skip
def test_every_text_the_model_reads_is_a_prompt_text(fmt: str, path: str, body: dict) -> None:
    """A predicted output, a response schema's descriptions, a stored prompt's variables
    reach the model as text: a guard that skipped them let a secret through to the
    provider. Each is a prompt text, and a mask written back lands in the body."""
    from extproc.providers import (
        AnthropicMessages,
        BedrockConverse,
        Gemini,
        OpenAIChat,
        OpenAIResponses,
    )

    wire = {"chat": OpenAIChat, "responses": OpenAIResponses, "gemini": Gemini,
            "bedrock": BedrockConverse, "anthropic": AnthropicMessages}[fmt]  # fmt: skip
    info = wire.parse_request(orjson.dumps(body), path)
    assert any(SECRET in text for text in info.prompt_texts), info.prompt_texts
    masked = [text.replace(SECRET, "<CREDIT_CARD>") for text in info.prompt_texts]
    sent = wire.replace_request_texts(info, masked)
    assert SECRET.encode() not in sent and b"<CREDIT_CARD>" in sent
    assert orjson.loads(sent).keys() == body.keys()


def test_every_copy_of_content_encoding_counts() -> None:
    """Envoy joins repeated `content-encoding` headers, another proxy may pass both: a
    coding in the first copy is refused even when the last says identity."""
    from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue

    message = headers_msg({":method": "POST"}, route="v1")
    pairs = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("authorization", "Bearer key-a"),
        ("content-encoding", "gzip"),
        ("content-encoding", "identity"),
    ]
    message.request_headers.headers.CopyFrom(
        HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
    )
    from tests.test_exchange import Run
    from tests.test_models_policy import config_of as models_config

    config = models_config()
    run = Run(config)
    run.ex.policy = build_policy(config, Shared(), ENV)
    status, error = error_of(run.send(message))
    assert status == 415 and error["code"] == "unsupported_content_encoding"


# -- the client address a client-IP limit is keyed on -------------------------------------


def test_a_client_cannot_choose_its_address_with_x_forwarded_for() -> None:
    """Where Envoy sends no `source.address` (Envoy Gateway's ext_proc sends no
    attributes unless asked), the address is the X-Forwarded-For hop the proxy in
    front appended, the last one: a client rotating the first hop stays one client."""
    from google.protobuf.struct_pb2 import Struct

    from extproc import envoy_wire as wire

    seen = set()
    for spoofed in ("6.6.6.6", "7.7.7.7, 8.8.8.8", ""):
        xff = f"{spoofed}, 10.0.0.9" if spoofed else "10.0.0.9"
        message = headers_msg({":path": "/v1/chat/completions", "x-forwarded-for": xff})
        seen.add(wire.client_address(message, {"x-forwarded-for": xff}))
    assert seen == {"10.0.0.9"}
    message = headers_msg({":path": "/"})
    attrs = Struct()
    attrs.update({"source.address": "192.0.2.7:51234"})
    message.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    assert wire.client_address(message, {"x-forwarded-for": "6.6.6.6"}) == "192.0.2.7"


@pytest.mark.parametrize(
    ("path", "clean"),
    [
        ("/v1beta/models/g:generate?alt=sse;key=AIza", "/v1beta/models/g:generate"),
        ("/v1/x?a=1&b=2;api_key=sk-1", "/v1/x?a=1"),
        ("/v1/x?a=1;b=2", "/v1/x?a=1;b=2"),
    ],
)
def test_a_query_key_behind_a_semicolon_is_stripped(path: str, clean: str) -> None:
    """Frameworks that split the query on `;` too read `key` here: it never goes
    upstream or into a log (the whole `&` parameter holding it is dropped)."""
    from extproc.policy.credentials import strip_query_credentials

    assert strip_query_credentials(path) == clean
