"""The upstream half of failover: one `Attempt` per ext_proc stream of the cluster-level
filter, i.e. per try Envoy makes. Envoy has chosen the endpoint; its metadata names
the alias and the target. The attempt gets that provider's credential, the target's
model (and, for a target in another API, the request translated for it), and its
response carries `x-ai-gateway-target: index;attempt` back to the router-level stream
(which strips it). Sans-I/O: messages in, answers out.

Measured against Envoy 1.40: what an upstream filter does to the request *headers*
stays for the next attempt (the router hands every attempt the same header map), while
the *body* is the router's buffered original each time. So every attempt sets all it
depends on (path, credential, content type) and removes what another target's attempt
may have left; what it must know of the original request (the client's API and path)
travels in the body (`STASH_KEY`), which each attempt takes out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from extproc import envoy_wire as wire
from extproc.cloudauth.refresher import CredentialsUnavailable
from extproc.envoy_wire import BodyMode, Request, Response
from extproc.errors import SIDECAR_DETAILS_PREFIX, RequestError, error_body
from extproc.failover.plan import METADATA_KEY, STASH_KEY, TARGET_HEADER, Target
from extproc.failover.stage import FailoverStage
from extproc.metrics import Metrics
from extproc.policy import Policy, credentials
from extproc.providers import FAMILIES, detect_format, format_for

log = logging.getLogger("extproc.failover")
ATTEMPT_HEADER = "x-envoy-attempt-count"
# Headers that must not reach the provider: which try this is, and the previous
# attempt's Host (auto_host_rewrite keeps it there).
_DROPPED = (ATTEMPT_HEADER, "x-envoy-original-host")
# What a cloud signature (SigV4) adds beside `authorization`, and what a translated
# attempt sets: another target must not receive what one attempt left.
_LEFT = ("x-amz-date", "x-amz-security-token", "x-amz-content-sha256", "anthropic-version")
_EVERY_CREDENTIAL = frozenset(
    name
    for family in FAMILIES.values()
    for f in family
    for name in credentials.credential_headers(f)
)


def failover_stage(policy: Policy) -> FailoverStage | None:
    for stage in policy.stages:
        if isinstance(stage, FailoverStage):
            return stage
    return None


class Attempt:
    """One try of one alias target."""

    def __init__(
        self, policy: Policy, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy
        self.stage = failover_stage(policy)
        self.metrics = metrics
        self.clock = clock
        self.method = "POST"
        self.headers: dict[str, str] = {}
        self.target: Target | None = None
        self.number = "1"
        self.outcome = ""  # "answered", "status_503" ... once the response came

    def on(self, request: Request) -> Response:
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            return self._request_headers(request)
        if kind == "request_body":
            return self._request_body(request.request_body.body)
        if kind == "response_headers":
            return self._response_headers(request)
        if kind == "response_body":
            return wire.CONTINUE_BODY
        return wire.continue_trailers(request=kind == "request_trailers")

    def _request_headers(self, request: Request) -> Response:
        """Which target; the credential and the rest follow with the body."""
        headers = self.headers = wire.header_map(request)
        self.number = headers.get(ATTEMPT_HEADER, "1")
        self.method = headers.get(":method", "POST")
        found = wire.upstream_host_fields(request, METADATA_KEY)
        stage = self.stage
        targets = stage.aliases.get(str(found.get("alias", ""))) if stage else None
        index = found.get("target")
        if stage is None or not targets or not isinstance(index, int | float):
            # Not ours (a policy reload removed the alias?): the request goes on as is.
            log.warning("failover: an attempt for an unknown target %r", found)
        else:
            self.target = targets[int(index)]
        return wire.continue_request_headers({}, _DROPPED, skip_bodies=False)

    def _request_body(self, body: bytes) -> Response:
        target, stage = self.target, self.stage
        if target is None or stage is None:
            return wire.continue_request_body()
        provider = stage.config.providers[target.provider]
        try:
            document: Any = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            document = None
        stash = document.pop(STASH_KEY, None) if isinstance(document, dict) else None
        stash = stash if isinstance(stash, dict) else {}
        path = str(stash.get("path") or self.headers.get(":path", ""))
        api = str(stash.get("api") or "")
        sets: dict[str, str] = {}
        new: bytes | None = None
        fmt = detect_format(provider.format, path) or format_for(provider.format)
        if api and all(f.name != api for f in FAMILIES[provider.format]):
            translator = stage.translators.get((api, provider.name))
            if translator is None or not isinstance(document, dict):
                return self._refuse(502, "No translation to this target.", "no_translation")
            try:
                upstream = translator.request(document, target.model)
            except RequestError as exc:  # refused for this target's API: said as it is
                return self._refuse(exc.status, str(exc), exc.code, exc.param)
            fmt = format_for(provider.format)
            new, path = upstream.body, upstream.path
            sets.update(upstream.headers)
        elif isinstance(document, dict) and (document.get("model") != target.model or stash):
            document["model"] = target.model
            new = orjson.dumps(document)
        if stash:  # the path this attempt goes to, whatever an earlier attempt set
            sets[":path"] = path
        if new is not None:
            sets["content-length"] = str(len(new))
        try:
            sets.update(self._credential(fmt, path, body if new is None else new))
        except CredentialsUnavailable as exc:
            # Not retried by Envoy (an upstream filter's own answer): said as it is.
            log.warning("failover: no credentials for %s yet: %s", target.provider, exc)
            return self._refuse(
                503,
                "The gateway has no credentials for this target yet; retry shortly.",
                "credentials_unavailable",
            )
        remove = sorted(
            name
            for name in (*_EVERY_CREDENTIAL, *_LEFT)
            if name in self.headers and name not in sets
        )
        if new is None and not sets and not remove:
            return wire.continue_request_body()
        return wire.replace_request_body(new, sets, remove, clear_route_cache=False)

    def _credential(self, fmt: Any, path: str, body: bytes) -> dict[str, str]:
        """The target's key in its format's header, or a cloud credential (SigV4, a
        Google or Entra token) over the exact path and bytes this attempt sends."""
        stage, target, cloud = self.stage, self.target, self.policy.cloud
        assert stage is not None and target is not None
        provider = stage.config.providers[target.provider]
        if provider.auth is None:
            return credentials.provider_headers(
                provider, fmt, stage.keys.get(provider.name), self.headers
            )
        authorizer = cloud.get(provider.name) if cloud is not None else None
        if authorizer is None:
            return {}
        from extproc.cloudauth import authority

        authorizer.start()
        return authorizer.headers(self.method, authority(provider), path, body)

    def _refuse(self, status: int, message: str, code: str | None, param: str | None = None):
        return wire.refuse(
            status,
            {"retry-after": "5"} if status == 503 else {},
            error_body(status, message, code, param),
            f"{SIDECAR_DETAILS_PREFIX}{code}",
        )

    def _response_headers(self, request: Request) -> Response:
        headers = wire.header_map(request)
        try:
            status = int(headers.get(":status", "0"))
        except ValueError:
            status = 0
        target = self.target
        if target is None:
            return wire.continue_response_headers(None, body=BodyMode.SKIP)
        retried = self.stage is not None and status in self.stage.retry_statuses
        self.outcome = f"status_{status}" if retried or status >= 500 else "answered"
        self._count(self.outcome)
        marker = {TARGET_HEADER: f"{target.index};{self.number}"}
        return wire.continue_response_headers(marker, body=BodyMode.SKIP)

    def close(self) -> None:
        """The stream ended: an attempt with no response was reset or timed out."""
        if self.target is not None and not self.outcome:
            self.outcome = "no_response"
            self._count(self.outcome)

    def _count(self, reason: str) -> None:
        target = self.target
        assert target is not None
        self.metrics.failover_attempts.labels(target.alias, target.label, reason).inc()
