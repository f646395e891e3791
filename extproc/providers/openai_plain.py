"""Choice 0's content in a chunk of whole OpenAI Chat Completions frames, by byte
search (`OpenAIChatStream.plain_text`, the guards' pre-check), for a stream whose
frames have the shape OpenAI writes; None where a frame has another shape.

The texts it gives are exactly what the SDKs show (tests/test_guard_precheck.py and
tests/test_security_response.py hold it to the full parse and to Python's json), and
it is attacker-facing: a text read where the SDK shows another is a guard bypass.
"""

from __future__ import annotations

import re

from extproc.providers._common import loads

# The guards' pre-check reads a chunk by byte search only where every frame has the
# shape OpenAI writes, so the texts it finds are exactly what the SDKs show (JSON
# parsers keep the last of repeated keys: a second `"index"`, `"delta"` or `"choices"`
# after the text would move it elsewhere or hide it, and hidden text read as content
# splits a card number the full path sees whole). A frame is `data: {` + members that
# hold no object, array or escape + `"choices":[` + choice 0 (or none) + `]` + more
# such members or objects two levels deep (the usage) + `}`; choice 0 is
# `{"index":0,"delta":{` + the role, then the content string, + `}` + scalar members
# that are not `index` or `delta`. The one `"choices"` of each frame is counted.
_MEMBERS = rb"[^{}\[\]\n\\]*"
_OBJECT = rb"\{" + _MEMBERS + rb"(?:\{" + _MEMBERS + rb"\}" + _MEMBERS + rb")*\}"
# The content string's text, up to the first quote no backslash escapes (unrolled:
# runs of plain bytes at a time).
_TEXT = rb'([^"\\\n]*(?:\\[^\n][^"\\\n]*)*)'
_CHOICE = (
    rb'\{"index":0,"delta":(?:\{(?:"role":"assistant",)?"content":"' + _TEXT + rb'"'
    rb'(?:,"refusal":null)?\}|\{(?:"role":"assistant"(?:,"refusal":null)?)?\})'
    rb'(?:,"(?!index"|delta")[a-z_]+":(?:"[^"\\\n]*"|[^,{}\[\]\n\\"]*))*\}'
)
# The members after choice 0's array (`\]`, then the empty group 2: where the array
# ends), alone: for a frame read by the remembered shape (`PlainText`), to its end.
_AFTER = rb"(?:" + _MEMBERS + _OBJECT + rb")*" + _MEMBERS + rb"\}"
# (`[DONE]` is told apart by a compare before it: `_DONE_PIECE`.)
_PLAIN_FRAME = re.compile(
    rb'data: \{' + _MEMBERS + rb'"choices":\[(?:' + _CHOICE + rb")?\]()" + _AFTER + rb"\n\n"
)  # fmt: skip
# Members after the choices that mean nothing to the SDKs' text nor to the metering
# (`OpenAIChatStream._count`): scalars, under a key other than `choices`, `usage`
# (unless null), `finish_reason` or a text key; OpenAI's per-frame `"obfuscation"`.
_QUIET = (
    rb'(?:,"usage":null|,"(?!(?:choices|usage|finish_reason|content|arguments|reasoning'
    rb'|reasoning_content|refusal)")[a-z_]+":(?:"[^"\\\n]*"|[^,{}\[\]\n\\"]*))*\}'
)
_QUIET_AFTER = re.compile(_QUIET + rb"\n\n")
_QUIET_PIECE = re.compile(_QUIET)
_AFTER_PIECE = re.compile(_AFTER)
_AFTER_FRAME = re.compile(_AFTER + rb"\n\n")
_CHOICES_KEY = b'"choices"'
# The keys the full parse reads a text under (`_choice_slots`): a frame without them
# shows none (`_no_text`).
_OPEN = b"data: {"
_TEXT_KEY = re.compile(rb'"(?:content|refusal|reasoning|reasoning_content|arguments)"')
_DONE_PIECE = b"data: [DONE]"  # the end marker's frame, split off at its blank line
# A role frame's choice 0 begins, and its text is followed by, these; its content
# frames' by these (`_without_role`). (`"delta":` is in choice 0 only: no member
# before it holds an object.)
_ROLE_HEAD = b'"delta":{"role":"assistant","content":"'
_CONTENT_HEAD = b'"delta":{"content":"'
_REFUSAL_TAIL = b'","refusal":null}'
_PLAIN_TAIL = b'"}'
# `bytes.split(b"\n\n")`'s pieces, in half its time on a chunk of many frames (the
# regex engine's literal search beats the two-byte one `bytes.split` uses).
_SPLIT_FRAMES = re.compile(rb"\n\n").split
_NO_HEAD = b"\n\n"  # `plain_text`'s remembered frame head before any: no frame has it


