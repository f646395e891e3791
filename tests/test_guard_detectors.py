"""Built-in detectors find what they claim and validate it (Luhn, IBAN checksums, SSN
ranges...); operators' patterns run on RE2; viable-prefix regexes accept every prefix
of every match, which is what lets the stream masker hold back so little."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.policy.guards import detectors as det
from extproc.policy.guards.prefix import Unsupported, analyse, emit
from extproc.policy.guards.scanner import Scanner


def found(name: str, text: str) -> list[str]:
    detector = det.builtin(name)
    return [text[h.start : h.end] for h in Scanner([detector], 16384).find_all(text)]


@pytest.mark.parametrize(
    "number",
    [
        "4111 1111 1111 1111",  # Visa test number
        "4111-1111-1111-1111",
        "4111111111111111",
        "5555 5555 5555 4444",  # Mastercard
        "2223 0031 2200 3222",  # Mastercard 2-series
        "3782 822463 10005",  # Amex, 4-6-5 grouping
        "6011 1111 1111 1117",  # Discover
        "3530 1113 3330 0000",  # JCB
        "6200 0000 0000 0005",  # UnionPay
    ],
)
def test_credit_card_valid(number):
    assert found("credit_card", f"card: {number}, thanks") == [number]


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # Luhn fails
        "4111 1111-1111 1111",  # mixed separators
        "0000 0000 0000 0000",  # passes Luhn, no issuer
        "1234 5678 9012 3456",
        "41111111111111111111",  # 20 digits
        "order 4111111111111111234 shipped",  # part of a longer number
        "9111 1111 1111 1111",
    ],
)
def test_credit_card_invalid(text):
    assert found("credit_card", text) == []


def test_luhn():
    assert det.luhn("79927398713")
    assert not det.luhn("79927398710")


@pytest.mark.parametrize("ssn", ["123-45-6789", "001-01-0001", "899 99 9999", "078-05-1120"])
def test_ssn_valid_ranges(ssn):
    assert found("us_ssn", f"SSN {ssn}.") == [ssn]


@pytest.mark.parametrize(
    "ssn",
    [
        "000-12-3456",  # area 000
        "666-12-3456",  # area 666
        "900-12-3456",  # area 9xx (ITINs)
        "123-00-4567",  # group 00
        "123-45-0000",  # serial 0000
        "123-45 6789",  # mixed separators
        "123456789",  # bare: too often something else
        "1123-45-6789",
    ],
)
def test_ssn_invalid(ssn):
    assert found("us_ssn", ssn) == []


@pytest.mark.parametrize(
    "email", ["john.doe@example.com", "a+b@mail.example.co.uk", "x_y%z@sub-domain.io"]
)
def test_email(email):
    assert found("email", f"write to {email}.") == [email]


@pytest.mark.parametrize("text", ["not an email@", "@handle", "a@b", "user@localhost"])
def test_not_email(text):
    assert found("email", text) == []


@pytest.mark.parametrize(
    "phone",
    [
        "+14155552671",
        "+1 415-555-2671",
        "+1 (415) 555-2671",
        "+44 20 7946 0958",
        "+33 1 23 45 67 89",
        "(415) 555-2671",
        "415-555-2671",
        "415.555.2671",
        "1-800-555-0199",
        "020 7946 0958",
        "01 23 45 67 89",
        "07700 900123",
    ],
)
def test_phone_forms(phone):
    assert found("phone", f"call {phone} now") == [phone]


@pytest.mark.parametrize(
    "text",
    ["2023-01-15", "05-12-2023 10", "version 1.2.3", "call 555-1234", "+12", "415-555-26710"],
)
def test_not_phone(text):
    assert found("phone", text) == []


@pytest.mark.parametrize(
    "iban",
    [
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "GB82 WEST 1234 5698 7654 32",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NO93 8601 1117 947",
    ],
)
def test_iban_valid_checksum(iban):
    assert found("iban", f"IBAN: {iban}.") == [iban]


@pytest.mark.parametrize(
    "iban",
    [
        "DE89 3704 0044 0532 0130 01",  # checksum fails
        "DE89 3704 0044 0532 0130",  # wrong length for DE
        "ZZ89 3704 0044 0532 0130 00",  # no such country
    ],
)
def test_iban_invalid(iban):
    assert found("iban", iban) == []


def test_iban_checksum_function():
    assert det.iban_checksum("GB82WEST12345698765432")
    assert not det.iban_checksum("GB82WEST12345698765433")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("host 192.168.1.1.", ["192.168.1.1"]),
        ("10.0.0.255 and 8.8.8.8", ["10.0.0.255", "8.8.8.8"]),
        ("256.1.1.1", []),
        ("1.2.3", []),
        ("1.2.3.4.5", []),
    ],
)
def test_ipv4(text, want):
    assert found("ipv4", text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("addr 2001:db8::1 ok", ["2001:db8::1"]),
        ("::ffff:10.0.0.1", ["::ffff:10.0.0.1"]),
        ("fe80::1ff:fe23:4567:890a.", ["fe80::1ff:fe23:4567:890a"]),
        ("at 10:30:00", []),
        ("std::vector", []),
        ("00:1A:2B:3C:4D:5E", []),  # a MAC address
    ],
)
def test_ipv6(text, want):
    assert found("ipv6", text) == want


def test_secrets():
    assert found("aws_access_key", "key AKIAIOSFODNN7EXAMPLE here") == ["AKIAIOSFODNN7EXAMPLE"]
    assert found("aws_access_key", "AKIAIOSFODNN7EXAMPL") == []
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_abc-123"
    assert found("bearer_token", f"Authorization: Bearer {token}") == [token]
    assert found("bearer_token", "the bearer of bad news") == []
    openai = "sk-proj-" + "A1b2C3d4" * 6
    anthropic = "sk-ant-api03-" + "x" * 90 + "-AA"
    assert found("api_key", f"use {openai} or {anthropic}") == [openai, anthropic]
    assert found("api_key", "task-manager sk-short") == []
    pem = "\n".join(
        [
            "-----BEGIN RSA PRIVATE KEY-----",
            "MIIEowIBAAKCAQEA",
            "q1w2e3r4=",
            "-----END RSA PRIVATE KEY-----",
        ]
    )
    assert found("private_key", f"here:\n{pem}\nthanks") == [pem]
    cut = "-----BEGIN PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nq1w2"
    assert found("private_key", cut + ". the end") == [cut]


def test_aliases_expand_in_order_without_duplicates():
    assert det.expand(["ip_address", "ipv4", "secrets"]) == [
        "ipv4",
        "ipv6",
        "aws_access_key",
        "private_key",
        "bearer_token",
        "api_key",
    ]


def test_keywords_whole_words_and_case():
    detector = det.keywords(["Project Falcon", "zeta"])
    hits = Scanner([detector], 1024).find_all("project falcon; ZETA, zetas, alphazeta")
    assert [(h.start, h.end) for h in hits] == [(0, 14), (16, 20)]
    strict = det.keywords(["zeta"], case_sensitive=True)
    hits = Scanner([strict], 1024).find_all("ZETA zeta")
    assert [(h.start, h.end) for h in hits] == [(5, 9)]


def test_custom_pattern_is_re2_and_refused_with_reason():
    detector = det.custom("EMPLOYEE_ID", r"EMP-\d{6}")
    assert detector.engine == "re2" and detector.width == 10 and detector.viable is not None
    with pytest.raises(det.PatternError, match=r"RE2 cannot compile it: .*\(\?="):
        det.custom("X", r"a(?=b)")
    with pytest.raises(det.PatternError, match=r"backreference|invalid escape"):
        det.custom("X", r"(a)\1")
    with pytest.raises(det.PatternError, match="empty string"):
        det.custom("X", r"a*")


def test_re2_only_syntax_falls_back_to_width():
    detector = det.custom("WORDS", r"[[:alpha:]]{3}\d", max_length=4)
    assert detector.viable is None and detector.width == 4
    assert Scanner([detector], 64).find_all("xx abc1") != []


def test_catastrophic_pattern_is_linear_on_re2():
    # (a+)+$ takes exponential time on a backtracking engine; RE2 answers at once.
    detector = det.custom("X", r"(a+)+$")
    assert detector.regex.search("a" * 5000 + "!") is None


# --------------------------------------------------------------------------- prefix


_ROUND_TRIP = [
    r"EMP-\d{6}",
    r"(?i:ab)c|d+e?",
    r"[^a-c\w]x{2,5}?",
    r"\bfoo\b",
    r"a|ab|abc",
    r"(x|y)*z",
    r"(?i)\u00e9T\.",
]


@settings(max_examples=100, deadline=None)
@given(pattern=st.sampled_from(_ROUND_TRIP), text=st.text(alphabet="abcdexyzEMPT-.1 \u00e9f"))
def test_emit_matches_what_the_pattern_matches(pattern, text):
    """Written back out from its syntax tree, a pattern finds exactly the same matches
    (on both engines): the viable-prefix regex is built from the same writer."""
    want = [m.span() for m in re.finditer(pattern, text)]
    assert [m.span() for m in re.finditer(emit(pattern, "py"), text)] == want
    if not re.search(r"\\[wb]", pattern):  # RE2's \w and \b are ASCII-only, Python's not
        regex = det.compile_re2(emit(pattern, "re2"))
        assert [m.span() for m in regex.finditer(text)] == want


def test_unreadable_patterns_are_refused():
    for pattern in (r"[[:alpha:]]", r"\pL", r"a{,3}", r"(a)\1"):
        with pytest.raises(Unsupported):
            shape = analyse(pattern, "re2")
            det.compile_re2(shape.viable)
            raise Unsupported("compiled")  # \1 parses in Python: RE2 must refuse it


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(sorted(det._BUILTIN)),
    noise=st.text(alphabet="ab1 -.:@+(", max_size=8),
    data=st.data(),
)
def test_every_prefix_of_a_match_is_viable(name, noise, data):
    samples = {
        "credit_card": "4111 1111 1111 1111",
        "us_ssn": "123-45-6789",
        "email": "jo.doe@mail.example.com",
        "phone": "+1 (415) 555-2671",
        "iban": "GB82 WEST 1234 5698 7654 32",
        "ipv4": "192.168.10.1",
        "ipv6": "2001:db8::8a2e:370:7334",
        "aws_access_key": "AKIAIOSFODNN7EXAMPLE",
        "private_key": "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----",
        "bearer_token": "abcdefghijklmnopqrstuvwxyz",
        "api_key": "sk-ant-abcdefghijklmnopqrstuvwxyz",
    }
    prefix = "Bearer " if name == "bearer_token" else ""
    text = noise + " " + prefix + samples[name] + " " + noise
    detector = det.builtin(name)
    for hit in Scanner([detector], 16384).find_all(text):
        cut = data.draw(st.integers(hit.start + 1, hit.end))
        m = detector.viable.search(text[:cut], 0)
        assert m is not None and m.start() <= hit.start
