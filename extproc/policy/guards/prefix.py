"""From a pattern, derive what a stream masker needs to hold back as little as possible.

A streamed text arrives a few characters at a time. To mask a match that spans two
frames, the masker must not release text that could still *become* part of a match;
to keep time to first token, it must release everything else at once. The exact test
is: "is `text[i:]` a prefix of some string the pattern matches?". This module turns a
pattern into a second regex that answers exactly that (its *viable-prefix* regex): the
prefix closure of the pattern's syntax tree, anchored at the end of the text. The
leftmost position where it matches is where the held tail starts.

The syntax tree comes from Python's own regex parser (`re._parser`); the result is
written out either for Python's `re` (the built-in detectors) or for RE2 (operators'
patterns), so the closure runs on the same engine, with the same meaning, as the
pattern itself. Assertions that look at text not yet received (`$`, `\\b`,
lookaheads) are dropped from the closure, which only makes it accept more (hold a
little longer), never less. A pattern the parser cannot read faithfully (RE2-only
syntax such as `\\pL` or `[[:alpha:]]`) gets no closure: the masker then holds back
its maximum match length instead.
"""

from __future__ import annotations

import re
import re._constants as C  # the parser's opcodes, under the stdlib's own short name
import re._parser as sre_parse
import warnings
from dataclasses import dataclass
from typing import Any, Literal

Target = Literal["py", "re2"]

# Flags the emitted text carries inline; the others (unicode, ascii, verbose,
# locale) are either the engine's default or already consumed by the parser.
_FLAG_LETTERS = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"))
_CATEGORIES = {
    C.CATEGORY_DIGIT: r"\d",
    C.CATEGORY_NOT_DIGIT: r"\D",
    C.CATEGORY_SPACE: r"\s",
    C.CATEGORY_NOT_SPACE: r"\S",
    C.CATEGORY_WORD: r"\w",
    C.CATEGORY_NOT_WORD: r"\W",
}
_SINGLE = (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN)
_REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT)
# Zero-width tests of what comes *before* a position: known when the text is partial.
_PAST_AT = (C.AT_BEGINNING, C.AT_BEGINNING_STRING)


class Unsupported(ValueError):
    """The pattern uses syntax this module cannot rewrite faithfully."""


@dataclass(frozen=True, slots=True)
class Shape:
    """What the masker needs to know about one pattern."""

    viable: str | None  # viable-prefix regex (anchored at the end), None if unknown
    max_width: int | None  # longest possible match in characters, None = unbounded
    lookahead: int  # characters after a match's end that can still change the match
    # Which ASCII characters a match can contain (None: any character can). A text
    # whose last character is not one of them has no viable tail for this pattern:
    # the masker skips the search, which is most chunks of ordinary prose.
    ascii_alphabet: frozenset[str] | None = None


def analyse(pattern: str, target: Target, flags: int = 0) -> Shape:
    """The viable-prefix regex, maximum width and lookahead of `pattern`.

    Raises Unsupported when Python's parser reads the pattern differently from the
    target engine (or not at all); callers fall back to holding `max_width` chars.
    """
    tree = _parse(pattern, flags)
    _low, high = tree.getwidth()
    width = None if high >= C.MAXREPEAT else int(high)
    emitter = _Emitter(target)
    body = emitter.prefix_seq(list(tree))
    end = r"\Z" if target == "py" else r"\z"
    viable = f"{_flag_prefix(tree.state.flags)}(?:{body}){end}"
    atoms = emitter.atoms(list(tree))
    alphabet = None
    if atoms is not None:
        cls = re.compile(f"(?{_Emitter.flags(tree.state.flags, 0)}:{'|'.join(atoms) or '(?!)'})")
        alphabet = frozenset(ch for ch in map(chr, range(128)) if cls.fullmatch(ch))
    return Shape(viable, width, _lookahead(list(tree)), alphabet)


def max_width(pattern: str, flags: int = 0) -> int | None:
    """Longest match of `pattern` in characters (None: unbounded or unreadable)."""
    try:
        _low, high = _parse(pattern, flags).getwidth()
    except Unsupported:
        return None
    return None if high >= C.MAXREPEAT else int(high)


