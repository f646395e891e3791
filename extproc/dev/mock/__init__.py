"""Mock LLM provider for `make run` and the end-to-end tests: every wire format the
gateway reads, from one process (docs/mock-provider.md).

The network is closed, so this is the only stand-in for the providers. It streams
OpenAI Chat Completions byte for byte the way the real API does and, synthesized from
the providers' public docs with made-up ids, the other formats on their own paths,
one module each, as in `extproc/providers/`:

- `openai_chat`: `POST /v1/chat/completions`, and Azure OpenAI's
  `/openai/deployments/{deployment}/chat/completions` (filter results) and `/openai/v1/...`;
- `openai_responses`: `POST /v1/responses` (typed SSE events);
- `anthropic`: `POST /v1/messages`;
- `gemini`: `POST /v1beta/models/{model}:generateContent` / `:streamGenerateContent`
  (`?alt=sse` for SSE, else one streamed JSON array), the same under Vertex's
  `/v1/projects/{p}/locations/{l}/publishers/google/models/...`;
- `bedrock`: `POST /model/{modelId}/converse` / `converse-stream` (binary event stream).

Requests are validated by the gateway's own parsers (`WireFormat.parse_request`),
plus the few rules real providers add. All formats answer the same conversation with
the same words and token counts (`plan`), and honour the same `x-mock-*` header knobs
(`knobs`). Generation is sans-I/O: the `build_*` functions are pure functions of the
request dict and `MockOptions`, so tests and the benchmark reuse them without a server.
"""

from __future__ import annotations

from extproc.dev.mock.anthropic import build_anthropic, build_anthropic_stream
from extproc.dev.mock.bedrock import build_bedrock, build_bedrock_stream
from extproc.dev.mock.errors import MockError, error_payload, status_error
from extproc.dev.mock.gemini import build_gemini, build_gemini_stream
from extproc.dev.mock.knobs import (
    DEFAULT_TOKENS,
    KNOB_HEADERS,
    Knobs,
    MockOptions,
    WireKnobs,
    parse_knobs,
)
from extproc.dev.mock.openai_chat import build_completion, build_stream, parse_request
from extproc.dev.mock.openai_responses import build_responses, build_responses_stream
from extproc.dev.mock.plan import count_prompt_tokens
from extproc.dev.mock.server import MODELS, create_app, main, serve
from extproc.dev.mock.wire import gzip_pieces, split_at

__all__ = [
    "DEFAULT_TOKENS",
    "KNOB_HEADERS",
    "MODELS",
    "Knobs",
    "MockError",
    "MockOptions",
    "WireKnobs",
    "build_anthropic",
    "build_anthropic_stream",
    "build_bedrock",
    "build_bedrock_stream",
    "build_completion",
    "build_gemini",
    "build_gemini_stream",
    "build_responses",
    "build_responses_stream",
    "build_stream",
    "count_prompt_tokens",
    "create_app",
    "error_payload",
    "gzip_pieces",
    "main",
    "parse_knobs",
    "parse_request",
    "serve",
    "split_at",
    "status_error",
]
