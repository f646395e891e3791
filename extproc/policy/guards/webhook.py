"""Asking an external service about a request: JSON over HTTP, or the same contract over
gRPC (`protos/guard.proto`) for services that want lower latency.

The contract (docs/guard-webhook.openapi.yaml): the gateway POSTs
`{guard, phase, route, consumer, model, texts}` and the service answers
`{"action": "pass"}`, `{"action": "mask", "texts": [...]}` (as many texts as it got) or
`{"action": "reject", "reason": "..."}`. Anything else, a non-200 status, an error or no
answer within the guard's timeout is a failure, which the guard's `failure` mode turns
into "let it through" (open) or "refuse with 503" (closed).

Connections are made once per process (`Shared`) and reused across requests and
policy reloads. Texts never reach logs; a failure's reason names only what went wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
import orjson

from extproc._gen import guard_pb2, guard_pb2_grpc
from extproc.config import GuardWebhookConfig
from extproc.policy import Shared

ACTIONS = ("pass", "mask", "reject")
_MAX_ANSWER_BYTES = 8 << 20
_GRPC_ACTIONS = {
    guard_pb2.CheckResponse.PASS: "pass",
    guard_pb2.CheckResponse.MASK: "mask",
    guard_pb2.CheckResponse.REJECT: "reject",
}


class WebhookError(Exception):
    """The call failed; `outcome` is a metrics label (timeout, error)."""

    def __init__(self, reason: str, outcome: str = "error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # pass | mask | reject
    texts: list[str] | None = None  # for mask
    reason: str = ""  # for reject (logs only)


def verdict_from(answer: Any, sent: int) -> Verdict:
    """Check a JSON answer against the contract."""
    if not isinstance(answer, dict):
        raise WebhookError("answer is not a JSON object")
    action = answer.get("action")
    if action not in ACTIONS:
        raise WebhookError(f"unknown action {str(action)[:40]!r}")
    reason = answer.get("reason")
    reason = reason[:200] if isinstance(reason, str) else ""
    if action != "mask":
        return Verdict(action, None, reason)
    texts = answer.get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise WebhookError("mask answer without a list of strings in 'texts'")
    if len(texts) != sent:
        raise WebhookError(f"mask answer has {len(texts)} texts for {sent} sent")
    return Verdict("mask", texts, reason)


class Webhook:
    """One guard's external checker."""

    def __init__(
        self, config: GuardWebhookConfig, shared: Shared, environ: Mapping[str, str]
    ) -> None:
        self.url = config.url
        self.timeout = config.timeout_ms / 1000
        self.fail_open = config.failure == "open"
        self._key = environ.get(config.api_key_env) if config.api_key_env else None
        self._shared = shared
        parts = urlsplit(config.url)
        self._grpc = parts.scheme in ("grpc", "grpcs")
        self._target = parts.netloc
        self._tls = parts.scheme == "grpcs"

    async def check(self, payload: dict[str, Any]) -> Verdict:
        """Ask; raise WebhookError on any failure (timeout included)."""
        try:
            if self._grpc:
                return await asyncio.wait_for(self._check_grpc(payload), self.timeout)
            return await asyncio.wait_for(self._check_http(payload), self.timeout)
        except TimeoutError:
            raise WebhookError(self._late(), "timeout") from None

    async def _check_http(self, payload: dict[str, Any]) -> Verdict:
        session = self._shared.guards_http
        if session is None:
            session = self._shared.guards_http = _new_session()
        headers = {"content-type": "application/json"}
        if self._key:
            headers["authorization"] = f"Bearer {self._key}"
        try:
            async with session.post(self.url, data=orjson.dumps(payload), headers=headers) as resp:
                if resp.status != 200:
                    raise WebhookError(f"answered HTTP {resp.status}")
                body = await resp.content.read(_MAX_ANSWER_BYTES + 1)
        except aiohttp.ClientError as exc:
            raise WebhookError(f"unreachable ({type(exc).__name__})") from None
        if len(body) > _MAX_ANSWER_BYTES:
            raise WebhookError("answer too large")
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise WebhookError("answer is not JSON") from None
        return verdict_from(answer, len(payload["texts"]))

    async def _check_grpc(self, payload: dict[str, Any]) -> Verdict:
        stub = self._shared.guards_grpc.get((self._tls, self._target))
        if stub is None:
            stub = self._shared.guards_grpc[(self._tls, self._target)] = self._new_stub()
        metadata = (("authorization", f"Bearer {self._key}"),) if self._key else None
        try:
            answer = await stub.Check(
                guard_pb2.CheckRequest(**payload), timeout=self.timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise WebhookError(self._late(), "timeout") from None
            raise WebhookError(f"gRPC {exc.code().name}") from None
        action = _GRPC_ACTIONS.get(answer.action)
        if action is None:
            raise WebhookError("answer without an action")
        texts = list(answer.texts) if action == "mask" else None
        if texts is not None and len(texts) != len(payload["texts"]):
            raise WebhookError(f"mask answer has {len(texts)} texts for {len(payload['texts'])}")
        return Verdict(action, texts, answer.reason[:200])

    def _late(self) -> str:
        return f"no answer within {self.timeout * 1000:.0f} ms"

    def _new_stub(self) -> guard_pb2_grpc.GuardServiceStub:
        if self._tls:
            channel = grpc.aio.secure_channel(self._target, grpc.ssl_channel_credentials())
        else:
            channel = grpc.aio.insecure_channel(self._target)
        return guard_pb2_grpc.GuardServiceStub(channel)


def _new_session() -> aiohttp.ClientSession:
    # Made on first use, inside the running loop; no cookies, no proxies from the env.
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=256),
        trust_env=False,
    )
