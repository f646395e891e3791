"""Guards compiled from config, and the per-exchange plan that groups them by action.

Within one exchange and phase, every guard that applies contributes its detectors to
one of three scanners: *mask* (matches replaced by a token), *reject* (any match stops
the exchange) and *log* (counted only). Each scanner chooses its matches on its own,
so a log-only guard can never hide a match from a masking one, and the masking guards
share one left-to-right choice, so two guards never mask overlapping text twice.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from functools import partial

from extproc.config import GuardConfig, GuardsConfig
from extproc.policy.guards import detectors as det
from extproc.policy.guards.normalize import dotted_card
from extproc.policy.guards.scanner import Hit, RunningText, Scanner, find_hits


@dataclass(frozen=True, slots=True, eq=False)
class Guard:
    """One configured guard, compiled."""

    config: GuardConfig
    index: int  # position in the config (precedence on conflicts)
    # (detector, mask token) pairs; empty for a webhook guard.
    finds: tuple[tuple[det.Detector, str], ...] = ()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def action(self) -> str:
        return self.config.action

    def applies(self, phase: str, route: str, consumer: str) -> bool:
        c = self.config
        if phase not in c.phases:
            return False
        if c.routes and route not in c.routes:
            return False
        if c.consumers and consumer not in c.consumers:
            return False
        return not (c.except_consumers and consumer in c.except_consumers)

    def message(self, phase: str) -> str:
        """What the client reads: the guard's name, never what it matched."""
        if self.config.reject.message:
            return self.config.reject.message
        what = "Request" if phase == "request" else "Response"
        return f"{what} blocked by guard '{self.name}'."


def compile_guard(config: GuardConfig, index: int) -> Guard:
    finds: list[tuple[det.Detector, str]] = []

    def token(kind: str, override: str | None = None) -> str:
        return (override if override is not None else config.mask_token).replace("{type}", kind)

    for name in det.expand(config.detectors):  # aliases already expanded at load
        detector = det.builtin(name)
        finds.append((detector, token(detector.type)))
        if name == "credit_card":  # also written with dots or slashes between groups
            finds.append((dotted_card(), token(detector.type)))
    for pattern in config.patterns:
        kind = pattern.name.upper().replace("-", "_")
        detector = det.custom(kind, pattern.regex, pattern.max_length)
        finds.append((detector, token(kind, pattern.mask_token)))
    if config.keywords:
        detector = det.keywords(config.keywords, case_sensitive=config.case_sensitive)
        finds.append((detector, token(detector.type)))
    return Guard(config=config, index=index, finds=tuple(finds))


@dataclass(frozen=True, slots=True, eq=False)
class Entry:
    """A detector as one guard uses it."""

    guard: Guard
    type: str
    token: str


@dataclass(frozen=True, slots=True, eq=False)
class Group:
    scanner: Scanner
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    """The detector guards of one phase for one (route, consumer), grouped by action;
    `webhooks` are the webhook guards, in config order."""

    mask: Group | None = None
    reject: Group | None = None
    log: Group | None = None
    webhooks: tuple[Guard, ...] = ()
    # Worked out once, not per exchange: (action, group), reject first (a block wins
    # over anything else decided), and the same by column for a response's stream
    # (`GuardStream`): scanners, actions, entries, the groups that decide release
    # (log-only guards never hold a frame back).
    groups: tuple[tuple[str, Group], ...] = field(init=False)
    scanners: tuple[Scanner, ...] = field(init=False)
    actions: tuple[str, ...] = field(init=False)
    entries: tuple[tuple[Entry, ...], ...] = field(init=False)
    holding: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        ordered = (("reject", self.reject), ("mask", self.mask), ("log", self.log))
        groups = tuple((action, group) for action, group in ordered if group is not None)
        fill = partial(object.__setattr__, self)  # frozen
        fill("groups", groups)
        fill("scanners", tuple(group.scanner for _, group in groups))
        fill("actions", tuple(action for action, _ in groups))
        fill("entries", tuple(group.entries for _, group in groups))
        fill("holding", tuple(k for k, (action, _) in enumerate(groups) if action != "log"))

    @property
    def empty(self) -> bool:
        return not (self.mask or self.reject or self.log or self.webhooks)