class PlainText:
    """One stream's reader: it remembers the shape of the last frame its regex read.

    A stream's frames differ in their text and in the members after the choices
    (OpenAI's `"obfuscation"`, a stamp), mostly: a frame that is the last regex-read
    frame's bytes before its text (`head`, at the offset of that match, not of a
    search for the text, which could find it in another member), a text of plain
    characters (no quote, backslash or newline: nothing that could end or escape the
    string; it ends at the first quote), the same bytes after the text to the end of
    the choices (`tail`), then members of the shape `_PLAIN_FRAME` allows there and
    no second `"choices"`, has the shape `_PLAIN_FRAME` reads: it is read by two
    compares and a search for the quote, and the rest by a small regex. Where one
    such text is not plain, the chunk is read again, every frame by the regex. (A
    stream's role frame gives the shape of the content frames after it: its bytes
    without the role, `_without_role`.)"""

    __slots__ = (
        "empties", "head", "lead", "led", "others", "pieces", "read_chunk", "shaped", "tail"
    )  # fmt: skip

    def __init__(self) -> None:
        self.head = _NO_HEAD  # the last regex-read frame before its text (`_read`)
        self.tail = b""  # ... and after its text, to the end of its choices array
        # ... and on, to its last member's value, where `_QUIET_AFTER` held (`_lead`):
        # a frame that is this and a value of digits or a string of letters and
        # digits (the stamp, the obfuscation) needs no regex for its members after
        # the choices.
        self.lead: bytes | None = None
        self.led = _led(None)  # the lead's regexes, one search for such a frame (`_led`)
        # The last chunk read with frames of that shape and nothing after their
        # choices that the metering reads (`_QUIET`), which the decoder meters from
        # the shape (`OpenAIChatStream.feed_whole`): how many such frames, how many of
        # them had an empty text, and the chunk's other frames (`others`, by index
        # into `pieces`: its frames without their blank lines; none for one frame).
        self.read_chunk: bytes | None = None
        self.shaped = 0
        self.empties = 0
        self.others: list[int] | tuple[()] = ()
        self.pieces: list[bytes] = []

    def read(self, chunk: bytes) -> str | None:
        """Choice 0's content in `chunk` where it is whole LF-framed frames (no CR:
        one ends an SSE line too) and every frame has the shape OpenAI writes
        (`_PLAIN_FRAME`), so no other text, no other choice, no repeated key that
        would move or hide the text, and no escape outside the texts (a key spelt
        `"con\\u0074ent"` is `content` to every JSON parser), else None. Non-ASCII
        text is None too: the guards' normalised view must see it."""
        head, tail, lead = self.head, self.tail, self.lead
        # One frame, shaped as the last? (A chunk may begin with `_NO_HEAD`; a piece not.)
        as_last = head is not _NO_HEAD and chunk.startswith(head)
        cut = len(head)
        if as_last:
            led = self.led
            m = led[0].fullmatch(chunk, cut) if led is not None else None
            if m is not None:  # plain text, the lead, a plain value: most frames
                end = m.end(1)
                self.read_chunk = chunk
                self.shaped = 1
                self.empties = end == cut
                self.others = ()
                return chunk[cut:end].decode()
        if chunk[-2:] != b"\n\n" or b"\r" in chunk:
            return None  # not whole LF-framed frames (a CR ends an SSE line too)
        if as_last:
            end = chunk.find(b'"', cut)
            quiet = _shaped(chunk, end, tail, lead, b"}\n\n", _QUIET_AFTER, _AFTER_FRAME)
            if quiet is not None:
                text = chunk[cut:end]
                if b"\\" not in text and b"\n" not in text:  # nor more frames
                    if not text.isascii():
                        return None
                    self.read_chunk = chunk if quiet else None
                    self.shaped, self.empties, self.others = 1, end == cut, ()
                    return text.decode()
        if head is not _NO_HEAD and chunk.find(b"\n\n") == len(chunk) - 2 and _no_text(chunk[:-2]):
            # One frame, no text (the finish, the usage, the end): what `_read` finds,
            # no state changed. (Not a stream's first: its role frame has a text.)
            return ""
        pieces = _SPLIT_FRAMES(chunk)  # JSON has no raw newline: one piece per frame
        pieces.pop()  # after the last frame's end
        read = self._read(pieces, head, tail, lead, self.led)
        if read is None:
            return None
        texts, plain, self.head, self.tail, lead, others, empty = read
        if lead is not self.lead:
            self.lead, self.led = lead, _led(lead)
        if plain:
            joined = plain[0] if len(plain) == 1 else b"".join(plain)
            if b"\\" in joined or b"\n" in joined:
                read = self._read(pieces, _NO_HEAD, b"", None, None, learn=False)
                if read is None:
                    return None
                texts, others = read[0], None
        raw = texts[0] if len(texts) == 1 else b"".join(texts)
        if not raw.isascii():
            return None
        if b"\\" not in raw:
            text = raw.decode()
        else:
            parsed = loads(b'"' + raw + b'"')  # escapes, read as the full parse reads them
            if not isinstance(parsed, str) or not parsed.isascii():
                return None
            text = parsed
        if others is not None and len(others) < len(pieces):
            self.read_chunk, self.pieces, self.others = chunk, pieces, others
            self.shaped, self.empties = len(pieces) - len(others), empty
        return text

    @staticmethod
    def _read(
        pieces: list[bytes],
        head: bytes,
        tail: bytes,
        lead: bytes | None,
        led: tuple[re.Pattern[bytes], re.Pattern[bytes]] | None,
        *,
        learn: bool = True,
    ) -> tuple[list[bytes], list[bytes], bytes, bytes, bytes | None, list[int] | None, int] | None:
        """(every frame's text, the texts read by the remembered shape, which the
        caller checks for plain characters, the shape now, the frames not read by it
        with nothing after their choices that the metering reads (by index; None
        where the shape changed after such a frame), how many of those had an empty
        text) or None: a frame of another shape. (`led`: the caller's `_led(lead)`.)
        Without `learn`, no frame's shape is remembered: every frame is read by the
        regex (the second reading, after a text that was not plain)."""
        cut = len(head)
        shaped = None if led is None else led[1].fullmatch  # bound once: the hot loop
        texts: list[bytes] = []
        append = texts.append
        plain: list[bytes] = []
        others: list[int] | None = []
        empty = 0
        for at, piece in enumerate(pieces):
            if piece.startswith(head):  # never with `_NO_HEAD`
                m = None if shaped is None else shaped(piece, cut)
                if m is not None:  # plain text, the lead, a plain value: most frames
                    text = m[1]
                    append(text)
                    empty += not text
                    continue
                end = piece.find(b'"', cut)
                if (  # `_shaped`'s first case, inline: a string last
                    lead is not None
                    and end >= 0
                    and piece.startswith(lead, end)
                    and piece[-1:] == b"}"
                    and _plain_value(piece[end + len(lead) : -1])
                ):
                    quiet = True
                else:  # the rest of `_shaped` (its first case is the one just checked)
                    quiet = _shaped(piece, end, tail, None, b"}", _QUIET_PIECE, _AFTER_PIECE)
                if quiet is not None:
                    text = piece[cut:end]
                    append(text)
                    plain.append(text)
                    if quiet:
                        empty += end == cut
                    elif others is not None:
                        others.append(at)
                    continue
            if _no_text(piece):
                if others is not None:
                    others.append(at)
                continue
            m = _PLAIN_FRAME.fullmatch(piece + b"\n\n")
            if m is None or piece.count(_CHOICES_KEY) != 1:
                return None  # a second `"choices"` in a frame: the last one is read
            text = m[1]
            if others is not None:
                others.append(at)
            if text is not None:
                append(text)
                if not learn:
                    continue
                if others is not None and len(others) <= at:  # after a quiet frame
                    others = None
                fresh = head is _NO_HEAD  # the stream's first text frame: its role one?
                head, tail = piece[: m.start(1)], piece[m.end(1) : m.start(2)]
                lead = _lead(piece, m.end(1), m.start(2))
                if fresh and head.endswith(_ROLE_HEAD):
                    head, tail, lead = _without_role(head, tail, lead)
                led = _led(lead)
                shaped = None if led is None else led[1].fullmatch
                cut = len(head)
        return texts, plain, head, tail, lead, others, empty


