"""Masking and blocking a streamed answer in flight, frame by frame.

The text of each channel (a choice's content, a tool call's arguments...) runs through
the scanners of `scanner.py`, which say up to where it is decided. A frame goes to the
client once every piece of text it carries is decided, so:

- a frame whose text is decided at once (the usual case) goes out at once, byte for
  byte when no mask touched it;
- a frame whose text ends in something that could still become a match (`4111` of a
  card number, `john.doe` of an email) waits for the frame that decides it, and the
  frames behind it wait too, so the client sees the same frames in the same order;
- a frame that a mask touched is re-encoded by the provider's decoder with its own
  text masked; a mask that spans frames puts its token in the frame where the match
  starts and removes the rest of the match from the frames after it;
- at the format's end marker (`[DONE]`) or the end of the body everything is decided
  and released; a reject guard's match raises `StreamBlocked` before any frame that
  carries it has left.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace

from extproc.policy.guards.engine import PIECE_CHARS, Entry, Plan, apply_masks
from extproc.policy.guards.scanner import RunningText, find_hits
from extproc.policy.stage import StreamBlocked
from extproc.providers.base import ResponseDecoder, StreamEvent

BUDGET_CODE = "guard_budget_exceeded"
# The running text `ResponseDecoder.plain_text` gives: choice 0's content, as the
# decoders' `texts` key it (channel, kind).
PLAIN_CHANNEL = (0, "content")  # the error event's code and errors_total{kind}

# (action, entry, repeat): called for every decided match; `repeat` marks a match in a
# text the stream already carried once (a format's closing "whole text" event). A
# reject callback raises StreamBlocked.
Report = Callable[[str, Entry, bool], None]


class _Slot:
    """A frame on its way out: its texts (masked as they are decided) and how many of
    them are still undecided."""

    __slots__ = ("changed", "event", "pending", "texts")

    def __init__(self, event: StreamEvent, texts: list[str] | None) -> None:
        self.event = event
        self.texts = texts
        self.pending = 0
        self.changed = False


class _Piece:
    """One frame's share of one channel's text, at absolute offsets in that channel."""

    __slots__ = ("end", "index", "slot", "start", "text")

    def __init__(self, slot: _Slot, index: int, start: int, text: str) -> None:
        self.slot = slot
        self.index = index
        self.start = start
        self.end = start + len(text)
        self.text = text


class _Channel:
    __slots__ = ("masks", "pieces", "running")

    def __init__(self, running: RunningText) -> None:
        self.running = running
        self.pieces: deque[_Piece] = deque()
        self.masks: deque[tuple[int, int, str]] = deque()  # decided (start, end, token)


class GuardStream:
    """A `StreamFilter` applying one plan's detector guards to one response."""

    def __init__(
        self,
        plan: Plan,
        decoder: ResponseDecoder,
        report: Report,
        *,
        budget_seconds: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._scanners = plan.scanners  # reject first: a block wins over anything else
        self._actions = plan.actions
        self._entries = plan.entries
        self._holding = plan.holding  # log-only guards never hold a frame back
        self._decoder = decoder
        self._report = report
        self._channels: dict[tuple[int, str], _Channel] = {}
        self._queue: deque[_Slot] = deque()
        # A huge frame is scanned in pieces, the clock read between them: over the
        # budget, the stream ends (StreamBlocked) rather than stall other streams.
        self._budget = budget_seconds
        self._clock = clock
        self._began = 0.0
        # The plain text's running text while `take` has left everything decided
        # (nothing held, no channel undecided): the next `take` needs no check of it.
        self._taking: RunningText | None = None

    @property
    def held(self) -> int:
        """Frames waiting for their text to be decided."""
        return len(self._queue)

    @property
    def oldest_held(self) -> StreamEvent | None:
        return self._queue[0].event if self._queue else None

    def process(self, events: list[StreamEvent], end: bool) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        queue = self._queue
        self._taking = None
        if self._clock is not None:
            self._began = self._clock()
        for event in events:
            if event.is_done:
                self._flush()  # the format says no more text comes
                self._drain(out)
            if event.is_content:
                self._content(event, out)
            elif queue:
                queue.append(_Slot(event, None))  # behind the frames still held
            else:
                out.append(event)
        if end:
            self._flush()
            self._drain(out)
        if len(out) == len(events) and all(a is b for a, b in zip(out, events, strict=True)):
            return events  # nothing held, nothing changed: the exchange's cheap path
        return out

    # -- the pre-check ----------------------------------------------------------------

    def take(self, text: str) -> bool:
        """When `text`, choice 0's content carried by a chunk of whole frames
        (`ResponseDecoder.plain_text`), needs no frame held and no mask (nothing is
        waiting, every running text is decided, and no detector can match or hold in
        the new text), take it as `process` would have, with the same state after it,
        and say True: the chunk is never parsed. Else change nothing."""
        running = self._taking
        if running is not None:  # the checks below held after the last take
            return not text or (len(text) <= PIECE_CHARS and running.take(text))
        if self._queue:
            return False
        channels = self._channels
        for channel in channels.values():
            running = channel.running
            if min(running.positions, default=running.end) < running.end:
                return False  # a log-only guard still reads it: [DONE] may report
        if not text:
            return True
        if len(text) > PIECE_CHARS:
            return False  # a long text is scanned in pieces, the budget checked between
        channel = channels.get(PLAIN_CHANNEL)
        if channel is None:
            running = RunningText(self._scanners)
            if not running.take(text):
                return False
            channels[PLAIN_CHANNEL] = _Channel(running)
        elif not channel.running.take(text):
            return False
        self._taking = channels[PLAIN_CHANNEL].running
        return True

    # -- text -------------------------------------------------------------------------

    def _content(self, event: StreamEvent, out: list[StreamEvent]) -> None:
        deltas = self._decoder.texts(event)
        slot: _Slot | None = None
        for index, delta in enumerate(deltas):
            if delta.final:
                # The whole text again (a closing event): scan it alone, mask it alike.
                masked = self._whole(delta.text)
                if masked != delta.text:
                    slot = slot or _Slot(event, [d.text for d in deltas])
                    slot.texts[index] = masked  # type: ignore[index]
                    slot.changed = True
                continue
            key = (delta.channel, delta.kind)
            channel = self._channels.get(key)
            if channel is None:
                channel = self._channels[key] = _Channel(RunningText(self._scanners))
            start = channel.running.end
            release = self._feed(channel, delta.text, final=False)
            masks = channel.masks
            if not channel.pieces:
                while masks and masks[0][1] <= start:
                    masks.popleft()  # they belong to frames already sent
                if release == channel.running.end and not masks:
                    continue  # decided at once and untouched: the common case
            slot = slot or _Slot(event, [d.text for d in deltas])
            channel.pieces.append(_Piece(slot, index, start, delta.text))
            slot.pending += 1
            self._settle_ready(channel, release)
        if slot is None:
            if self._queue:
                self._queue.append(_Slot(event, None))
            else:
                out.append(event)
            return
        self._queue.append(slot)
        self._drain(out)

    def _whole(self, text: str) -> str:
        masked = text
        for k, scanner in enumerate(self._scanners):
            if len(text) <= PIECE_CHARS:
                hits = find_hits(scanner, text)
            else:  # in pieces (same matches), the budget checked between them
                hits, running = [], RunningText([scanner])
                for at in range(0, len(text), PIECE_CHARS):
                    final = at + PIECE_CHARS >= len(text)
                    hits += running.feed(text[at : at + PIECE_CHARS], final)[0]
                    self._check()
            entries = self._entries[k]
            for hit in hits:
                self._report(self._actions[k], entries[hit.index], True)
            if self._actions[k] == "mask" and hits:
                masked = apply_masks(text, hits, entries)
        return masked

    def _check(self) -> None:
        if self._clock is None or self._budget is None:
            return
        if self._clock() - self._began > self._budget:
            raise StreamBlocked(
                "The response is too large for the gateway's content checks.",
                BUDGET_CODE,
                BUDGET_CODE,
            )

    def _feed(self, channel: _Channel, text: str, final: bool) -> int:
        """Scan more of a channel's text; record its masks; return the release point.
        A long text goes in pieces, the budget checked between them."""
        while len(text) > PIECE_CHARS:
            self._scan(channel, text[:PIECE_CHARS], False)
            text = text[PIECE_CHARS:]
            self._check()
        return self._scan(channel, text, final)

    def _scan(self, channel: _Channel, text: str, final: bool) -> int:
        running = channel.running
        for k, hits in enumerate(running.feed(text, final)):
            action = self._actions[k]
            entries = self._entries[k]
            for hit in hits:
                entry = entries[hit.index]
                self._report(action, entry, False)  # raises for reject
                if action == "mask":
                    channel.masks.append((hit.start, hit.end, entry.token))
        return running.released(self._holding)

    def _settle_ready(self, channel: _Channel, release: int) -> None:
        pieces = channel.pieces
        while pieces and pieces[0].end <= release:
            self._settle(channel, pieces.popleft())

    def _settle(self, channel: _Channel, piece: _Piece) -> None:
        """The piece's text is decided: write its masked form into its frame."""
        slot = piece.slot
        masks = channel.masks
        while masks and masks[0][1] <= piece.start:
            masks.popleft()
        if masks and masks[0][0] < piece.end:
            text = piece.text
            parts = []
            at = piece.start
            for start, end, token in masks:
                if start >= piece.end:
                    break
                if start >= at:
                    parts.append(text[at - piece.start : start - piece.start])
                    parts.append(token)  # in the frame where the match starts
                at = max(at, min(end, piece.end))
            parts.append(text[at - piece.start :])
            masked = "".join(parts)
            if masked != text:
                assert slot.texts is not None
                slot.texts[piece.index] = masked
                slot.changed = True
        slot.pending -= 1

    def _flush(self) -> None:
        for channel in self._channels.values():
            running = channel.running
            if channel.pieces or min(running.positions, default=running.end) < running.end:
                self._settle_ready(channel, self._feed(channel, "", final=True))

    # -- frames -----------------------------------------------------------------------

    def _drain(self, out: list[StreamEvent]) -> None:
        queue = self._queue
        while queue and queue[0].pending == 0:
            slot = queue.popleft()
            event = slot.event
            if slot.changed:
                assert slot.texts is not None
                event = replace(event, out=self._decoder.rewrite(event, slot.texts))
            out.append(event)
