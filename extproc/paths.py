"""Request paths read the way the laxest provider stack might read them.

A gateway that classifies `/v1/chat%2Fcompletions` as "not an API we inspect" and lets
it through has lost, because WSGI, Starlette and Go muxes variously decode `%2F`, fold
case, drop `;` parameters or resolve `..` and then serve a chat completion. So a path is
either *canonical* (one reading only: no encoded structure, no dot or empty segments, no
parameters) and classified on its decoded form, or it is refused. Envoy's own
normalisation (`normalize_path`, `merge_slashes`, escaped slashes rejected) runs first
where the bootstrap is ours; this is the same rule where it is not (Envoy Gateway).

Sans-I/O: strings in, a decoded path or a `PathRefused` out.
"""

from __future__ import annotations

import re
import string
from urllib.parse import unquote

_HEX = frozenset(string.hexdigits)
# Encoded, these would change how a decoding provider splits or routes the path.
_NEVER_ENCODED = frozenset(string.ascii_letters + string.digits + "-._~/\\;%?#")
_FORBIDDEN = frozenset("\\;#")
# The tails of every API path a format reads, lower-cased: a path that differs from
# one of these only by case is ambiguous, not unknown.
API_TAILS = (
    "/chat/completions",
    "/responses",
    "/v1/messages",
    ":generatecontent",
    ":streamgeneratecontent",
    "/converse",
    "/converse-stream",
)
# Clients ask frameworks to treat a request as another method with these.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")


class PathRefused(ValueError):
    """A path with more than one plausible reading; the message says which part."""


# A path that is canonical as sent: segments of unreserved characters (and `:`, as in
# Gemini's `models/x:generateContent`) that cannot be `.` or `..` (none starts with a
# dot), none empty but a trailing one, no `%`; the query is not read. `canonical` gives
# such a path back unchanged, so it is answered without the character walk (every API
# request's path is one).
_PLAIN = re.compile(r"(?:/[A-Za-z0-9_~:-][A-Za-z0-9._~:-]*)+/?(?:\?.*)?", re.DOTALL)


def canonical(raw: str) -> str:
    """The decoded path (query kept as sent) of a canonical `raw` path, else PathRefused."""
    if _PLAIN.fullmatch(raw) is not None:
        return raw
    return _canonical(raw)


def _canonical(raw: str) -> str:
    """`canonical` by the character walk: every path the fast check does not pass."""
    path, sep, query = raw.partition("?")
    if not path.startswith("/"):
        raise PathRefused("The request path must start with '/'.")
    for index, ch in enumerate(path):
        if not "!" <= ch <= "~":
            raise PathRefused("The request path contains a space, control or non-ASCII byte.")
        if ch in _FORBIDDEN:
            raise PathRefused(f"The request path must not contain '{ch}'.")
        if ch == "%":
            code = path[index + 1 : index + 3]
            if len(code) != 2 or not set(code) <= _HEX:
                raise PathRefused("The request path has an invalid percent-encoding.")
            decoded = chr(int(code, 16))
            if decoded in _NEVER_ENCODED:
                raise PathRefused(
                    f"The request path percent-encodes '{decoded}' (%{code.upper()}); "
                    "send it unencoded."
                )
    decoded = unquote(path)
    segments = decoded.split("/")[1:]
    for position, segment in enumerate(segments):
        if segment in (".", ".."):
            raise PathRefused("The request path must not contain '.' or '..' segments.")
        if not segment and position != len(segments) - 1:
            raise PathRefused("The request path must not contain empty segments ('//').")
    return decoded + sep + query


def looks_like_api(path: str) -> bool:
    """Whether `path` (decoded) names a model API in any letter case."""
    tail = path.partition("?")[0].rstrip("/").lower()
    return tail.endswith(API_TAILS)


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    """`path` (decoded, query ignored, trailing '/' ignored) against exact paths or
    prefixes written with a trailing `*`."""
    plain = path.partition("?")[0].rstrip("/") or "/"
    for pattern in patterns:
        if pattern.endswith("*"):
            if plain.startswith(pattern[:-1]):
                return True
        elif plain == (pattern.rstrip("/") or "/"):
            return True
    return False