def emit(pattern: str, target: Target, flags: int = 0) -> str:
    """`pattern` written back out from its syntax tree (tests use it to check the
    round trip that `analyse` relies on)."""
    tree = _parse(pattern, flags)
    return _flag_prefix(tree.state.flags) + _Emitter(target).seq(list(tree))


def _parse(pattern: str, flags: int) -> Any:
    if re.search(r"\{,", pattern):
        # Python reads `a{,3}` as a repeat, RE2 as the literal text "a{,3}".
        raise Unsupported("'{,n}' means different things to Python and RE2")
    with warnings.catch_warnings():
        # "Possible nested set" / "bad escape": Python would read RE2's POSIX classes
        # ([[:alpha:]]) as plain sets, a different pattern; refuse instead.
        warnings.simplefilter("error")
        try:
            return sre_parse.parse(pattern, flags)
        except (re.error, Warning, RecursionError, OverflowError) as exc:
            raise Unsupported(str(exc)) from None


def _flag_prefix(flags: int) -> str:
    letters = "".join(letter for flag, letter in _FLAG_LETTERS if flags & flag)
    return f"(?{letters})" if letters else ""


def _lookahead(items: list) -> int:
    """How far past its end a match may look (lookaheads, `$`, word boundaries)."""
    need = 0
    for op, av in items:
        if op in (C.ASSERT, C.ASSERT_NOT):
            direction, sub = av
            if direction == 1:
                high = sub.getwidth()[1]
                need = max(need, C.MAXREPEAT if high >= C.MAXREPEAT else int(high))
            need = max(need, _lookahead(list(sub)))
        elif op is C.AT and av not in _PAST_AT:
            need = max(need, 2 if av is C.AT_END else 1)  # `$` also peeks past a final \n
        elif op is C.SUBPATTERN:
            need = max(need, _lookahead(list(av[3])))
        elif op is C.BRANCH:
            for alt in av[1]:
                need = max(need, _lookahead(list(alt)))
        elif op in _REPEATS:
            need = max(need, _lookahead(list(av[2])))
    return int(min(need, C.MAXREPEAT))


