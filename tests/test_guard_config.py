"""The guards: section: every mistake is reported with file, key and reason; RE2
refusals carry RE2's own reason."""

from __future__ import annotations

import pytest

from extproc.config import ConfigError, parse_config

BASE = {
    "providers": {"mock": {"url": "http://127.0.0.1:9000"}},
    "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
}


def parse(guards, **extra):
    return parse_config({**BASE, **extra, "guards": guards}, "policy.yaml")


def problems(guards, **extra) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse(guards, **extra)
    return err.value.lines()


def test_full_example_parses_with_defaults():
    config = parse(
        {
            "max_holdback_chars": 4096,
            "rules": [
                {
                    "name": "pii",
                    "detectors": ["pii", "api_key", "email"],
                    "patterns": [
                        {"name": "employee-id", "regex": r"EMP-\d{6}", "mask_token": "[EMP]"}
                    ],
                    "keywords": ["Project Falcon"],
                },
                {
                    "name": "no-secrets",
                    "action": "reject",
                    "detectors": ["secrets"],
                    "phases": ["response"],
                    "routes": ["v1"],
                    "reject": {"status": 451, "code": "secret_found"},
                },
                {
                    "name": "moderation",
                    "webhook": {"url": "grpc://127.0.0.1:7000", "failure": "open"},
                },
            ],
        }
    )
    pii, secrets, hook = config.guards.rules
    assert config.guards.max_holdback_chars == 4096
    assert pii.action == "mask" and pii.phases == ("request", "response")
    assert pii.detectors == (
        "credit_card",
        "us_ssn",
        "email",
        "phone",
        "iban",
        "ipv4",
        "ipv6",
        "api_key",
    )
    assert pii.mask_token == "<{type}>" and pii.patterns[0].mask_token == "[EMP]"
    assert secrets.reject.status == 451 and secrets.reject.message is None
    assert hook.phases == ("request",) and hook.webhook.timeout_ms == 500
    assert hook.webhook.failure == "open"


def test_no_guards_section_means_no_rules():
    assert parse_config(BASE, "p.yaml").guards.rules == ()


def test_re2_refusal_names_the_key_and_the_reason():
    lines = problems({"rules": [{"name": "g", "patterns": [{"name": "x", "regex": "(?<=a)b"}]}]})
    assert lines == [
        "policy.yaml: guards.rules[0].patterns[0].regex: RE2 cannot compile it: "
        "invalid perl operator: (?<="
    ]


def test_every_mistake_is_reported():
    lines = problems(
        {
            "rules": [
                {"name": "a", "detectors": ["credit_cards"], "action": "block"},
                {"name": "a", "keywords": []},
                {"name": "c"},
                {"name": "d", "webhook": {"url": "ftp://x"}, "keywords": ["k"]},
                {"name": "e", "webhook": {"url": "http://h/x"}, "phases": ["response"]},
                {"name": "f", "keywords": ["k"], "consumers": ["bob"], "routes": ["nope"]},
                {"name": "g", "patterns": [{"name": "p", "regex": "x*"}]},
                {"name": "h", "keywords": ["k"], "reject": {"status": 200}, "mask_tokn": "x"},
            ]
        }
    )
    text = "\n".join(lines)
    assert (
        "guards.rules[0].detectors[0]: unknown detector 'credit_cards' "
        "(did you mean 'credit_card'?)" in text
    )
    assert "guards.rules[0].action: unknown action 'block' (known: mask, reject, log)" in text
    assert "guards.rules[1].keywords: expected a non-empty list of strings" in text
    assert "guards.rules[1].name: duplicate guard name 'a' (also guards.rules[0])" in text
    assert "guards.rules[2]: set detectors, patterns, keywords or webhook" in text
    assert "guards.rules[3]: a webhook guard does its own detection; remove keywords" in text
    assert "guards.rules[3].webhook.url: expected http(s)://host[:port]/path or grpc(s)://" in text
    assert "guards.rules[4].phases: a webhook guard checks requests only" in text
    assert (
        "guards.rules[5].consumers[0]: unknown consumer 'bob' "
        "(known: none: there is no consumers: section)" in text
    )
    assert "guards.rules[5].routes[0]: unknown route 'nope' (known: v1)" in text
    assert "guards.rules[6].patterns[0].regex: it matches the empty string" in text
    assert "guards.rules[7].reject.status: must be at least 400, got 200" in text
    assert "guards.rules[7].mask_tokn: unknown key 'mask_tokn' (did you mean 'mask_token'?)" in text


def test_rules_are_required_and_holdback_bounded():
    assert problems({"max_holdback_chars": 10}) == [
        "policy.yaml: guards.max_holdback_chars: must be at least 64, got 10",
        "policy.yaml: guards.rules: required key is missing",
    ]


def test_scan_budget_defaults_and_values():
    rules = [{"name": "pii", "detectors": ["pii"]}]
    defaults = parse({"rules": rules}).guards
    assert (defaults.scan_budget_chars, defaults.scan_budget_ms) == (2 << 20, 1000)
    assert defaults.scan_budget_status == 413
    got = parse(
        {
            "rules": rules,
            "scan_budget_chars": 100_000,
            "scan_budget_ms": 250,
            "scan_budget_status": 400,
        }
    ).guards
    assert (got.scan_budget_chars, got.scan_budget_ms, got.scan_budget_status) == (
        100_000,
        250,
        400,
    )


def test_bad_scan_budget_values_are_refused_with_key_and_reason():
    rules = [{"name": "pii", "detectors": ["pii"]}]
    bad = {
        "rules": rules,
        "scan_budget_chars": 10,
        "scan_budget_ms": 0,
        "scan_budget_status": 404,
    }
    assert problems(bad) == [
        "policy.yaml: guards.scan_budget_chars: must be at least 1024, got 10",
        "policy.yaml: guards.scan_budget_ms: expected a positive integer, got 0",
        "policy.yaml: guards.scan_budget_status: expected 413 or 400, got 404",
    ]
    assert problems({"rules": rules, "scan_budget_status": True}) == [
        "policy.yaml: guards.scan_budget_status: expected 413 or 400, got true"
    ]
    assert problems({"rules": rules, "scan_budget_ms": "1s"}) == [
        "policy.yaml: guards.scan_budget_ms: expected an integer, got '1s'"
    ]
