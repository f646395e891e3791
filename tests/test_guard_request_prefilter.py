"""The request guard's pre-checks: one RE2 search over a request's texts joined
(anywhere.py) that clears every detector of the plan, and per text, an (ASCII)
normalised view in which the prefilter finds nothing is not searched by the exact
patterns. On random prompts built from pieces of every detection and its near misses,
the findings and the masked texts must be the same as with the exact search alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extproc.config import GuardConfig, GuardPatternConfig, GuardsConfig
from extproc.policy.guards import detectors as det
from extproc.policy.guards.anywhere import anywhere, nothing_anywhere
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


# Every built-in detector and a keyword list: the plan's search over the texts joined.
BUILTINS = [*(det.builtin(name) for name in det.DETECTORS), det.keywords(["project falcon"])]
BUILTIN_PLAN = GuardSet(
    GuardsConfig(
        rules=(
            GuardConfig(name="no-secrets", action="reject", detectors=det.expand(["secrets"])),
            GuardConfig(name="pii", action="mask", detectors=tuple(det.DETECTORS[:8])),
            GuardConfig(name="words", action="log", keywords=("project falcon", "c++")),
        )
    )
).plan("request", "r", "")
ANYWHERE = anywhere(d for _, g in BUILTIN_PLAN.groups for d in g.scanner.detectors)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TEXTS)
def test_nothing_anywhere_means_the_exact_scan_finds_nothing(texts: list[str]) -> None:
    """Where the joined search clears the texts, the exact scan (each text, and the
    texts joined) finds nothing and masks nothing: skipping it changes no answer."""
    cleared = nothing_anywhere(ANYWHERE, texts)
    event(f"cleared: {cleared}")
    if not cleared:
        return
    assert _scan(_exact(BUILTIN_PLAN), texts) == (texts, {}, {}, None)


def test_the_joined_search_covers_every_builtin_and_clears_plain_prose() -> None:
    assert ANYWHERE is not None and anywhere(BUILTINS) is not None
    prose = ["You are a helpful assistant.", "Write a short poem about a gateway."]
    assert nothing_anywhere(ANYWHERE, prose)
    # A secret in any one text, one split over two texts, a keyword in another case.
    assert not nothing_anywhere(ANYWHERE, [*prose, "my key sk-" + "a1" * 12])
    assert not nothing_anywhere(ANYWHERE, ["card 4111 1111", " 1111 1111"])
    assert not nothing_anywhere(ANYWHERE, ["about PROJECT Falcon"])
    # A card in full-width digits is seen in the normalised view.
    assert not nothing_anywhere(ANYWHERE, ["card \uff14\uff11\uff11\uff11 1111 1111 1111"])


def test_an_operator_re2_pattern_gets_no_joined_search() -> None:
    """An RE2 pattern may hold anchors that depend on where a text starts: the plan
    falls back to the per-text checks."""
    assert anywhere([*BUILTINS, det.custom("EMPLOYEE_ID", r"^EMP-\d{6}")]) is None
    assert PLAN.mask is not None
    assert anywhere(PLAN.mask.scanner.detectors) is None  # it has employee_id


@pytest.mark.parametrize("planted", [None, "sk-" + "b2" * 12])
def test_the_stage_scans_only_what_the_joined_search_could_not_clear(
    planted: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from extproc.policy import guards as guards_module
    from tests.test_exchange import CHAT
    from tests.test_guard_stage import guarded

    scanned = []
    real = guards_module.scan_steps

    def spy(*args):  # type: ignore[no-untyped-def]
        scanned.append(args[1])
        return real(*args)

    monkeypatch.setattr(guards_module, "scan_steps", spy)
    run = guarded(GuardConfig(name="no-secrets", action="reject", detectors=("secrets",)))
    content = "a plain prompt" if planted is None else f"a prompt with {planted}"
    _, answer = run.request({**CHAT, "messages": [{"role": "user", "content": content}]})
    if planted is None:
        assert scanned == [] and not answer.HasField("immediate_response")
    else:
        assert scanned == [[content]]
        assert answer.immediate_response.status.code == 403  # the guard default
