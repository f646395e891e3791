"""`Scanner.quiet`'s tail check: one search per engine over every detector that can end
in a text's last character must say what one search per detector, each from its own
window, says (`_hold`'s per-detector loop is the reference). Else a chunk whose tail may
still become a match would be released unheld, or a plain chunk scanned for nothing."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.policy.guards import detectors as det
from extproc.policy.guards.scanner import Scanner
from tests.test_guard_prefilter import PIECES

DETECTORS = [
    *(det.builtin(name) for name in det.DETECTORS),
    det.keywords(["project falcon", "c++"]),  # case-insensitive: flags scoped in the union
    det.custom("EMPLOYEE_ID", r"EMP-\d{6}"),  # RE2: its own union
    det.custom("TICKET", r"(?i)tk-[a-z]{2}\d{3}"),
]
SCANNERS = [Scanner(DETECTORS, 256), Scanner(DETECTORS, 24), Scanner(DETECTORS[:3], 256)]


def viable_tail(scanner: Scanner, text: str, pos: int) -> bool | None:
    """The reference: any detector whose alphabet has the last character, searched from
    its own window, finds a viable tail (None: one holds its width)."""
    n, last = len(text), text[-1]
    for detector, window in zip(scanner.detectors, scanner.windows, strict=True):
        if detector.alphabet is not None and last not in detector.alphabet:
            continue
        if detector.viable is None:
            return None
        m = detector.viable.search(text, max(pos, n - window))
        if m is not None and m.start() < n:
            return True
    return False


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=24), st.integers(0, 40),
       st.sampled_from(range(len(SCANNERS))))  # fmt: skip
def test_one_search_per_engine_finds_what_each_detector_finds(pieces, pos, which):
    scanner = SCANNERS[which]
    text = "".join(pieces)
    if not text or not text[-1].isascii():
        return  # a non-ASCII last character takes `_hold` itself
    pos = min(pos, len(text) - 1)
    tail = viable_tail(scanner, text, pos)
    unmatched = scanner._unmatched(text, pos)
    assert scanner.quiet(text, pos) is (tail is False and unmatched), (text, pos)


def test_a_plain_word_is_quiet_and_a_key_prefix_is_not():
    # No email detector: any word may begin an address, so no word would be quiet.
    scanner = Scanner([d for d in DETECTORS if d.type != "EMAIL"], 256)
    text = "between river lantern orbit maple quartz"
    assert scanner.quiet(text, 20)
    assert not scanner.quiet(text + " sk-pr", 20)  # an API key may follow
    assert not scanner.quiet(text + " PROJECT FAL", 20)  # the keyword, any case
    assert not scanner.quiet(text + " EMP-00", 20)  # the RE2 pattern's viable tail


def test_plain_prose_is_decided_by_the_one_re2_search():
    """The quick check in front of the exact searches finds nothing in prose ending in
    any letter (else every chunk would pay the exact searches over its whole window),
    and what it finds (a key prefix, or a lookbehind's character before an empty tail)
    is left to them, which still say quiet where nothing can match."""
    scanner = Scanner([d for d in DETECTORS if d.type not in ("EMAIL", "TICKET")], 256)
    prose = "between river lantern orbit maple quartz gateway"  # `t` may begin a TICKET
    for last in "abcdefghijklmnopqrstuvwxyz":
        first = scanner.tails[last][2]
        text = prose + last
        assert first(text.encode(), 0, len(text))[0][0] in (-1, len(prose) + 1), (
            last
        )  # none, or empty at the end
    first = scanner.tails[" "][2]
    assert first((prose + " ").encode(), 0, len(prose) + 1)[0][0] == len(
        prose
    )  # a card number may begin after a space
    assert scanner.quiet(prose + " ", 0)
    assert not scanner.quiet(prose + " sk-proj", 0)