def make_plan(guards: list[Guard], max_holdback: int) -> Plan:
    by_action: dict[str, list[Entry]] = {"mask": [], "reject": [], "log": []}
    detectors: dict[str, list[det.Detector]] = {"mask": [], "reject": [], "log": []}
    webhooks = []
    for guard in guards:
        if guard.config.webhook is not None:
            webhooks.append(guard)
            continue
        for detector, token in guard.finds:
            by_action[guard.action].append(Entry(guard, detector.type, token))
            detectors[guard.action].append(detector)

    def group(action: str) -> Group | None:
        if not detectors[action]:
            return None
        return Group(Scanner(detectors[action], max_holdback), tuple(by_action[action]))

    return Plan(group("mask"), group("reject"), group("log"), tuple(webhooks))


@dataclass(slots=True)
class Findings:
    """What scanning some texts found, for metrics, logs and metadata (no matched text)."""

    masked: Counter = field(default_factory=Counter)  # (guard, type) -> count
    logged: Counter = field(default_factory=Counter)
    rejected: Entry | None = None

    def add(self, action: str, entry: Entry) -> None:
        if action == "mask":
            self.masked[entry.guard.name, entry.type] += 1
        elif action == "log":
            self.logged[entry.guard.name, entry.type] += 1
        elif self.rejected is None or entry.guard.index < self.rejected.guard.index:
            self.rejected = entry


def apply_masks(text: str, hits: list[Hit], entries: tuple[Entry, ...]) -> str:
    """`text` with every hit replaced by its entry's token (hits are ordered, disjoint)."""
    out = []
    at = 0
    for hit in hits:
        out.append(text[at : hit.start])
        out.append(entries[hit.index].token)
        at = hit.end
    out.append(text[at:])
    return "".join(out)


# Longest text scanned in one call: a longer one goes through the streaming scanner in
# pieces this long (same matches, see scanner.py), so a caller can check its budget
# and let other streams run between pieces.
PIECE_CHARS = 1 << 16


def scan_steps(plan: Plan, texts: list[str], findings: Findings, out: list[str]) -> Iterator[int]:
    """`scan_texts` in steps: yields the characters scanned since the last yield, after
    every text or piece of at most PIECE_CHARS; `out` gets the masked texts. Sans-I/O:
    the caller owns the clock and the event loop.

    Each text is scanned in its normalised view, and so is the text of all of them
    joined in order, so a card or an email split across two parts or two messages is
    still found; a match that crosses a boundary is masked with its token where it
    starts and removed from the texts after. Texts are joined as a stream's chunks are:
    a match that ends one text and goes on in the next (`a@b.co` + `m and...`) is
    one match, so a few characters that start the next text can be masked with it
    (fail safe: the alternative lets a split keep the tail of a card or an address).
    Every group reads the original texts."""
    result = texts
    bounds = _bounds(texts)
    joined = "".join(texts) if len(texts) > 1 else None
    for action, group in plan.groups:
        spans: list[Hit] = []
        for text, at in zip(texts, (0, *bounds), strict=True):
            hits = yield from _hits(group.scanner, text)
            spans.extend(Hit(h.start + at, h.end + at, h.index) for h in hits)
        if joined is not None:
            hits = yield from _hits(group.scanner, joined)
            crossing = [h for h in hits if _crossed(h, bounds)]
            if crossing:
                spans = _merge(spans + crossing)
        for hit in spans:
            findings.add(action, group.entries[hit.index])
        if action == "mask" and spans:
            result = _mask_texts(texts, bounds, spans, group.entries)
    out.extend(result)


