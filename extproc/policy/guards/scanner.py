"""Finding matches in a text that arrives in pieces, exactly as if it came whole.

`Scanner.scan` picks matches left to right: at each step the leftmost candidate of any
detector (the longest on a tie, then the first detector), and the next step starts
where it ended. On a partial text it stops before the first position it cannot decide
yet, the *hold point*: the leftmost position whose tail is still a viable prefix of some
detector (see prefix.py), or whose candidate match could still change because it looks
past the end of what has arrived. Everything before that point is final: no later text
can change a match that starts there, because such a match would make that position
viable. So feeding a text in any pieces gives the same matches as scanning it whole
(the property tests check this), and what is held back is only the shortest tail that
could still become a match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from extproc.policy.guards.detectors import CONTEXT_CHARS, Detector, compile_re2
from extproc.policy.guards.normalize import normalize
from extproc.policy.guards.prefilter import ascii_finder, prefilter

_NONE = (1 << 62, 1 << 62)  # "no candidate" (sorts after every real position)


@dataclass(frozen=True, slots=True)
class Hit:
    start: int
    end: int
    index: int  # which detector of the scanner


class Scanner:
    """Leftmost-longest, non-overlapping matches of several detectors. Stateless: the
    caller keeps where each text stands (`RunningText`).

    Most chunks hold nothing and match nothing: a viable tail must end in a character
    its pattern can contain (a table lookup skips the search otherwise), and one search
    per engine over all detectors at once (an alternation) answers "any match here?"
    before the detectors are searched one by one.
    """

    __slots__ = ("_any", "_back", "_found", "_pre", "detectors", "tails", "windows")

    def __init__(self, detectors: Sequence[Detector], max_holdback: int) -> None:
        self.detectors = tuple(detectors)
        # How far back from the end a viable tail can start, per detector.
        self.windows = tuple(
            min(d.width, max_holdback) if d.width is not None else max_holdback
            for d in self.detectors
        )
        self._any = [
            _compile(engine, "|".join(d.source for d in self.detectors if d.engine == engine))
            for engine in ("py", "re2")
            if any(d.engine == engine for d in self.detectors)
        ]
        # For `quiet`: one RE2 search over ASCII text that rules every detector out
        # (prefilter.py), and, by a text's last (ASCII) character, one search per engine
        # for a viable tail of any detector that can end in it (`_tail_checks`; read by
        # `RunningText.take` too, which makes the quick search itself).
        self.tails = _tail_checks(self.detectors, self.windows)
        self._pre = prefilter([(d.engine, d.source) for d in self.detectors])
        self._found = ascii_finder(self._pre[0]) if self._pre is not None else None
        self._back = self._pre[1] if self._pre is not None else 0

    def find_all(self, text: str) -> list[Hit]:
        """Matches in a whole text."""
        return self.scan(text, 0, final=True)[0]

    def scan(self, text: str, pos: int, final: bool) -> tuple[list[Hit], int]:
        """Final matches in `text[pos:]` and the release point: text before it is
        decided, text from it on must wait for more (or for `final`)."""
        n = len(text)
        hold = n if final else self._hold(text, pos)
        if self._unmatched(text, pos):
            return [], n if final else max(pos, hold)
        detectors = self.detectors
        cand: list[tuple[int, int]] = [(-1, -1)] * len(detectors)
        hits: list[Hit] = []
        while True:
            live = []
            for i, detector in enumerate(detectors):
                c = cand[i]
                if c[0] < pos:
                    c = cand[i] = _next(detector, text, pos, hold, n, final)
                start, end = c
                if start >= hold:
                    continue
                if not final and end + detector.lookahead > n:
                    hold = start  # it looks past what has arrived: undecided
                    continue
                live.append((start, -end, i))
            best = None
            for item in live:
                if item[0] < hold and (best is None or item < best):
                    best = item
            if best is None:
                break
            start, end, index = best[0], -best[1], best[2]
            hits.append(Hit(start, end, index))
            pos = end
        return hits, n if final else max(pos, hold)

    def quiet(self, text: str, pos: int) -> bool:
        """True when `scan(text, pos, final=False)` would find nothing and release all
        of `text`: no candidate of any detector from `pos` on, and no viable tail. The
        streaming pre-check (`RunningText.take`) asks this instead of scanning."""
        n = len(text)
        if pos < n:
            check = self.tails.get(text[-1])
            if check is None:  # not ASCII
                if self._hold(text, pos) < n:
                    return False
            elif check is HOLDS:
                return False  # a detector that can end in it holds its width
            else:
                first, back = check[2], check[3]  # `_hold`, for one last character
                if first is not None and text.isascii():
                    at = first(text.encode(), max(0, pos - back), n)[0][0]
                    if not 0 <= at < n:  # at the end: an empty tail, not viable
                        return True  # no candidate, no viable tail: most chunks end here
                    pos = max(pos, at)  # every candidate and every tail starts there or later
                return self.quiet_from(text, pos, check)
        return self._unmatched(text, pos)

    def quiet_from(self, text: str, pos: int, check: tuple) -> bool:
        """`quiet` once its quick search (`check`: `tails[text[-1]]`) put the first
        candidate or tail at `pos` or later: the exact searches from there."""
        n = len(text)
        low = max(pos, n - check[0])
        for search in check[1]:
            m = search(text, low)
            if m is not None and m.start() < n:
                return False
        return self._unmatched(text, pos)

    def _unmatched(self, text: str, pos: int) -> bool:
        """No candidate of any detector in `text[pos:]`: the RE2 prefilter's one search
        says so for ASCII text (linear; the exact alternation of lookbehind-led patterns
        costs steps per detector at every position), else the exact search does."""
        found = self._found
        if (
            found is not None
            and text.isascii()
            and found(text.encode(), max(0, pos - self._back), len(text))[0][0] < 0
        ):
            return True  # no detector can match: no need for the exact search
        for regex in self._any:  # noqa: SIM110 - no generator per chunk
            if regex.search(text, pos) is not None:
                return False
        return True

    def _hold(self, text: str, pos: int) -> int:
        """The leftmost position from `pos` on whose tail could still become a match."""
        n = len(text)
        if pos >= n:
            return n
        hold = n
        last = text[-1]
        ascii_last = last < "\x80"
        for detector, window in zip(self.detectors, self.windows, strict=True):
            alphabet = detector.alphabet
            if ascii_last and alphabet is not None and last not in alphabet:
                continue  # a tail ending in a character no match can contain
            low = max(pos, n - window)
            if low >= hold:
                continue
            if detector.viable is None:
                hold = low  # nothing better known: hold the pattern's width
                continue
            m = detector.viable.search(text, low)
            if m is not None and m.start() < hold:
                hold = m.start()
        return hold


def _compile(engine: str, pattern: str):
    return re.compile(pattern) if engine == "py" else compile_re2(pattern)


_GLOBAL_FLAGS = re.compile(r"\(\?([ims]+)\)")  # how prefix.py writes a pattern's flags


def _scoped(pattern: str) -> str:
    """A pattern as one group of an alternation: its leading flags scoped to it."""
    m = _GLOBAL_FLAGS.match(pattern)
    return f"(?{m[1]}:{pattern[m.end() :]})" if m else f"(?:{pattern})"


HOLDS = "holds"  # `_tail_checks`: a detector without a viable-prefix regex may end here


def _tail_checks(detectors: Sequence[Detector], windows: Sequence[int]) -> dict[str, Any]:
    """By a text's last ASCII character: `HOLDS`, or the widest window of the detectors
    whose tail can end in that character with one search per engine over all their
    viable-prefix regexes (one search where `_hold` makes one per detector), and the
    quick check in front of both searches (`_first_match`).

    The widest window finds what each detector's own finds: a viable tail is a prefix
    of a match, so no longer than its detector's width, and a window is the width or
    the cap (`max_holdback`), the widest. (A custom pattern's `max_length` below its
    width may make a longer tail viable: `quiet` then says no and the text is scanned,
    which is slower, never different.)"""
    built: dict[tuple[int, ...], Any] = {}
    checks: dict[str, Any] = {}
    for ch in map(chr, range(128)):
        group = tuple(i for i, d in enumerate(detectors) if d.alphabet is None or ch in d.alphabet)
        if group not in built:
            if any(detectors[i].viable is None for i in group):
                built[group] = HOLDS
            else:
                searches = tuple(
                    _compile(engine, "|".join(
                        _scoped(detectors[i].viable.pattern)
                        for i in group
                        if detectors[i].engine == engine
                    )).search
                    for engine in ("py", "re2")
                    if any(detectors[i].engine == engine for i in group)
                )  # fmt: skip
                first, back = _first_match(detectors, group)
                built[group] = (max((windows[i] for i in group), default=0), searches, first, back)
        checks[ch] = built[group]
    return checks


def _first_match(detectors: Sequence[Detector], group: tuple[int, ...]) -> tuple[Any, int]:
    """(`first(data, start, end)`, characters to start early) of one RE2 search over ASCII
    text for any detector's candidate and any viable tail of the group's detectors,
    each rewritten as a superset (prefilter.py, `\\Z` kept), or (None, 0). Where it
    finds nothing before the text's end (a tail can be empty), `quiet` is done
    without the exact searches; where it finds
    something, nothing starts before it, so they begin there. The rewrite consumes a
    lookbehind's characters: an empty tail after one (`[^0-9]` then nothing) is found
    at the last character and leaves only that character to the exact searches. Only
    the group's tails: one of a detector that cannot end in the last character would
    be that empty kind, found in every chunk."""
    pre = prefilter(
        [(d.engine, d.source) for d in detectors]
        + [(detectors[i].engine, _scoped(detectors[i].viable.pattern)) for i in group]
    )
    return (ascii_finder(pre[0]), pre[1]) if pre is not None else (None, 0)


def _next(
    detector: Detector, text: str, pos: int, hold: int, n: int, final: bool
) -> tuple[int, int]:
    """The detector's next valid match from `pos` ((start, end) or _NONE). Candidates
    at or past `hold`, or that look past the end, are returned unvalidated: the caller
    does not decide them yet."""
    regex, validate, ahead = detector.regex, detector.validate, detector.lookahead
    while pos <= n:
        m = regex.search(text, pos)
        if m is None:
            return _NONE
        start, end = m.span()
        if start >= hold or (not final and end + ahead > n):
            return start, end
        if end > start:
            if validate is None:
                return start, end
            keep = validate(m.group())
            if keep:
                return start, start + keep
        pos = start + 1
    return _NONE


def find_hits(scanner: Scanner, text: str) -> list[Hit]:
    """Matches in a whole text, found in its normalised view (normalize.py), at the
    original offsets: a mask covers what the client wrote, invisible characters
    inside the match included. An ASCII view in which the RE2 prefilter finds nothing
    has no match (no detector can match there): one linear search stands in for the
    exact alternation, which costs a few steps per detector at every position. (Given
    bytes, re2's wrapper skips mapping character offsets to UTF-8 ones and back:
    ASCII offsets are the same.)"""
    view, starts = normalize(text)
    pre = scanner._pre
    if pre is not None and view.isascii() and pre[0].search(view.encode()) is None:
        return []
    hits = scanner.find_all(view)
    if starts is None or not hits:
        return hits
    return [Hit(starts[h.start], starts[h.end - 1] + 1, h.index) for h in hits]


class RunningText:
    """One stream of text (a choice's content, a tool call's arguments) under one or
    more scanners. Keeps only what is undecided plus a little context before it.

    The scanners read the normalised view of the stream (each chunk folded on its
    own, see normalize.py); hits and release points are given at original offsets.
    While view and original offsets agree (all ASCII, the usual case) `starts` is
    None and an offset is `shift` away; after a chunk that strips or expands a
    character, `starts` holds the original offset of each kept view character, until
    the kept text is again offset-for-offset (then it goes back to None).
    """

    __slots__ = ("base", "end", "positions", "scanners", "shift", "starts", "text", "views")

    def __init__(self, scanners: Sequence[Scanner]) -> None:
        self.scanners = tuple(scanners)
        self.text = ""  # the view of what is kept
        self.base = 0  # absolute view offset of text[0]
        self.starts: list[int] | None = None  # original offset per character of text
        self.shift = 0  # original offset minus view offset, while starts is None
        self.end = 0  # absolute original offset of the end of everything fed
        self.views = [0] * len(self.scanners)  # absolute view release point per scanner
        self.positions = [0] * len(self.scanners)  # the same at original offsets

    def feed(self, chunk: str, final: bool = False) -> list[list[Hit]]:
        """Add `chunk` (may be empty; `final`: nothing more will come). Returns the
        newly decided hits per scanner, at absolute original offsets."""
        if chunk:
            self._append(chunk)
        base, text, starts = self.base, self.text, self.starts
        n = len(text)
        out: list[list[Hit]] = []
        for k, scanner in enumerate(self.scanners):
            hits, release = scanner.scan(text, self.views[k] - base, final)
            self.views[k] = base + release
            if starts is None:
                at = base + self.shift
                self.positions[k] = at + release
                out.append([Hit(h.start + at, h.end + at, h.index) for h in hits] if at else hits)
            else:
                self.positions[k] = starts[release] if release < n else self.end
                out.append([Hit(starts[h.start], starts[h.end - 1] + 1, h.index) for h in hits])
        keep = min(self.views, default=base + n) - CONTEXT_CHARS - base
        if keep > 0:
            self.text = text[keep:]
            self.base = base + keep
            if starts is not None:
                del starts[:keep]
                first = starts[0]
                if (
                    chunk.isascii()
                    and starts[-1] + 1 == self.end
                    and starts == list(range(first, self.end))
                ):
                    self.shift = first - self.base  # offset for offset again
                    self.starts = None
        return out

    def take(self, chunk: str) -> bool:
        """When feeding `chunk` (ASCII) would decide all of it with no hit for any
        scanner, leave the state `feed(chunk)` would leave, without a scan, and say
        True; else change nothing (text that the normalised view would change:
        non-ASCII, or earlier non-ASCII kept, is never taken). The kept context is the
        same, so a lookbehind in the next chunk sees what it would have seen."""
        if self.starts is not None:
            return False
        text = self.text + chunk
        if not text.isascii():  # (kept text that is not is rare: it waits to leave)
            return False
        base = self.base
        views = self.views
        scanners = self.scanners
        n = len(text)
        if len(scanners) == 1:  # the usual case, without the loops
            scanner = scanners[0]
            pos = views[0] - base
            # `Scanner.quiet`'s first case, inline (`pos < n` but for an empty text)
            check = scanner.tails.get(text[-1]) if pos < n else None
            if check.__class__ is tuple and check[2] is not None:
                back = check[3]
                at = check[2](text.encode(), pos - back if pos > back else 0, n)[0][0]
                if 0 <= at < n and not scanner.quiet_from(text, max(pos, at), check):
                    return False
            elif not scanner.quiet(text, pos):
                return False
            end = self.end = self.end + len(chunk)
            views[0] = base + n
            self.positions[0] = end
        else:
            for k, scanner in enumerate(scanners):
                if not scanner.quiet(text, views[k] - base):
                    return False
            end = self.end = self.end + len(chunk)
            positions = self.positions
            for k in range(len(views)):
                views[k] = base + n
                positions[k] = end
        keep = n - CONTEXT_CHARS
        if keep > 0:
            self.text = text[keep:]
            self.base = base + keep
        else:
            self.text = text
        return True

    def _append(self, chunk: str) -> None:
        end = self.end
        if chunk.isascii():
            view, cstarts = chunk, None
        else:
            view, cstarts = normalize(chunk)
            if cstarts is not None and self.starts is None:
                origin = self.base + self.shift
                self.starts = list(range(origin, origin + len(self.text)))
        starts = self.starts
        if starts is not None:
            if cstarts is None:
                starts.extend(range(end, end + len(view)))
            else:
                starts.extend([end + at for at in cstarts])
        self.text += view
        self.end = end + len(chunk)

    def released(self, which: Sequence[int]) -> int:
        """Absolute original position up to which the given scanners decided everything."""
        return min((self.positions[k] for k in which), default=self.end)
