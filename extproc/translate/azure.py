"""OpenAI chat client -> an Azure OpenAI deployment: the same API on another path.

Azure names the model in the path (`/openai/deployments/{deployment}/chat/completions
?api-version=...`) and takes its key in `api-key` (the credential follows the
provider, as for every alias). The body goes as the client sent it, the alias's model
in it; the answer is OpenAI chat already, so `response` is None and the exchange reads
it as native traffic (metering, guards, the hidden usage chunk).
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote

import orjson

from extproc.translate.base import UpstreamRequest
from extproc.translate.chat_request import wants_usage

DEFAULT_API_VERSION = "2024-10-21"


class ChatToAzure:
    """The translator (settings only: the `api-version`)."""

    source: ClassVar[str] = "openai_chat"
    target: ClassVar[str] = "azure_chat"

    def __init__(self, api_version: str | None = None) -> None:
        self.api_version = api_version or DEFAULT_API_VERSION

    def request(self, body: dict[str, Any], model: str | None = None) -> UpstreamRequest:
        name = model or str(body.get("model") or "")
        path = (
            f"/openai/deployments/{quote(name, safe='')}/chat/completions"
            f"?api-version={quote(self.api_version, safe='')}"
        )
        return UpstreamRequest(
            path=path,
            body=orjson.dumps(body),
            stream=body.get("stream") is True,
            model=name,
            headers=(("content-type", "application/json"),),
            include_usage=wants_usage(body),
        )

    def response(self, upstream: UpstreamRequest, *, created: int) -> None:
        """None: the answer is in the client's own API."""
        return None
