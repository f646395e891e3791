"""The RE2 prefilter of the guards' pre-check must match wherever an exact pattern
could: where it finds nothing, no detector may find anything (else a chunk with a
detection would go out unscanned)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.policy.guards import detectors as det
from extproc.policy.guards.prefilter import ascii_finder, prefilter
from extproc.policy.guards.scanner import Scanner

DETECTORS = [
    *(det.builtin(name) for name in det.DETECTORS),
    det.keywords(["project falcon", "c++"]),
    det.custom("EMPLOYEE_ID", r"EMP-\d{6}"),
]
SCANNER = Scanner(DETECTORS, 256)
# Pieces of every detection and of its near misses, so random texts land on the
# patterns' edges (lookbehinds, lookaheads, separators, case).
PIECES = [
    "4111", "1111", " ", "-", ".", ":", "@", "+", "(", ")", "/", "=", "_", "~", "%",
    "\n", "\t", "\x0b", "\x1c", "0", "1", "2", "5", "9", "12", "123", "45", "6789",
    "415", "555", "2671", "020", "7946", "DE", "89", "3704", "GB", "AKIA", "IOSFODNN7",
    "EXAMPLE", "Bearer ", "bEaReR ", "abcdefghijklmnop", "sk-", "proj-", "ant-",
    "-----BEGIN ", "RSA ", "PRIVATE KEY-----", "-----END ", "MIIE", "jane", "example",
    "org", "fe80", "::", "ff00", "db8", "10.20", ".30.40", "Project", " Falcon", "c++",
    "EMP-", "004217", "x", "Z", "é",
]  # fmt: skip


def test_the_builtins_have_a_prefilter():
    assert SCANNER._pre is not None
    regex, back = SCANNER._pre
    assert back >= 7  # "Bearer " before a token
    assert regex.search(" the quick brown fox, gateway lantern orbit") is None


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PIECES), max_size=24), st.integers(0, 40))
def test_no_prefilter_match_means_no_exact_candidate(pieces, pos):
    text = "".join(pieces)
    pos = min(pos, len(text))
    regex, back = SCANNER._pre
    if not text.isascii() or regex.search(text, max(0, pos - back)) is not None:
        return
    for exact in SCANNER._any:
        assert exact.search(text, pos) is None, (text, pos)
    for detector in DETECTORS:
        assert detector.regex.search(text, pos) is None, (detector.type, text, pos)


def test_an_unreadable_pattern_means_no_prefilter():
    """RE2-only syntax in a custom pattern goes in as written; a Python pattern the
    rewrite cannot read gives no prefilter at all (the exact search decides)."""
    assert prefilter([("re2", r"(?:ID\pL{3})")]) is not None
    assert prefilter([("py", r"(a)\1")]) is None  # a backreference: RE2 has none


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from([p for p in PIECES if p.isascii()]), max_size=24), st.integers(0, 60)
)
def test_the_direct_re2_call_answers_as_search_does(pieces, start):
    """`ascii_finder` (RE2's own `Match`, no wrapper) finds exactly where the public
    `search` finds (the match's start, -1 for none), on the ASCII texts the pre-check
    gives it (a google-re2 version that changed what `Match` returns fails here, not
    in a leaked detection)."""
    text = "".join(pieces)
    start = min(start, len(text))
    regex, _ = SCANNER._pre
    found = ascii_finder(regex)
    m = regex.search(text, start)
    assert found(text.encode(), start, len(text))[0][0] == (-1 if m is None else m.start()), (
        text,
        start,
    )


def test_the_direct_re2_call_can_say_yes_and_no():
    regex, _ = SCANNER._pre
    found = ascii_finder(regex)
    call, prose = b"call 415-555-2671 now", b" the quick brown fox, gateway lantern orbit"
    assert found(call, 0, len(call))[0][0] == 4
    assert found(call, 17, len(call))[0][0] == -1  # the number is before `start`
    assert found(prose, 0, len(prose))[0][0] == -1
