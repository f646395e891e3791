"""What a guard looks for: built-in detectors that validate what they match (Luhn, IBAN
checksums, SSN ranges...), operators' RE2 patterns and keyword lists.

A `Detector` is a compiled regex plus what the stream masker needs to know about it:
its viable-prefix regex (`prefix.py`), its maximum width and how far past a match's
end it looks. Built-in patterns are ours, written for Python's `re` with bounded
repeats and a lookbehind at every start, so a search costs linear time; operators'
patterns run on RE2, which cannot take super-linear time whatever they write.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# Names and RE2 live in a leaf module so the config check needs no guard package.
from extproc.patterns import ALIASES as ALIASES
from extproc.patterns import BUILTIN_NAMES as BUILTIN_NAMES
from extproc.patterns import DETECTORS, PatternError, compile_re2
from extproc.patterns import expand as expand
from extproc.policy.guards.prefix import Unsupported, analyse


@dataclass(frozen=True, slots=True, eq=False)
class Detector:
    """One thing to find. `regex.search(text, pos)` gives candidates; `validate`
    (if any) keeps the real ones: it returns how many characters of the candidate are
    a valid match (0: none), so a greedy candidate that ran into the next number
    (`4111 1111 1111 1111 12/25`) can still yield the card. The rest is for streaming
    (see scanner.py)."""

    type: str  # what the mask token and metrics call it: CREDIT_CARD, EMAIL...
    regex: Any  # compiled (re or re2): .search(text, pos) -> match | None
    viable: Any | None  # compiled viable-prefix regex, None = hold `width` chars
    width: int | None  # longest match in characters, None = unbounded
    lookahead: int  # characters past a match that can still change it
    validate: Callable[[str], int] | None = None
    engine: str = "py"
    # The pattern with its flags scoped, so a scanner can search several at once.
    source: str = ""
    # ASCII characters a match can contain; None: any (see prefix.Shape).
    alphabet: frozenset[str] | None = None


# --------------------------------------------------------------------------- validators


# Each digit doubled, then its digits summed (Luhn's "double every second digit").
_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def luhn(digits: str) -> bool:
    """The Luhn checksum every payment card number carries. Slicing and `sum(bytes)`
    do the per-digit work in C: a candidate costs a few calls, not a loop per digit."""
    b = digits.encode()
    plain = b[-1::-2]  # from the right: 1st, 3rd, 5th... as they are
    doubled = b[-2::-2].translate(_DOUBLED)  # 2nd, 4th...: doubled, digits summed
    return (sum(plain) + sum(doubled) - 48 * len(b)) % 10 == 0


def _card_lengths(digits: str) -> tuple[int, ...] | range:
    """The lengths an issuer range allows (Visa, Mastercard, Amex, Discover, Diners,
    JCB, UnionPay, Maestro), from the first four digits; empty: no issuer. Luhn alone
    passes one random number in ten."""
    two, three, four = int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4":
        return (13, 16, 19)
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return (16,)
    if two in (34, 37):
        return (15,)
    if four == 6011 or two == 65 or 644 <= three <= 649:
        return range(16, 20)
    if 300 <= three <= 305 or two in (36, 38, 39):
        return range(14, 20)
    if 3528 <= four <= 3589:
        return range(16, 20)
    if two == 62:
        return range(16, 20)
    if two == 50 or 56 <= two <= 69:
        return range(12, 20)
    return ()


def _card_network(digits: str) -> bool:
    return len(digits) in _card_lengths(digits)


def _one_separator(text: str, allowed: str) -> bool:
    """All separators in a number the same character (`4111 1111-1111` is not a card)."""
    return len({ch for ch in text if ch in allowed}) <= 1


def valid_card(text: str) -> bool:
    digits = "".join(ch for ch in text if ch.isdigit())
    return (
        13 <= len(digits) <= 19
        and _one_separator(text, " -")
        and _card_network(digits)
        and luhn(digits)
    )


# Issuer lengths by first four digits, longest first, within 13..19: one dict lookup
# per candidate instead of the range tests.
_IIN_LENGTHS: dict[str, tuple[int, ...]] = {
    f"{i:04d}": tuple(n for n in (19, 18, 17, 16, 15, 14, 13) if n in _card_lengths(f"{i:04d}"))
    for i in range(10000)
}


def card_prefix(text: str) -> int:
    """How much of a card candidate (digits in groups split by single spaces or
    dashes) is a valid card: the longest prefix that ends where a group ends, so a
    number followed by more digits (an expiry date, the next number) is still found.
    Bounded per candidate: the issuer is read once (every prefix starts alike), then
    at most seven lengths (13..19 digits) get a separator check and a Luhn sum."""
    digits = text.replace(" ", "").replace("-", "")
    count = len(digits)
    if count < 13:
        return 0
    lengths = _IIN_LENGTHS[digits[:4]]
    if not lengths:
        return 0
    cut = len(text)
    if count == cut:  # no separator: the one group ends at the end
        return cut if count in lengths and luhn(digits) else 0
    space, dash = text.find(" "), text.find("-")
    # Where the second kind of separator first appears: a prefix must stop before it.
    mixed = max(space, dash) if space >= 0 and dash >= 0 else cut
    for group in reversed(text.replace("-", " ").split(" ")):
        if count < 13:
            break
        if count in lengths and cut <= mixed and luhn(digits[:count]):
            return cut
        count -= len(group)
        cut -= len(group) + 1
    return 0


def longest(valid: Callable[[str], bool], separators: str) -> Callable[[str], int]:
    """A validator that also tries the candidate cut at its last separators, so a
    number followed by more digits (an expiry date, the next number) is still found.
    Bounded by the candidate: the patterns that use it have a bounded width."""

    def check(text: str) -> int:
        cuts = [i for i, ch in enumerate(text) if ch in separators]
        if valid(text):
            return len(text)
        for cut in reversed(cuts):
            if cut > 0 and valid(text[:cut]):
                return cut
        return 0

    return check


def whole(valid: Callable[[str], bool]) -> Callable[[str], int]:
    return lambda text: len(text) if valid(text) else 0


def valid_ssn(text: str) -> bool:
    """Area 001-899 except 666, group 01-99, serial 0001-9999 (the SSA's rules since
    2011). Written with dashes or spaces: a bare 9-digit number is too often something
    else (order numbers, ZIP+4) to mask."""
    digits = "".join(ch for ch in text if ch.isdigit())
    if len(digits) != 9 or not _one_separator(text, " -"):
        return False
    area, group, serial = int(digits[:3]), int(digits[3:5]), int(digits[5:])
    return 0 < area < 900 and area != 666 and group > 0 and serial > 0


# Lengths from the SWIFT IBAN registry: a wrong length fails before the checksum.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}  # fmt: skip


# Letters as the checksum reads them: A=10 ... Z=35 (either case).
_IBAN_LETTERS = {
    ord(ch): str(10 + i)
    for i, ch in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    for ch in (ch, ch.lower())
}


def iban_checksum(iban: str) -> bool:
    """ISO 13616 mod-97: move the first four characters to the end, letters to
    numbers (A=10 ... Z=35), and the remainder must be 1 (one C-level big-int mod)."""
    moved = (iban[4:] + iban[:4]).translate(_IBAN_LETTERS)
    if not moved.isdigit() or not moved.isascii():
        raise ValueError(f"not an IBAN: {iban!r}")
    return int(moved) % 97 == 1


def valid_iban(text: str) -> bool:
    iban = text.replace(" ", "")
    return IBAN_LENGTHS.get(iban[:2]) == len(iban) and iban_checksum(iban)


def iban_prefix(text: str) -> int:
    """How much of an IBAN candidate (groups split by single spaces) is a valid IBAN:
    a country's IBAN has one length, so at most one prefix ending at a group end can
    fit it, and only that one gets the checksum."""
    want = IBAN_LENGTHS.get(text[:2])
    if want is None:
        return 0
    compact = text.replace(" ", "")
    count, cut = len(compact), len(text)
    for group in reversed(text.split(" ")):
        if count < want or cut <= 0:
            return 0
        if count == want:
            return cut if iban_checksum(compact[:count]) else 0
        count -= len(group)
        cut -= len(group) + 1
    return 0


def valid_ipv4(text: str) -> bool:
    return all(int(part) <= 255 for part in text.split("."))


def valid_ipv6(text: str) -> bool:
    if text.count(":") < 2 or not any(ch in "0123456789abcdefABCDEF" for ch in text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def valid_phone(text: str) -> bool:
    digits = sum(ch.isdigit() for ch in text)
    if text.startswith("+"):
        return 8 <= digits <= 15  # E.164: country code + subscriber, at most 15
    if text.startswith("0"):
        return 9 <= digits <= 12 and _one_separator(text, " .-")
    return digits in (10, 11) and _one_separator(text.replace(") ", ")-"), ".-")


# --------------------------------------------------------------------------- built-ins

_PEM_LABEL = r"(?:[A-Z0-9]{1,20} ){0,3}"

# name -> (type, pattern, validator). Every pattern starts with a lookbehind (or a
# literal) so a search never restarts inside a run it already rejected.
_BUILTIN: dict[str, tuple[str, str, Callable[[str], int] | None]] = {
    "credit_card": (
        "CREDIT_CARD",
        # An issuer's first digit (2-6) starts it: others are never valid, and a
        # run of `1 1 1 ...` then costs the regex alone.
        r"(?<![0-9])[2-6](?:[ -]?[0-9]){12,18}(?![0-9])",
        card_prefix,
    ),
    "us_ssn": (
        "US_SSN",
        r"(?<![0-9])[0-9]{3}(?:-[0-9]{2}-|\x20[0-9]{2}\x20)[0-9]{4}(?![0-9])",
        whole(valid_ssn),
    ),
    "email": (
        "EMAIL",
        r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@"
        r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}"
        r"(?![A-Za-z0-9-])",
        None,
    ),
    "phone": (
        "PHONE",
        r"(?<![0-9A-Za-z+])(?:"
        # E.164, compact or grouped: +14155552671, +44 20 7946 0958, +1 (415) 555-2671
        r"\+[1-9][0-9]{6,14}"
        r"|\+[1-9][0-9]{0,3}(?:[ .-]?\([0-9]{1,4}\))?(?:[ .-][0-9]{1,5}){2,6}"
        # North America: (415) 555-2671, 415-555-2671, 1-800-555-0199
        r"|(?:1[ .-])?(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}"
        # trunk prefix 0 (UK, France, Germany...): 020 7946 0958, 01 23 45 67 89
        r"|0[1-9][0-9]{0,4}(?:[ .-][0-9]{2,8}){1,4}"
        r")(?![0-9])",
        longest(valid_phone, " .-"),
    ),
    "iban": (
        "IBAN",
        r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?:\x20?[A-Z0-9]{4}){2,7}(?:\x20?[A-Z0-9]{1,3})?"
        r"(?![A-Za-z0-9])",
        iban_prefix,
    ),
    "ipv4": (
        "IP_ADDRESS",
        r"(?<![0-9.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9]|\.[0-9])",
        whole(valid_ipv4),
    ),
    "ipv6": (
        "IP_ADDRESS",
        r"(?<![0-9A-Za-z:.])[0-9A-Fa-f:]{2,39}(?:(?<=:)[0-9]{1,3}(?:\.[0-9]{1,3}){3})?"
        r"(?![0-9A-Za-z:]|\.[0-9])",
        whole(valid_ipv6),
    ),
    "aws_access_key": (
        "AWS_ACCESS_KEY",
        r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)"
        r"[A-Z0-9]{16}(?![A-Z0-9])",
        None,
    ),
    "private_key": (
        "PRIVATE_KEY",
        # The whole PEM block; a block whose END never comes is masked as far as its
        # base64 body goes (a cut key is still a key). The body never holds `-----`
        # (its next one is the END or no END at all): each BEGIN is then scanned up to
        # the next marker, not 12 000 characters on, however densely BEGINs repeat.
        rf"-----BEGIN {_PEM_LABEL}PRIVATE KEY-----"
        rf"(?:(?:[A-Za-z0-9+/=\s:,.]|-(?!----)){{0,12000}}?-----END {_PEM_LABEL}PRIVATE KEY-----"
        r"|[A-Za-z0-9+/=\s]{0,12000})",
        None,
    ),
    "bearer_token": (
        "BEARER_TOKEN",
        # The credential after "Bearer " (the scheme word stays readable).
        # A JWT has dots inside, never at the end: "Bearer <token>." ends a sentence.
        r"(?<=[Bb][Ee][Aa][Rr][Ee][Rr]\x20)[A-Za-z0-9._~+/-]{15,4095}[A-Za-z0-9_~+/-]={0,2}"
        r"(?![A-Za-z0-9_~+/=-]|\.[A-Za-z0-9_~+/-])",
        None,
    ),
    "api_key": (
        "API_KEY",
        # OpenAI (sk-..., sk-proj-..., sk-svcacct-...) and Anthropic (sk-ant-api03-...).
        r"(?<![A-Za-z0-9_-])sk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,256}"
        r"(?![A-Za-z0-9_-])",
        None,
    ),
}

assert tuple(_BUILTIN) == DETECTORS  # the names config validates against

# Longest lookbehind any pattern uses: the masker keeps this much released text as
# context in front of what it still scans.
CONTEXT_CHARS = 32

_CACHE: dict[str, Detector] = {}


def builtin(name: str) -> Detector:
    """A built-in detector by name (compiled once per process)."""
    detector = _CACHE.get(name)
    if detector is None:
        kind, pattern, validate = _BUILTIN[name]
        detector = _CACHE[name] = _python_detector(kind, pattern, validate)
    return detector


def _python_detector(
    kind: str, pattern: str, validate: Callable[[str], int] | None, flags: int = 0
) -> Detector:
    shape = analyse(pattern, "py", flags)
    assert shape.viable is not None
    scope = "i" if flags & re.IGNORECASE else ""
    return Detector(
        type=kind,
        regex=re.compile(pattern, flags),
        viable=re.compile(shape.viable),
        width=shape.max_width,
        lookahead=shape.lookahead,
        validate=validate,
        source=f"(?{scope}:{pattern})",
        alphabet=shape.ascii_alphabet,
    )


def keywords(words: Iterable[str], *, case_sensitive: bool = False) -> Detector:
    """A keyword list as one detector. A keyword that starts (ends) with a letter or
    digit matches only at a word boundary there: `class` is not found in `classic`."""
    alternatives = []
    for word in sorted(set(words), key=lambda w: (-len(w), w)):
        text = re.escape(word)
        if re.match(r"\w", word):
            text = r"(?<!\w)" + text
        if re.search(r"\w$", word):
            text += r"(?!\w)"
        alternatives.append(text)
    if not alternatives:
        raise PatternError("keyword list is empty")
    flags = 0 if case_sensitive else re.IGNORECASE
    return _python_detector("KEYWORD", "(?:" + "|".join(alternatives) + ")", None, flags)


def custom(kind: str, pattern: str, max_length: int | None = None) -> Detector:
    """An operator's pattern on RE2. Refused when RE2 cannot compile it or when it
    matches the empty string (it would 'find' something at every position)."""
    regex = compile_re2(pattern)
    if regex.fullmatch("") is not None:
        raise PatternError("it matches the empty string")
    try:
        shape = analyse(pattern, "re2")
        viable = compile_re2(shape.viable) if shape.viable else None
        width, lookahead, alphabet = shape.max_width, shape.lookahead, shape.ascii_alphabet
    except (Unsupported, PatternError):
        # RE2-only syntax: no closure; hold back the declared (or maximum) length.
        viable, width, lookahead, alphabet = None, None, 1, None
    if max_length is not None:
        width = max_length if width is None else min(width, max_length)
    return Detector(
        type=kind,
        regex=regex,
        viable=viable,
        width=width,
        lookahead=lookahead,
        engine="re2",
        source=f"(?:{pattern})",
        alphabet=alphabet if viable is not None else None,
    )
