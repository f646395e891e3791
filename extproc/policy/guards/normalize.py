"""The text the detectors read: a normalised view of what the client or the model
wrote, with a map back to the original offsets so a mask covers the original span.

Without it a card in full-width digits (U+FF14 U+FF11...), with zero-width characters or
NBSPs between its digits, or an email with a full-width `@`, passes every detector,
which reads ASCII. The view folds each character on its own (so a stream can be
normalised chunk by chunk and give the same view as the whole text):

- NFKC (full-width and other compatibility forms: U+FF14 -> `4`, U+FF20 -> `@`, `①` -> `1`);
- other scripts' decimal digits to ASCII (`٤` Arabic-Indic, `४` Devanagari...);
- invisible characters removed: format characters (Cf: zero-width space and joiners,
  word joiner, BOM, soft hyphen, bidi controls), combining marks (Mn, Me: variation
  selectors, a combining mark put on a digit), C1 controls, Hangul fillers;
- separators folded: every space (Zs: NBSP, narrow NBSP, figure space, ideographic
  space...) to ` `, line and paragraph separators to `\\n`, dashes and minus signs to
  `-`, ideographic and other full stops to `.`.

ASCII text is its own view (`str.isascii()` is the fast path: no copy, no map).
"""

from __future__ import annotations

import unicodedata
from functools import cache

from extproc.policy.guards import detectors as det
from extproc.policy.guards.detectors import Detector

_DASHES = frozenset("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2e3a\u2e3b\ufe58\ufe63")
_DOTS = frozenset("\u3002\uff61\u2024\ufe52\uff0e")
_STRIP = frozenset("\u115f\u1160\u3164\uffa0\u2800")  # fillers and blank that render empty
_STRIP_CATEGORIES = frozenset(("Cf", "Mn", "Me", "Cc", "Cs", "Co", "Cn"))


def _fold_one(ch: str) -> str:
    if ch in _STRIP:
        return ""
    out = []
    for c in unicodedata.normalize("NFKC", ch):
        if c < "\x80":
            out.append(c)
            continue
        category = unicodedata.category(c)
        if category in _STRIP_CATEGORIES:
            if c == "\x85":  # NEL: a line break
                out.append("\n")
            continue
        if category == "Zs":
            out.append(" ")
        elif category in ("Zl", "Zp"):
            out.append("\n")
        elif c in _DASHES:
            out.append("-")
        elif c in _DOTS:
            out.append(".")
        else:
            digit = unicodedata.decimal(c, None)
            out.append(str(digit) if digit is not None else c)
    return "".join(out)


class _Table(dict):
    """`str.translate` table that folds a character the first time it is seen."""

    def __missing__(self, code: int) -> str:
        folded = _fold_one(chr(code))
        if len(self) < 65536:  # bounded: the characters of a few scripts
            self[code] = folded
        return folded


class _Uneven(dict):
    """`str.translate` table that keeps only the characters whose fold is not exactly
    one character (removed or expanded: where view and original offsets part)."""

    def __missing__(self, code: int) -> str | None:
        keep = None if code < 0x80 or len(_TABLE[code]) == 1 else chr(code)
        if len(self) < 65536:
            self[code] = keep
        return keep


_TABLE = _Table()
_UNEVEN = _Uneven()


def fold(text: str) -> str:
    """The view of `text`."""
    return text if text.isascii() else text.translate(_TABLE)


def normalize(text: str) -> tuple[str, list[int] | None]:
    """The view of `text` and, where offsets differ, `starts`: for each view position,
    the offset of the original character it came from. None: offsets are equal (ASCII,
    or every character folded to exactly one)."""
    if text.isascii():
        return text, None
    view = text.translate(_TABLE)
    if not text.translate(_UNEVEN):
        return view, None
    starts: list[int] = []
    table = _TABLE
    for at, ch in enumerate(text):
        if ch < "\x80":
            starts.append(at)
        else:
            starts.extend([at] * len(table[ord(ch)]))
    return view, starts


# A card written with dots or slashes between its digit groups (`4111.1111.1111.1111`).
# Not a fold of the view: `.` also separates IP addresses, versions and decimals, so
# this is a detector of its own, with at least two separators, all the same, before
# the card checks (network, length, Luhn) of the card detector.
_DOTTED_CARD = r"(?<![0-9./])(?:[0-9][./]?){12,18}[0-9](?![0-9])"


def _valid_dotted(text: str) -> bool:
    seps = {ch for ch in text if ch in "./"}
    count = sum(ch in "./" for ch in text)
    return len(seps) == 1 and count >= 2 and det.valid_card(text.replace(next(iter(seps)), ""))


@cache
def dotted_card() -> Detector:
    """The detector for cards with dot or slash separators (compiled once)."""
    return det._python_detector("CREDIT_CARD", _DOTTED_CARD, det.longest(_valid_dotted, "./"))