def _no_text(piece: bytes) -> bool:
    """A frame (without its blank line) in which the SDKs (and the full parse) show no
    text: the end marker, or a frame without any key a text is read under
    (`_TEXT_KEY`) nor an escape (a key spelt with one is the same key to a parser):
    the finish frame, the usage frame. It needs no regex. (The escape by `in`: 0.3 µs
    where the frame regex's alternative cost 1.0.)"""
    return piece == _DONE_PIECE or (
        piece.startswith(_OPEN) and b"\\" not in piece and _TEXT_KEY.search(piece) is None
    )


def _without_role(
    head: bytes, tail: bytes, lead: bytes | None
) -> tuple[bytes, bytes, bytes | None]:
    """A role frame's shape as the content frames after it write it: the same members
    around the choices, without the role and the `"refusal":null` OpenAI writes with it
    (both optional members of the same grammar, `_CHOICE`), so the first content
    frame is read by the shape rather than by the frame regex. A stream whose frames
    all carry the role learns the role shape from its next frame, for good."""
    head = head[: -len(_ROLE_HEAD)] + _CONTENT_HEAD
    if tail.startswith(_REFUSAL_TAIL):  # the lead begins with the tail
        tail = _PLAIN_TAIL + tail[len(_REFUSAL_TAIL) :]
        if lead is not None:
            lead = _PLAIN_TAIL + lead[len(_REFUSAL_TAIL) :]
    return head, tail, lead


