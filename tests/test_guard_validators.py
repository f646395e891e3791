"""The validators behind the built-in detectors, tested directly so that no security
check can be weakened unnoticed: Luhn catches every single-digit change, each card
network has exactly its lengths (13 digits at least), SSN ranges end where the SSA's
rules end, IBAN mod-97 catches every changed digit; and the fast validators agree
with the plain definitions on any candidate."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.policy.guards import detectors as det
from extproc.policy.guards.scanner import Scanner

VALID_CARDS = [
    "4111111111111111",  # Visa 16
    "4222222222222",  # Visa 13
    "5555555555554444",  # Mastercard
    "2223003122003222",  # Mastercard 2-series
    "378282246310005",  # Amex
    "6011111111111117",  # Discover
    "30569309025904",  # Diners 14
    "3530111333300000",  # JCB
    "6200000000000005",  # UnionPay
]


def found(name: str, text: str) -> list[str]:
    detector = det.builtin(name)
    return [text[h.start : h.end] for h in Scanner([detector], 16384).find_all(text)]


def reference_luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def with_check_digit(body: str) -> str:
    """`body` plus the one digit that makes it pass Luhn."""
    return next(body + d for d in "0123456789" if reference_luhn(body + d))


# --------------------------------------------------------------------------- Luhn


@pytest.mark.parametrize("number", VALID_CARDS)
def test_luhn_accepts_valid_numbers_and_rejects_every_single_digit_change(number):
    assert det.luhn(number) and det.valid_card(number)
    for at, old in enumerate(number):
        for new in "0123456789":
            if new == old:
                continue
            changed = number[:at] + new + number[at + 1 :]
            assert not det.luhn(changed), changed  # a change by 5 must fail too (% 10)
            assert det.card_prefix(changed) == 0, changed
    grouped = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    assert found("credit_card", f"pay {grouped} now") == [grouped]


def test_changed_card_is_not_masked():
    assert found("credit_card", "4111 1111 1111 1116") == []  # off by 5 in the last digit
    assert found("credit_card", "4111 1111 1111 1111") == ["4111 1111 1111 1111"]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789", min_size=1, max_size=40))
def test_luhn_is_the_plain_definition(digits):
    assert det.luhn(digits) == reference_luhn(digits)


# --------------------------------------------------------------------------- card lengths

# issuer prefix -> lengths it allows (13..19: shorter is never a card)
NETWORKS = {
    "4": {13, 16, 19},  # Visa
    "51": {16},  # Mastercard
    "55": {16},
    "2221": {16},
    "2720": {16},
    "34": {15},  # Amex
    "37": {15},
    "6011": {16, 17, 18, 19},  # Discover
    "65": {16, 17, 18, 19},
    "644": {16, 17, 18, 19},
    "300": {14, 15, 16, 17, 18, 19},  # Diners
    "36": {14, 15, 16, 17, 18, 19},
    "3528": {16, 17, 18, 19},  # JCB
    "3589": {16, 17, 18, 19},
    "62": {16, 17, 18, 19},  # UnionPay
    "50": {13, 14, 15, 16, 17, 18, 19},  # Maestro
    "56": {13, 14, 15, 16, 17, 18, 19},
}
NOT_ISSUERS = ["1", "2220", "2721", "33", "35", "7", "8", "9", "0"]


@pytest.mark.parametrize(("prefix", "lengths"), sorted(NETWORKS.items()))
def test_each_network_has_exactly_its_lengths(prefix, lengths):
    for n in range(10, 22):
        number = with_check_digit(prefix + "0" * (n - len(prefix) - 1))
        want = n in lengths
        assert det.valid_card(number) is want, (number, n)
        assert (det.card_prefix(number) == n) is want, (number, n)
        assert (found("credit_card", f"card {number}.") == [number]) is want, (number, n)


@pytest.mark.parametrize("prefix", NOT_ISSUERS)
def test_numbers_outside_every_issuer_range_are_not_cards(prefix):
    for n in range(13, 20):
        number = with_check_digit(prefix + "0" * (n - len(prefix) - 1))
        assert not det.valid_card(number) and det.card_prefix(number) == 0, number


def test_twelve_digits_are_never_a_card():
    maestro12 = with_check_digit("50" + "1" * 9)  # Maestro's range would allow 12
    assert len(maestro12) == 12 and det.luhn(maestro12)
    assert not det.valid_card(maestro12)
    assert det.card_prefix(maestro12) == 0
    assert found("credit_card", maestro12) == []


def test_card_prefix_keeps_the_longest_valid_prefix_at_a_group_end():
    assert det.card_prefix("4111 1111 1111 1111 12") == 19
    assert det.card_prefix("4111-1111-1111-1111-1234") == 19
    assert det.card_prefix("4111 1111 1111 1111-12") == 19  # the dash only after the card
    assert det.card_prefix("4111 1111-1111 1111") == 0  # mixed inside the card
    assert det.card_prefix("4111 1111 1111 11112") == 0  # no group ends after 16 digits


def valid_card_reference(text: str) -> int:
    """The plain definition: the candidate, then cut at each last separator."""
    while True:
        if det.valid_card(text):
            return len(text)
        cut = max(text.rfind(" "), text.rfind("-"))
        if cut <= 0:
            return 0
        text = text[:cut]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(alphabet="0123456789", min_size=1, max_size=6), st.sampled_from(" -")),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from(["4", "5", "37", "6011", "3", "2", "62"]),
)
def test_card_prefix_agrees_with_the_plain_definition(groups, start):
    text = start + "".join(g + s for g, s in groups)[:-1]
    digits = sum(ch.isdigit() for ch in text)
    if not 13 <= digits <= 19:
        return
    assert det.card_prefix(text) == valid_card_reference(text)


# --------------------------------------------------------------------------- SSN


@pytest.mark.parametrize(
    ("ssn", "valid"),
    [
        ("001-01-0001", True),
        ("000-01-0001", False),  # area 000
        ("665-01-0001", True),
        ("666-01-0001", False),  # area 666
        ("667-01-0001", True),
        ("899-99-9999", True),
        ("900-01-0001", False),  # 9xx: ITINs
        ("999-99-9999", False),
        ("123-00-4567", False),  # group 00
        ("123-01-4567", True),
        ("123-99-4567", True),
        ("123-45-0000", False),  # serial 0000
        ("123-45-0001", True),
        ("123-45-9999", True),
        ("123 45 6789", True),
        ("123-45 6789", False),  # mixed separators
    ],
)
def test_ssn_ranges_edge_by_edge(ssn, valid):
    assert det.valid_ssn(ssn) is valid
    assert (found("us_ssn", f"ssn {ssn}.") == [ssn]) is valid


# --------------------------------------------------------------------------- IBAN

VALID_IBANS = [
    "DE89370400440532013000",
    "GB82WEST12345698765432",
    "FR1420041010050500013M02606",
    "NO9386011117947",
]


@pytest.mark.parametrize("iban", VALID_IBANS)
def test_iban_mod97_rejects_every_changed_character(iban):
    assert det.iban_checksum(iban) and det.valid_iban(iban)
    for at in range(2, len(iban)):  # the country code is checked by its length table
        old = iban[at]
        for new in "0123456789" if old.isdigit() else "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
            if new == old:
                continue
            changed = iban[:at] + new + iban[at + 1 :]
            assert not det.iban_checksum(changed), changed
            assert det.iban_prefix(changed) == 0, changed
    grouped = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
    assert found("iban", f"IBAN {grouped}.") == [grouped]
    assert det.iban_prefix(grouped + " 12") == len(grouped)  # a number after it


def test_iban_length_is_the_countrys():
    assert not det.valid_iban("DE8937040044053201300")  # one short
    assert det.iban_prefix("DE89 3704 0044 0532 0130 0") == 0
    assert det.iban_prefix("ZZ89 3704 0044 0532 0130 00") == 0  # no such country
    assert det.iban_checksum("gb82west12345698765432")  # letters in either case
    with pytest.raises(ValueError):
        det.iban_checksum("GB82-WEST")


def valid_iban_reference(text: str) -> int:
    while True:
        if det.valid_iban(text):
            return len(text)
        cut = text.rfind(" ")
        if cut <= 0:
            return 0
        text = text[:cut]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(VALID_IBANS),
    st.lists(st.text(alphabet="0123A", min_size=1, max_size=4), max_size=3),
    st.integers(0, 3),
)
def test_iban_prefix_agrees_with_the_plain_definition(iban, extra, flip):
    grouped = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
    if flip:
        at = len(grouped) - flip - 1
        if grouped[at].isdigit():
            grouped = grouped[:at] + str((int(grouped[at]) + 1) % 10) + grouped[at + 1 :]
    text = " ".join([grouped, *extra])
    assert det.iban_prefix(text) == valid_iban_reference(text)
