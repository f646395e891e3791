"""One RE2 search that clears a request's prompt texts of every detector of a plan at
once: where it finds nothing, no detector can match in any text alone nor in the
texts joined, so the request guard skips its per-text scans.

The request scan (`engine.scan_steps`) searches each text on its own and the texts
joined in order. `prefilter.py` rewrites each pattern into a superset for one text:
a lookbehind of a class `S` becomes "start of text, or a character not in `S`", a
lookahead "a character not in `S`, or the end". So the one search runs over the
joined text, NUL, then the texts joined by NUL: with NUL in no such class, a text's
start or end next to a NUL satisfies the rewrite as the edge of the text would, and
a match of any exact pattern in any of the searches is a match of the rewrite here.
Operators' RE2 patterns go in as written and may hold anchors (`^`, `\\b`) that a
NUL does not satisfy: a plan with one gets no such search (the per-text pre-check of
`scanner.find_hits` still runs). Only an ASCII view is searched, as in prefilter.py.
"""

from __future__ import annotations

import re._constants as C  # the parser's opcodes
from collections.abc import Iterable
from typing import Any

from extproc.patterns import PatternError, compile_re2
from extproc.policy.guards.detectors import Detector
from extproc.policy.guards.normalize import normalize
from extproc.policy.guards.prefilter import _Loose
from extproc.policy.guards.prefix import Unsupported, _parse


class _NulOutside(_Loose):
    """`_Loose`, refusing a lookaround class that holds NUL (the separator)."""

    def negated(self, single: tuple[Any, Any]) -> str:
        op, av = single
        items = [single] if op is C.LITERAL else list(av)
        for item_op, item_av in items:
            if (item_op is C.LITERAL and item_av == 0) or (item_op is C.RANGE and item_av[0] == 0):
                raise Unsupported("NUL in a lookaround class")
        return super().negated(single)


def anywhere(detectors: Iterable[Detector]) -> Any | None:
    """The RE2 regex for `nothing_anywhere`, or None when a detector is an operator's
    RE2 pattern or cannot be rewritten (then the per-text checks decide)."""
    loose = _NulOutside()
    parts = []
    try:
        for detector in detectors:
            if detector.engine != "py":
                return None
            tree = _parse(detector.source, 0)
            if tree.state.flags & ~C.SRE_FLAG_UNICODE:
                return None
            parts.append(loose.seq(list(tree)))
        if not parts:
            return None
        return compile_re2("|".join(f"(?:{p})" for p in parts))
    except (Unsupported, PatternError, RecursionError):
        return None


def nothing_anywhere(regex: Any, texts: list[str]) -> bool:
    """True when no detector behind `regex` (from `anywhere`) can match in any of
    `texts` alone or in them joined in order; False when that is not known."""
    views = texts if all(map(str.isascii, texts)) else [normalize(t)[0] for t in texts]
    if len(views) > 1:
        searched = "".join(views) + "\0" + "\0".join(views)
    else:
        searched = views[0] if views else ""
    # bytes: re2's wrapper maps no character offsets (ASCII ones are the same)
    return searched.isascii() and regex.search(searched.encode()) is None