class _Emitter:
    """Writes syntax-tree items back out as regex text for one engine."""

    def __init__(self, target: Target) -> None:
        self.target = target

    # -- the pattern itself ---------------------------------------------------------

    def seq(self, items: list) -> str:
        return "".join(self.item(op, av) for op, av in items)

    def item(self, op: Any, av: Any) -> str:
        if op is C.LITERAL:
            return self.char(av)
        if op is C.NOT_LITERAL:
            return f"[^{self.char(av)}]"
        if op is C.ANY:
            return "."
        if op is C.IN:
            return self.charset(av)
        if op is C.AT:
            return self.at(av)
        if op is C.SUBPATTERN:
            _group, add, remove, sub = av
            return f"(?{self.flags(add, remove)}:{self.seq(list(sub))})"
        if op is C.BRANCH:
            return "(?:" + "|".join(self.seq(list(alt)) for alt in av[1]) + ")"
        if op in _REPEATS:
            low, high, sub = av
            lazy = "?" if op is C.MIN_REPEAT else ""
            return f"(?:{self.seq(list(sub))}){self.count(low, high)}{lazy}"
        if op in (C.ASSERT, C.ASSERT_NOT):
            if self.target == "re2":
                raise Unsupported("RE2 has no lookaround")
            direction, sub = av
            kind = (
                ("=" if op is C.ASSERT else "!")
                if direction == 1
                else ("<=" if op is C.ASSERT else "<!")
            )
            return f"(?{kind}{self.seq(list(sub))})"
        raise Unsupported(f"cannot rewrite {op}")

    def char(self, code: int) -> str:
        ch = chr(code)
        if code < 128 and ch.isalnum():
            return ch
        if code < 256:
            return f"\\x{code:02x}"
        if self.target == "re2":
            return f"\\x{{{code:x}}}"
        return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"

    def charset(self, items: list) -> str:
        out = []
        for op, av in items:
            if op is C.NEGATE:
                out.insert(0, "^")
            elif op is C.LITERAL:
                out.append(self.char(av))
            elif op is C.RANGE:
                out.append(f"{self.char(av[0])}-{self.char(av[1])}")
            elif op is C.CATEGORY and av in _CATEGORIES:
                out.append(_CATEGORIES[av])
            else:
                raise Unsupported(f"cannot rewrite set item {op}")
        return "[" + "".join(out) + "]"

    def at(self, code: Any) -> str:
        if code is C.AT_BEGINNING:
            return "^"
        if code is C.AT_BEGINNING_STRING:
            return r"\A"
        if code is C.AT_END:
            return "$"
        if code is C.AT_END_STRING:
            return r"\Z" if self.target == "py" else r"\z"
        if code is C.AT_BOUNDARY:
            return r"\b"
        if code is C.AT_NON_BOUNDARY:
            return r"\B"
        raise Unsupported(f"cannot rewrite {code}")

    @staticmethod
    def flags(add: int, remove: int) -> str:
        plus = "".join(letter for flag, letter in _FLAG_LETTERS if add & flag)
        minus = "".join(letter for flag, letter in _FLAG_LETTERS if remove & flag)
        return plus + (f"-{minus}" if minus else "")

    @staticmethod
    def count(low: int, high: int) -> str:
        if high >= C.MAXREPEAT:
            return "*" if low == 0 else "+" if low == 1 else f"{{{low},}}"
        if (low, high) == (0, 1):
            return "?"
        return f"{{{low}}}" if low == high else f"{{{low},{high}}}"

    def atoms(self, items: list) -> list[str] | None:
        """Every single-character item a match can consume (None when one of them is
        `.` or a negated set: then any character can)."""
        out: list[str] = []
        for op, av in items:
            if op is C.LITERAL:
                out.append(self.char(av))
            elif op is C.IN:
                if any(item_op is C.NEGATE for item_op, _ in av):
                    return None
                out.append(self.charset(av))
            elif op in (C.ANY, C.NOT_LITERAL):
                return None
            elif op is C.SUBPATTERN:
                _group, add, remove, sub = av
                inner = self.atoms(list(sub))
                if inner is None:
                    return None
                flags = self.flags(add, remove)
                out += [f"(?{flags}:{atom})" for atom in inner] if flags else inner
            elif op is C.BRANCH:
                for alt in av[1]:
                    inner = self.atoms(list(alt))
                    if inner is None:
                        return None
                    out += inner
            elif op in _REPEATS:
                inner = self.atoms(list(av[2]))
                if inner is None:
                    return None
                out += inner
            # assertions consume nothing
        return out

    # -- its prefix closure ---------------------------------------------------------

    def prefix_seq(self, items: list, start: int = 0) -> str:
        """A regex matching every prefix (empty and whole included) of what
        `items[start:]` matches: P(h t) = P(h) | h P(t)."""
        if start == len(items):
            return ""
        op, av = items[start]
        rest = self.prefix_seq(items, start + 1)
        if op in _SINGLE:
            return f"(?:{self.item(op, av)}{rest})?"
        if op is C.AT:
            return self.at(av) + rest if av in _PAST_AT else rest
        if op in (C.ASSERT, C.ASSERT_NOT):
            direction = av[0]
            # A lookbehind tests text already received: keep it. A lookahead tests
            # text that may not have arrived: drop it (accept more, never less).
            return self.item(op, av) + rest if direction == -1 else rest
        if not rest:  # P(h) already holds the whole of h
            return self.prefix_item(op, av)
        return f"(?:{self.prefix_item(op, av)}|{self.item(op, av)}{rest})"

    def prefix_item(self, op: Any, av: Any) -> str:
        if op is C.SUBPATTERN:
            _group, add, remove, sub = av
            flags = self.flags(add, remove)
            return f"(?{flags}:{self.prefix_seq(list(sub))})"
        if op is C.BRANCH:
            return "(?:" + "|".join(self.prefix_seq(list(alt)) for alt in av[1]) + ")"
        if op in _REPEATS:
            _low, high, sub = av
            if high == 0:
                return ""
            inner = self.prefix_seq(list(sub))
            if high == 1:
                return inner
            whole = self.seq(list(sub))
            count = "*" if high >= C.MAXREPEAT else f"{{0,{high - 1}}}"
            return f"(?:{whole}){count}{inner}"
        raise Unsupported(f"cannot rewrite {op}")
