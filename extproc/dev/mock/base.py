"""What every mock wire format shares: the job a route builds and the `MockFormat`
record the server dispatches on (the mock's `providers/base.py`).

A format module is sans-I/O: `job(body, path, options)` turns a request into the
frames to send, and `error(err)` renders a refusal in the format's own shape; only
`server` touches aiohttp.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from extproc.dev.mock.errors import MockError, openai_error
from extproc.dev.mock.knobs import MockOptions
from extproc.providers import RequestError, WireFormat

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"


@dataclass(frozen=True, slots=True)
class Job:
    """One validated request turned into the frames to send."""

    stream: bool
    frames: list[bytes]
    content_type: str  # of a streamed answer (a whole one is always JSON)
    model: str
    tokens: int  # output pieces, to pace a non-streamed answer like a stream


def _no_headers(digest: str) -> dict[str, str]:
    return {}


@dataclass(frozen=True, slots=True)
class MockFormat:
    """One served format: how to answer a request and how to refuse one.

    `name` picks the `x-mock-status` wording (openai, anthropic, gemini, bedrock);
    `wire` is the gateway's WireFormat for the route (its `parse_request` validates
    and names the model for error messages); `request_id` gives the provider's
    request-id header from the body's hex digest; `line_ending` is the format's own,
    used unless `x-mock-line-ending` says otherwise; `authorize` (method, raw path,
    lower-case headers, body) refuses a request the provider would not accept (a bad
    SigV4 signature), before anything else is looked at."""

    name: str
    wire: type[WireFormat]
    job: Callable[[bytes, str, MockOptions], Job]
    error: Callable[[MockError], tuple[bytes, dict[str, str]]] = openai_error
    request_id: Callable[[str], dict[str, str]] = field(default=_no_headers)
    line_ending: bytes = b"\n"
    authorize: Callable[[str, str, Mapping[str, str], bytes], MockError | None] | None = None

    def model_hint(self, body: bytes, path: str) -> str:
        """The requested model, for `x-mock-status` messages (the body may be invalid)."""
        try:
            model = self.wire.parse_request(body, path).model
        except RequestError:
            model = ""
        return model or "gpt-3.5-turbo"
