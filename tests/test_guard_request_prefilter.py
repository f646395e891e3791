"""The request guard's pre-check: a whole text in whose (ASCII) normalised view the RE2
prefilter finds nothing is not searched by the exact patterns. On random prompts
built from pieces of every detection and its near misses, the findings and the masked
texts must be the same as with the exact search alone."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import GuardConfig, GuardPatternConfig, GuardsConfig
from extproc.policy.guards import detectors as det
from extproc.policy.guards.engine import Findings, GuardSet, Plan, scan_texts
from extproc.policy.guards.scanner import find_hits

RULES = (
    GuardConfig(name="no-secrets", action="reject", detectors=tuple(det.expand(["secrets"]))),
    GuardConfig(
        name="pii",
        action="mask",
        detectors=tuple(det.expand(["pii"])),
        patterns=(GuardPatternConfig(name="employee_id", regex=r"EMP-\d{6}"),),
    ),
    GuardConfig(name="words", action="log", keywords=("project falcon", "c++")),
)
PLAN = GuardSet(GuardsConfig(rules=RULES)).plan("request", "r", "")
# Pieces of every detection and of its near misses, ASCII and not (full-width digits,
# a no-break space and a zero-width space fold into the ASCII view; é stays).
PIECES = [
    "4111", "1111", " ", "-", ".", ":", "@", "+", "(", ")", "/", "=", "_", "\n", "0", "1",
    "2", "5", "9", "123", "45", "6789", "415", "555", "2671", "020", "7946", "DE", "89",
    "3704", "GB", "AKIA", "IOSFODNN7", "EXAMPLE", "Bearer ", "bEaReR ", "abcdefghijklmnop",
    "sk-", "proj-", "ant-", "-----BEGIN ", "RSA ", "PRIVATE KEY-----", "-----END ", "MIIE",
    "jane", "example", "org", "fe80", "::", "10.20", ".30.40", "Project", " Falcon", "c++",
    "EMP-", "004217", "x", "Z", "\u00e9", "\uff14", "\u00a0", "\u200b", "\u0664",
]  # fmt: skip
TEXTS = st.lists(
    st.lists(st.sampled_from(PIECES), max_size=20).map("".join), min_size=1, max_size=4
)


def _exact(plan: Plan) -> Plan:
    """The same plan with the prefilter taken out of every scanner."""
    groups = {}
    for action, group in plan.groups:
        scanner = type(group.scanner)(group.scanner.detectors, 256)
        scanner._pre = None
        groups[action] = replace(group, scanner=scanner)
    return replace(plan, **groups)


EXACT = _exact(PLAN)


def _scan(plan: Plan, texts: list[str]) -> tuple:
    findings = Findings()
    out = scan_texts(plan, texts, findings)
    rejected = findings.rejected
    return out, dict(findings.masked), dict(findings.logged), rejected and rejected.type


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXTS)
def test_same_findings_and_masks_with_and_without_the_pre_check(texts: list[str]) -> None:
    assert _scan(PLAN, texts) == _scan(EXACT, texts)


def test_the_pre_check_is_on_and_still_finds_what_is_there() -> None:
    """Both plans have the scanners of the config (the fast one with its prefilter),
    and a planted key, card and keyword are found through the fast one."""
    assert all(group.scanner._pre is not None for _, group in PLAN.groups)
    assert all(group.scanner._pre is None for _, group in EXACT.groups)
    texts = ["my key sk-" + "a1" * 12, "card 4111 1111 1111 1111", "about project falcon"]
    out, masked, logged, rejected = _scan(PLAN, texts)
    assert rejected == "API_KEY"
    assert masked == {("pii", "CREDIT_CARD"): 1} and out[1] == "card <CREDIT_CARD>"
    assert logged == {("words", "KEYWORD"): 1}
    assert find_hits(PLAN.reject.scanner, "nothing to see here, a plain prompt.") == []
