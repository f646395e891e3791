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
_PLAIN_FRAME = re.compile(
    rb'data: \{' + _MEMBERS + rb'"choices":\[(?:' + _CHOICE + rb")?\](?:" + _MEMBERS
    + _OBJECT + rb")*" + _MEMBERS + rb"\}\n\n|data: \[DONE\]\n\n"
)  # fmt: skip
_CHOICES_KEY = b'"choices"'
_DONE_PIECE = b"data: [DONE]"  # the end marker's frame, split off at its blank line
_NO_HEAD = b"\n\n"  # `plain_text`'s remembered frame head before any: no frame has it


class PlainText:
    """One stream's reader: it remembers the shape of the last frame its regex read.

    A stream's frames differ in their text only, mostly: a frame that is the last
    regex-read frame's bytes around its text (`_head`, `_tail`, at the offsets of
    that match, not of a search for the text, which could find it in another member)
    with a text of plain characters in between (no quote, backslash or newline:
    nothing that could end or escape the string) has the same shape, and is read by
    two compares. Where one such text is not plain, the chunk is read again, every
    frame by the regex."""

    __slots__ = ("_end", "_head", "_tail")

    def __init__(self) -> None:
        self._head = _NO_HEAD  # the last regex-read frame around its text
        self._tail = b""
        self._end = b"\n\n"  # `_tail` and the frame's end

    def read(self, chunk: bytes) -> str | None:
        """Choice 0's content in `chunk` (whole LF-framed frames), where every frame
        has the shape OpenAI writes (`_PLAIN_FRAME`), so no other text, no other
        choice, no repeated key that would move or hide the text, and no escape
        outside the texts (a key spelt `"con\\u0074ent"` is `content` to every JSON
        parser), else None. Non-ASCII text is None too: the guards' normalised view
        must see it."""
        head, end = self._head, self._end
        # One frame, shaped as the last? (A chunk may begin with `_NO_HEAD`; a piece not.)
        if head is not _NO_HEAD and chunk.startswith(head) and chunk.endswith(end):
            text = chunk[len(head) : len(chunk) - len(end)]
            if (
                len(chunk) >= len(head) + len(end)
                and b'"' not in text
                and b"\\" not in text
                and b"\n" not in text  # nor more frames
            ):
                return text.decode() if text.isascii() else None
        pieces = chunk.split(b"\n\n")  # JSON has no raw newline: one piece per frame
        pieces.pop()  # after the last frame's end
        read = self._read(pieces, head, self._tail)
        if read is None:
            return None
        texts, plain, self._head, self._tail = read
        self._end = self._tail + b"\n\n"
        if plain:
            joined = plain[0] if len(plain) == 1 else b"".join(plain)
            if b'"' in joined or b"\\" in joined or b"\n" in joined:
                read = self._read(pieces, _NO_HEAD, b"", learn=False)
                if read is None:
                    return None
                texts = read[0]
        raw = texts[0] if len(texts) == 1 else b"".join(texts)
        if not raw.isascii():
            return None
        if b"\\" not in raw:
            return raw.decode()
        text = loads(b'"' + raw + b'"')  # escapes, read as the full parse reads them
        return text if isinstance(text, str) and text.isascii() else None

    @staticmethod
    def _read(
        pieces: list[bytes], head: bytes, tail: bytes, *, learn: bool = True
    ) -> tuple[list[bytes], list[bytes], bytes, bytes] | None:
        """(every frame's text, the texts read by the remembered shape, which the
        caller checks for plain characters, the shape now) or None: a frame of
        another shape. Without `learn`, no frame's shape is remembered: every frame
        is read by the regex (the second reading, after a text that was not plain)."""
        cut, end, keep = len(head), len(tail), len(head) + len(tail)
        texts: list[bytes] = []
        plain: list[bytes] = []
        for piece in pieces:
            if piece.startswith(head) and piece.endswith(tail) and len(piece) >= keep:
                text = piece[cut : len(piece) - end]
                texts.append(text)
                plain.append(text)
                continue
            m = _PLAIN_FRAME.fullmatch(piece + b"\n\n")
            if m is None or piece.count(_CHOICES_KEY) != (piece != _DONE_PIECE):
                return None  # a second `"choices"` in a frame: the last one is read
            text = m[1]
            if text is not None:
                texts.append(text)
                if not learn:
                    continue
                head, tail = piece[: m.start(1)], piece[m.end(1) :]
                cut, end, keep = len(head), len(tail), len(head) + len(tail)
        return texts, plain, head, tail
