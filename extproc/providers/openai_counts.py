"""The byte searches that meter whole OpenAI Chat Completions frames without a parse
(`OpenAIChatStream.feed_whole`): text deltas, the finish reason, the end marker, and
where a usage figure sits (the one frame per stream that is decoded).

Each answers as the frame-by-frame parse does (tests/test_providers_openai_chat.py
holds them to it); a provider's frame is not trusted to be well formed.
"""

from __future__ import annotations

import re

USAGE_KEY = b'"usage"'
USAGE_NULL = b',"usage":null'
FINISH = b'"finish_reason":"'
CONTENT = b'"content":"'
ARGUMENTS = b'"arguments":"'
REASONING = b'"reasoning_content":"'
REASONING_OLLAMA = b'"reasoning":"'
REFUSAL = b'"refusal":"'
DONE = b"[DONE]"
DONE_FRAME = b"data: [DONE]\n\n"  # JSON escapes newlines: only the end marker ends so


# A `"usage"` key not written `,"usage":null` (what a provider asked for usage puts in
# every chunk): a usage figure, or at least not the null the byte counts expect.
USAGE_FIGURE = re.compile(rb'"usage"(?:(?!:null)|(?<!,"usage"))')


def done_frames(frames: bytes) -> bool:
    """A `data: [DONE]` frame of its own is among these whole frames (a comment or an
    `id:` line saying `[DONE]` is no end: the SDKs read on). Searched from the end,
    where a stream's marker is: on a coalesced chunk of 20 KB that ends in it, 0.2 µs
    against 8 for a search from the start (as costly when there is none)."""
    at = frames.rfind(DONE_FRAME)
    while at >= 0:  # once a stream: a loop is cheap here
        if at == 0 or frames.startswith(b"\n\n", at - 2):
            return True
        at = frames.rfind(DONE_FRAME, 0, at)  # the marker cannot overlap itself
    return False


def usage_figure(chunk: bytes, start: int) -> int:
    """Where, from `start`, `usage_walk` stops (-1: nowhere), found by one regex search
    instead of a Python step per `"usage":null` (a coalesced chunk has one per frame).
    The walk skips 13 bytes past each null, so a key right after one (`null"usage"`, not
    JSON) is not visited: there, the walk itself answers."""
    found = USAGE_FIGURE.search(chunk, start)
    if found is None:
        return -1
    at = found.start()
    if at >= len(USAGE_NULL) and chunk.startswith(USAGE_NULL, at - len(USAGE_NULL)):
        return usage_walk(chunk, start)
    return at


def usage_walk(chunk: bytes, start: int) -> int:
    """The first `"usage"` from `start` not written `,"usage":null`, each checked in turn."""
    at = chunk.find(USAGE_KEY, start)
    while at >= 0 and chunk.startswith(USAGE_NULL, at - 1):
        at = chunk.find(USAGE_KEY, at + len(USAGE_NULL))
    return at


def is_null_after(data: bytes, at: int) -> bool:
    """True if the JSON value after `"usage"` (colon, spaces) is `null`."""
    rest = data[at : at + 16].lstrip()
    return rest[:1] == b":" and rest[1:].lstrip()[:4] == b"null"


TEXT_KEYS = (CONTENT, ARGUMENTS, REASONING, REASONING_OLLAMA, REFUSAL)
# One pass for all of them: a key, then a string that is not empty.
TEXT_DELTA = re.compile(b"(?:" + b"|".join(re.escape(key) for key in TEXT_KEYS) + b')(?!")')


def finish_in(frames: bytes) -> str | None:
    """The last finish reason written in these bytes, as `_count` reads it."""
    at = frames.rfind(FINISH)
    if at < 0:
        return None
    start = at + len(FINISH)
    return frames[start : frames.find(b'"', start)].decode("utf-8", "replace")


def text_deltas(data: bytes) -> int:
    """Non-empty text deltas (content, tool arguments, reasoning, refusal) in these
    bytes: the unit of the completion estimate when a provider reports no usage."""
    return len(TEXT_DELTA.findall(data))