def _shaped(
    frame: bytes,
    end: int,
    tail: bytes,
    lead: bytes | None,
    close: bytes,
    quiet: re.Pattern[bytes],
    members: re.Pattern[bytes],
) -> bool | None:
    """For a frame that begins as the shape's head, its text ending at `end` (the
    first quote after the head, -1 for none): True where the rest is the shape's with
    members after the choices that `_QUIET` reads (by `lead` and a plain value where
    it can be, else by the regex), False where it is the shape's with other members
    the full regex allows there and no second `"choices"`, None for another shape.
    `close`, `quiet` and `members` for a whole frame or one split at its blank line."""
    if end < 0:
        return None
    if (
        lead is not None
        and frame.startswith(lead, end)
        and frame.endswith(close)
        and _plain_value(frame[end + len(lead) : len(frame) - len(close)])
    ):
        return True
    if not frame.startswith(tail, end):
        return None
    after = end + len(tail)
    if quiet.fullmatch(frame, after) is not None:
        return True
    if members.fullmatch(frame, after) is not None and frame.find(_CHOICES_KEY, after) < 0:
        return False
    return None


def _plain_value(value: bytes) -> bool:
    """A JSON number of digits or a string of letters and digits: a value `_QUIET`
    reads, that can neither end the object nor hold a key."""
    return value.isdigit() or (value[1:-1].isalnum() and value[:1] == b'"' == value[-1:])


def _lead(piece: bytes, text_end: int, after: int) -> bytes | None:
    """The bytes from the text's end to the last member's value, where the members
    after the choices are `_QUIET`, else None. (A plain value in its place is `_QUIET`
    too: under `"usage"` a number or a string is no usage figure either.)"""
    if _QUIET_PIECE.fullmatch(piece, after) is None:
        return None
    colon = piece.rfind(b'":', after)  # no value holds a quote: the last member's key
    return None if colon < 0 else piece[text_end : colon + 2]


# `_led`'s regexes by lead: a few per process (a lead holds no stream's id or stamp,
# only the members' keys and scalars), at most `_LEDS_MAX`, so that frames an upstream
# varies cannot make every frame compile one.
_LEDS: dict[bytes, tuple[re.Pattern[bytes], re.Pattern[bytes]]] = {}
_LEDS_MAX = 64
_LED_MAX = 512


def _led(lead: bytes | None) -> tuple[re.Pattern[bytes], re.Pattern[bytes]] | None:
    """For a frame after the head: a plain ASCII text (group 1; no quote, backslash,
    CR or LF: it ends at the first quote, which begins the lead), the lead, a plain
    value (`_plain_value`), the frame's end: with its blank line, and without (a frame
    split at it). One search for what `PlainText` checks by several compares, where
    that lead has been seen or there is room to compile it; else None, and the
    compares decide. (A lead is learned from a chunk without a CR: none holds one.)"""
    if lead is None:
        return None
    led = _LEDS.get(lead)
    if led is None and len(_LEDS) < _LEDS_MAX and len(lead) <= _LED_MAX:
        frame = rb'([^"\\\n\r\x80-\xff]*)' + re.escape(lead) + rb'(?:[0-9]+|"[A-Za-z0-9]+")\}'
        led = _LEDS[lead] = (re.compile(frame + b"\n\n"), re.compile(frame))
    return led
