"""One RE2 search that says "no detector of this scanner can match here", for the
guards' pre-check (`Scanner.quiet`).

The built-in patterns are written for Python's `re`, whose alternation of a dozen
lookbehind-led patterns costs a few steps per detector at every position: about
0.5 µs per character of a coalesced chunk here. RE2 has no lookarounds but scans in
linear time whatever the pattern, so each pattern is rewritten into one that matches
wherever the original could (a superset), and only a hit of the rewrite is checked
with the exact patterns:

- a negative lookbehind of one character class, `(?<![S])`, becomes `(?:\\A|[^S])` (the
  character before is consumed: the search starts `back` characters early);
- a positive lookbehind of fixed width is consumed as written;
- a negative lookahead keeps, of its alternatives, one that is a single character
  class `S` (`(?![S]|...)` holds only where `(?![S])` does) as `(?:[^S]|\\z)`;
- `\\Z` stays, as RE2's `\\z`; every other assertion and anchor is dropped (read as
  always true);
- a counted repeat above 64 becomes unbounded (RE2 would unroll it);
- `\\d`, `\\s`, `\\w` are spelled out as Python reads them on ASCII text.

Only ASCII text is searched this way (Python's classes and case folding differ from
RE2's beyond ASCII); operators' patterns are RE2 already and go in as written.
"""

from __future__ import annotations

import re._constants as C  # the parser's opcodes
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from extproc.patterns import PatternError, compile_re2

try:
    import re2 as _re2
except ImportError:  # pragma: no cover - compile_re2 says so
    _re2 = None
from extproc.policy.guards.prefix import Unsupported, _Emitter, _parse

_MAX_COUNT = 64
# Python's ASCII reading of the categories (its `\s` has \v and \x1c-\x1f; RE2's not).
_ASCII = {
    C.CATEGORY_DIGIT: "0-9",
    C.CATEGORY_SPACE: "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f\\x20",
    C.CATEGORY_WORD: "0-9A-Za-z_",
}
_NEGATED = {
    C.CATEGORY_NOT_DIGIT: C.CATEGORY_DIGIT,
    C.CATEGORY_NOT_SPACE: C.CATEGORY_SPACE,
    C.CATEGORY_NOT_WORD: C.CATEGORY_WORD,
}


class _Loose(_Emitter):
    """Writes a Python pattern out for RE2 as a superset of what it matches."""

    def __init__(self) -> None:
        super().__init__("re2")
        self.back = 0  # characters a rewritten lookbehind consumes before a match

    def item(self, op: Any, av: Any) -> str:
        if op is C.AT:  # `\Z` (a viable tail's end) stays: RE2's `\z`
            return "\\z" if av is C.AT_END_STRING else ""
        if op in (C.ASSERT, C.ASSERT_NOT):
            return self.assertion(op, av)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            low, high, sub = av
            if high > _MAX_COUNT:
                high = C.MAXREPEAT
            return f"(?:{self.seq(list(sub))}){self.count(low, high)}"
        return super().item(op, av)

    def assertion(self, op: Any, av: Any) -> str:
        direction, sub = av
        items = list(sub)
        if direction == -1:
            low, high = sub.getwidth()
            if op is C.ASSERT and low == high and high <= 32:
                self.back = max(self.back, int(high))
                return self.seq(items)
            if op is C.ASSERT_NOT and len(items) == 1 and items[0][0] in (C.IN, C.LITERAL):
                self.back = max(self.back, 1)
                return f"(?:\\A|{self.negated(items[0])})"
            return ""
        if op is C.ASSERT_NOT:
            alternatives = [items]
            if len(items) == 1 and items[0][0] is C.BRANCH:
                alternatives = [list(alt) for alt in items[0][1][1]]
            for alt in alternatives:
                if len(alt) == 1 and alt[0][0] in (C.IN, C.LITERAL):
                    return f"(?:{self.negated(alt[0])}|\\z)"
        return ""

    def negated(self, single: tuple[Any, Any]) -> str:
        op, av = single
        if op is C.LITERAL:
            return f"[^{self.char(av)}]"
        if any(item_op is C.NEGATE for item_op, _ in av):
            raise Unsupported("a negated class in a lookaround")
        return "[^" + self.charset(av)[1:]

    def charset(self, items: list) -> str:
        out = []
        for op, av in items:
            if op is C.CATEGORY and av in _ASCII:
                out.append(_ASCII[av])
            elif op is C.CATEGORY and av in _NEGATED:
                raise Unsupported("a negated category in a class")
            else:
                out.append(super().charset([(op, av)])[1:-1])
        return "[" + "".join(out) + "]"


def ascii_finder(regex: Any) -> Callable[[bytes, int, int], Sequence[tuple[int, int]]]:
    """`first(data, start, end)[0][0]`: where `regex` (RE2) first matches in the
    bytes of ASCII text between `start` and `end`, -1 for nowhere.

    google-re2's `search` on a `str` builds a generator, encodes the text, converts
    the offsets between characters and bytes and wraps the spans in a match object:
    about 1.5 µs a call on a chunk's few characters, most of the pre-check. On ASCII
    text characters and bytes are the same offsets, so the compiled RE2 object's own
    `Match` answers with the spans alone (a third of the cost), called through a
    `partial` (no Python frame of ours). A version without those internals gets the
    public `search`."""
    raw = getattr(getattr(regex, "_regexp", None), "Match", None)
    anchor = getattr(getattr(_re2, "_Anchor", None), "UNANCHORED", None)
    if raw is None or anchor is None:

        def searched(data: bytes, start: int, end: int) -> Sequence[tuple[int, int]]:
            m = regex.search(data.decode(), start, end)  # ASCII: the same offsets
            return [(-1, -1) if m is None else m.span()]

        return searched
    return partial(raw, anchor)


def prefilter(sources: Sequence[tuple[str, str]]) -> tuple[Any, int] | None:
    """(RE2 regex, characters to start early) for (engine, source) patterns, or None
    when one of them cannot be rewritten (then the exact search alone decides)."""
    loose = _Loose()
    parts = []
    try:
        for engine, source in sources:
            if engine == "re2":
                parts.append(source)
                continue
            tree = _parse(source, 0)  # flags are scoped in a source: `(?i:...)`
            if tree.state.flags & ~C.SRE_FLAG_UNICODE:
                raise Unsupported("global flags")
            parts.append(loose.seq(list(tree)))
        return compile_re2("|".join(f"(?:{p})" for p in parts)), loose.back
    except (Unsupported, PatternError, RecursionError):  # no prefilter, the exact search
        return None
