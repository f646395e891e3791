"""The upstream half of failover: one `Attempt` per ext_proc stream of the cluster-level
filter, i.e. per try Envoy makes. Envoy has chosen the endpoint; its metadata names
the alias and the target. The attempt gets that provider's credential and the target's
model in the body, and its response carries `x-ai-gateway-target: index;attempt` back
to the router-level stream (which strips it). Sans-I/O: messages in, answers out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from extproc import envoy_wire as wire
from extproc.cloudauth.refresher import CredentialsUnavailable
from extproc.envoy_wire import BodyMode, Request, Response
from extproc.errors import SIDECAR_DETAILS_PREFIX, error_body
from extproc.failover.plan import METADATA_KEY, TARGET_HEADER, Target
from extproc.failover.stage import FailoverStage
from extproc.metrics import Metrics
from extproc.policy import Policy, credentials
from extproc.providers import detect_format, format_for

log = logging.getLogger("extproc.failover")
ATTEMPT_HEADER = "x-envoy-attempt-count"
# Headers that must not reach the provider: which try this is, and the previous
# attempt's Host (auto_host_rewrite keeps it there).
_DROPPED = (ATTEMPT_HEADER, "x-envoy-original-host")
# What a cloud signature (SigV4) adds beside `authorization`: the router-level stream
# may have signed for the target tried first; another target must not receive it.
_SIGNED = ("x-amz-date", "x-amz-security-token", "x-amz-content-sha256")


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
        self.method = "POST"
        self.path = ""
        self.clock = clock
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
        headers = wire.header_map(request)
        self.number = headers.get(ATTEMPT_HEADER, "1")
        self.method = headers.get(":method", "POST")
        self.path = headers.get(":path", "")  # as it goes upstream (the prefix rewritten)
        found = wire.upstream_host_fields(request, METADATA_KEY)
        stage = self.stage
        targets = stage.aliases.get(str(found.get("alias", ""))) if stage else None
        index = found.get("target")
        if stage is None or not targets or not isinstance(index, int | float):
            # Not ours (a policy reload removed the alias?): the request goes on as is.
            log.warning("failover: an attempt for an unknown target %r", found)
            return wire.continue_request_headers({}, _DROPPED, skip_bodies=False)
        target = self.target = targets[int(index)]
        provider = stage.config.providers[target.provider]
        fmt = detect_format(provider.format, headers.get(":path", "")) or format_for(
            provider.format
        )
        sets = {}
        if provider.auth is None:  # a cloud credential is signed over the body, below
            sets = credentials.provider_headers(
                provider, fmt, stage.keys.get(provider.name), headers
            )
        carried = (*credentials.credential_headers(fmt), *_SIGNED)
        remove = [*_DROPPED, *(h for h in carried if h in headers and h not in sets)]
        return wire.continue_request_headers(sets, remove, skip_bodies=False)

    def _request_body(self, body: bytes) -> Response:
        target = self.target
        if target is None or not body:
            return wire.continue_request_body()
        new: bytes | None = None
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None
        if isinstance(document, dict) and document.get("model") != target.model:
            document["model"] = target.model
            new = orjson.dumps(document)
        sets = {} if new is None else {"content-length": str(len(new))}
        try:
            sets.update(self._signed(body if new is None else new))
        except CredentialsUnavailable as exc:
            # Not retried by Envoy (an upstream filter's own answer): said as it is.
            log.warning("failover: no credentials for %s yet: %s", target.provider, exc)
            return wire.refuse(
                503,
                {"retry-after": "5"},
                error_body(
                    503,
                    "The gateway has no credentials for this target yet; retry shortly.",
                    "credentials_unavailable",
                    None,
                ),
                f"{SIDECAR_DETAILS_PREFIX}credentials_unavailable",
            )
        if new is None and not sets:
            return wire.continue_request_body()
        return wire.replace_request_body(new, sets, (), clear_route_cache=False)

    def _signed(self, body: bytes) -> dict[str, str]:
        """A cloud credential (SigV4, a Google or Entra token) for this attempt's
        target, over the exact path and bytes it receives; {} for a static key."""
        stage, target, cloud = self.stage, self.target, self.policy.cloud
        assert stage is not None and target is not None
        provider = stage.config.providers[target.provider]
        if provider.auth is None or cloud is None:
            return {}
        authorizer = cloud.get(provider.name)
        if authorizer is None:
            return {}
        from extproc.cloudauth import authority

        authorizer.start()
        return authorizer.headers(self.method, authority(provider), self.path, body)

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
