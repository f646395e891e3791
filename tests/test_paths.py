"""Path classification: one reading per path, or a refusal (extproc/paths.py)."""

from __future__ import annotations

import pytest

from extproc.paths import PathRefused, canonical, looks_like_api, matches

CANONICAL = [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat/completions/", "/v1/chat/completions/"),  # trailing '/' read as the API
    ("/v1/chat/completions?x=/../a%2Fb", "/v1/chat/completions?x=/../a%2Fb"),  # query as is
    # Bedrock model ids carry ':' which boto3 encodes; decoding it is the only reading.
    (
        "/model/amazon.nova-lite-v1%3A0/converse-stream",
        "/model/amazon.nova-lite-v1:0/converse-stream",
    ),
    ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", None),
]


@pytest.mark.parametrize(("raw", "expected"), CANONICAL)
def test_canonical_paths_are_decoded(raw: str, expected: str | None) -> None:
    assert canonical(raw) == (expected or raw)


REFUSED = [
    ("/v1/chat%2Fcompletions", "'/'"),
    ("/v1/chat%2fcompletions", "'/'"),
    ("/v1/chat%5Ccompletions", "'\\'"),
    ("/v1/chat\\completions", "'\\'"),
    ("/v1/%63hat/completions", "'c'"),  # an encoded letter
    ("/v1/chat/completions%2E", "'.'"),
    ("/v1/x/%2e%2e/chat/completions", "'.'"),
    ("/v1/chat%252Fcompletions", "'%'"),  # double encoding
    ("/v1/chat/completions%3F", "'?'"),
    ("/v1/chat/completions%23", "'#'"),
    ("/v1/chat;x=1/completions", "';'"),
    ("/v1/chat/completions;a", "';'"),
    ("/v1//chat/completions", "empty segments"),
    ("/v1/x/../chat/completions", "'..'"),
    ("/v1/chat/./completions", "'.'"),
    ("/v1/chat/completions/.", "'.'"),
    ("/v1/chat/completions%zz", "invalid percent-encoding"),
    ("/v1/chat/completions%4", "invalid percent-encoding"),
    ("/v1/chat completions", "space"),
    ("/v1/chat/compl\u00e9tions", "non-ASCII"),
    ("v1/chat/completions", "start with '/'"),
]


@pytest.mark.parametrize(("raw", "why"), REFUSED)
def test_ambiguous_paths_are_refused_saying_why(raw: str, why: str) -> None:
    with pytest.raises(PathRefused) as info:
        canonical(raw)
    assert why in str(info.value)


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", True),
        ("/v1/CHAT/Completions/", True),
        ("/v1/Responses", True),
        ("/anthropic/v1/MESSAGES", True),
        ("/v1beta/models/x:STREAMGENERATECONTENT", True),
        ("/model/m/Converse-Stream", True),
        ("/v1/embeddings", False),
        ("/v1/models?next=/chat/completions", False),
        ("/v1/responses/resp_1/input_items", False),
    ],
)
def test_api_paths_are_recognised_in_any_case(path: str, api: bool) -> None:
    assert looks_like_api(path) is api


def test_passthrough_patterns_are_exact_or_trailing_star_prefixes() -> None:
    patterns = ("/v1/embeddings", "/v1/files*")
    assert matches("/v1/embeddings", patterns)
    assert matches("/v1/embeddings/?x=1", patterns)
    assert not matches("/v1/embeddings/x", patterns)
    assert not matches("/v1/embeddingsx", patterns)
    assert matches("/v1/files", patterns) and matches("/v1/files/f-1/content", patterns)
    assert not matches("/v1/file", patterns)
    assert not matches("/v1/embeddings", ())


def test_the_plain_path_check_answers_as_the_character_walk() -> None:
    """`canonical`'s fast check passes only paths the walk gives back unchanged."""
    import random

    from extproc.paths import _PLAIN, _canonical

    def walk(raw: str) -> str | type:
        try:
            return _canonical(raw)
        except PathRefused:
            return PathRefused

    def fast(raw: str) -> str | type:
        try:
            return canonical(raw)
        except PathRefused:
            return PathRefused

    rng = random.Random(14)
    segments = [
        "v1",
        "chat",
        "completions",
        "a",
        ":gen",
        "x:y",
        "-",
        "_",
        "~",
        ".x",
        "a.",
        "..",
        ".",
        "%2F",
        "%41",
        "%zz",
        "#",
        ";",
        "é",
    ]
    segments += ["", "\\", " ", "\n", "a?b", "?q=1/.."]
    raws = [
        rng.choice(["/", "/", "", "x"])
        + "/".join(rng.choice(segments) for _ in range(rng.randint(1, 5)))
        + rng.choice(["", "", "/", "?alt=sse", "?a=%zz/../"])
        for _ in range(5000)
    ]
    raws += ["/v1/chat/completions", "/v1/", "/models/gemini:streamGenerateContent?alt=sse"]
    plain = [raw for raw in raws if _PLAIN.fullmatch(raw)]
    assert len(plain) > 500  # the fast check is exercised, and refuses the rest
    assert [fast(raw) for raw in raws] == [walk(raw) for raw in raws]
    assert all(walk(raw) == raw for raw in plain)