def _hits(scanner: Scanner, text: str) -> Generator[int, None, list[Hit]]:
    if len(text) <= PIECE_CHARS:
        hits = find_hits(scanner, text)
        yield len(text)
        return hits
    hits = []
    running = RunningText([scanner])
    for at in range(0, len(text), PIECE_CHARS):
        piece = text[at : at + PIECE_CHARS]
        hits += running.feed(piece, final=at + PIECE_CHARS >= len(text))[0]
        yield len(piece)
    return hits


def scan_texts(plan: Plan, texts: list[str], findings: Findings) -> list[str]:
    """Whole texts (a request's prompts, a completion's choices): the masked texts;
    rejections and counts go to `findings`."""
    out: list[str] = []
    for _ in scan_steps(plan, texts, findings, out):
        pass
    return out


def _bounds(texts: list[str]) -> list[int]:
    """Where each text after the first starts in the joined text."""
    bounds = []
    at = 0
    for text in texts[:-1]:
        at += len(text)
        bounds.append(at)
    return bounds


def _crossed(hit: Hit, bounds: list[int]) -> list[int]:
    """The boundaries strictly inside the hit."""
    i = bisect_right(bounds, hit.start)
    j = bisect_left(bounds, hit.end, i)
    return bounds[i:j]


def _merge(spans: list[Hit]) -> list[Hit]:
    """Ordered, disjoint spans: overlapping ones joined (the first one's detector)."""
    out: list[Hit] = []
    for hit in sorted(spans, key=lambda h: (h.start, -h.end)):
        if out and hit.start < out[-1].end:
            last = out[-1]
            if hit.end > last.end:
                out[-1] = Hit(last.start, hit.end, last.index)
            continue
        out.append(hit)
    return out


def _mask_texts(
    texts: list[str], bounds: list[int], spans: list[Hit], entries: tuple[Entry, ...]
) -> list[str]:
    """Each text with the spans (joined offsets) over it masked: the token goes where a
    span starts, the rest of the span is removed from the texts it reaches into."""
    out = []
    k = 0
    for text, lo in zip(texts, (0, *bounds), strict=True):
        hi = lo + len(text)
        while k < len(spans) and spans[k].end <= lo:
            k += 1
        parts = []
        at = lo
        j = k
        while j < len(spans) and spans[j].start < hi:
            span = spans[j]
            if span.start >= lo:
                parts.append(text[at - lo : span.start - lo])
                parts.append(entries[span.index].token)
            at = max(at, min(span.end, hi))
            j += 1
        if at == lo and not parts:
            out.append(text)
            continue
        parts.append(text[at - lo :])
        out.append("".join(parts))
    return out


class GuardSet:
    """All configured guards, with plans cached per (phase, guards that apply)."""

    def __init__(self, config: GuardsConfig) -> None:
        self.max_holdback = config.max_holdback_chars
        self.budget_chars = config.scan_budget_chars
        self.budget_seconds = config.scan_budget_ms / 1000
        self.budget_status = config.scan_budget_status
        self.guards = [compile_guard(g, i) for i, g in enumerate(config.rules)]
        self._plans: dict[tuple, Plan] = {}
        # The plan of each (phase, route, consumer) asked: two or three asks an exchange.
        self._asked: dict[tuple[str, str, str], Plan] = {}

    def plan(self, phase: str, route: str, consumer: str) -> Plan:
        key = (phase, route, consumer)
        plan = self._asked.get(key)
        if plan is not None:
            return plan
        chosen = tuple(g.index for g in self.guards if g.applies(phase, route, consumer))
        plan = self._plans.get(chosen)
        if plan is None:
            if len(self._plans) > 1024:  # bounded: consumers come and go
                self._plans.clear()
            plan = self._plans[chosen] = make_plan(
                [self.guards[i] for i in chosen], self.max_holdback
            )
        if len(self._asked) > 4096:
            self._asked.clear()
        self._asked[key] = plan
        return plan
