"""Prompt guards: detectors, patterns, keywords and webhooks on requests, and the same
detectors on responses, streamed (masked or blocked in flight) or whole.

Modules: `detectors` (what to find), `prefix` (how little of a stream to hold back),
`scanner` (deciding matches on a partial text exactly as on the whole), `engine`
(guards grouped by action per exchange), `stream` (frames held, masked, released),
`webhook` (external checkers). This module is the policy stage that wires them in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from extproc.config import Config
from extproc.metrics import Metrics
from extproc.policy import Refusal, RequestContext, Shared, Stage, StreamBlocked, StreamFilter
from extproc.policy.guards.anywhere import anywhere, nothing_anywhere
from extproc.policy.guards.engine import (
    Entry,
    Findings,
    Guard,
    GuardSet,
    Plan,
    scan_steps,
    scan_texts,
)
from extproc.policy.guards.stream import BUDGET_CODE, GuardStream
from extproc.policy.guards.webhook import Webhook, WebhookError
from extproc.providers._json import loads

__all__ = ["GuardStage", "build"]

log = logging.getLogger("extproc.guards")

KIND = "guard_blocked"  # errors_total{kind} for a refused request or an ended stream
YIELD_SECONDS = 0.01  # a long request scan lets other streams run this often


def build(config: Config, shared: Shared, environ: Mapping[str, str]) -> Stage | None:
    if not config.guards.rules:
        return None
    return GuardStage(GuardSet(config.guards), shared.metrics, shared, environ)


class GuardStage(Stage):
    name = "guards"

    def __init__(
        self, guards: GuardSet, metrics: Metrics, shared: Shared, environ: Mapping[str, str]
    ) -> None:
        self.guards = guards
        self.metrics = metrics
        self.clock = time.perf_counter  # the scan budget's clock (tests pass their own)
        self.webhooks = {
            g.index: Webhook(g.config.webhook, shared, environ)
            for g in guards.guards
            if g.config.webhook is not None
        }
        # Per request plan: one RE2 search clearing all its detectors (anywhere.py).
        self._anywhere: dict[Plan, Any] = {}

    # -- requests ---------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        info = ctx.info
        if info is None:
            return
        asked = _logprobs_param(info.body)
        if asked is not None and self._response_plan(ctx) is not None:
            raise Refusal(
                400,
                "Log probabilities repeat the answer's tokens, which this route's response "
                f"guard masks in the text only: send the request without {asked}.",
                "logprobs_unguarded",
                param=asked,
                kind="bad_request",
            )
        plan = self.guards.plan("request", ctx.route.name, ctx.consumer)
        if plan.empty or not info.prompt_texts:
            return
        texts = masked = info.prompt_texts
        total = sum(map(len, texts))
        if total > self.guards.budget_chars:
            why = f"{total} characters to scan, budget {self.guards.budget_chars}"
            raise self._over_budget(ctx, why)
        if not nothing_anywhere_in(self._anywhere, plan, texts):  # else: nothing to find
            findings = Findings()
            masked = await self._scan_request(ctx, plan, texts, total, findings)
            self._record(ctx, "request", findings)
            if findings.rejected is not None:
                raise _refusal(findings.rejected.guard, "request")
        for guard in plan.webhooks:
            masked = await self._ask(ctx, guard, masked)
        if masked != texts:
            ctx.format.replace_request_texts(info, masked)
            ctx.body_dirty = True

    async def _scan_request(
        self, ctx: RequestContext, plan: Plan, texts: list[str], total: int, findings: Findings
    ) -> list[str]:
        """The request's texts (`total` characters, within the budget's) scanned within
        the time budget: refused (413/400) when the check takes too long, never a
        worker stalled. Long scans let the event loop run other streams every
        YIELD_SECONDS."""
        guards = self.guards
        out: list[str] = []
        spent = 0.0
        clock = self.clock
        started = clock()
        for _ in scan_steps(plan, texts, findings, out):
            now = clock()
            if spent + (now - started) > guards.budget_seconds:
                ms = guards.budget_seconds * 1000
                raise self._over_budget(ctx, f"scan took over {ms:.0f} ms ({total} characters)")
            if now - started > YIELD_SECONDS:
                spent += now - started
                await asyncio.sleep(0)  # other streams' messages are answered meanwhile
                started = clock()  # time spent elsewhere is not this request's
        return out

    def _over_budget(self, ctx: RequestContext, why: str) -> Refusal:
        ctx.metadata["guard_blocked"] = "budget"
        log.warning(
            "guards refused the request: %s route=%s consumer=%s",
            why,
            ctx.route.name,
            ctx.consumer or "-",
        )
        status = self.guards.budget_status
        return Refusal(
            status,
            "The request is too large for the gateway's content checks."
            if status == 413
            else "The request could not be checked by the gateway's content checks.",
            BUDGET_CODE,
            kind=BUDGET_CODE,
        )

    async def _ask(self, ctx: RequestContext, guard: Guard, texts: list[str]) -> list[str]:
        """One webhook guard: the (possibly masked) texts to send on, or a Refusal."""
        webhook = self.webhooks[guard.index]
        payload = {
            "guard": guard.name,
            "phase": "request",
            "route": ctx.route.name,
            "consumer": ctx.consumer,
            "model": ctx.info.model if ctx.info else "",
            "texts": texts,
        }
        timer = self.metrics.guard_webhook_seconds.labels(guard.name).time()
        try:
            with timer:
                verdict = await webhook.check(payload)
        except WebhookError as exc:
            self.metrics.guard_webhook_calls.labels(guard.name, exc.outcome).inc()
            mode = "open" if webhook.fail_open else "closed"
            log.warning("guard %s: webhook failed (%s), failing %s", guard.name, exc.reason, mode)
            if webhook.fail_open:
                return texts
            raise Refusal(
                503,
                f"The content check '{guard.name}' is unavailable; try again later.",
                "guard_unavailable",
                kind="guard_unavailable",
                headers={"x-ai-gateway-guard": guard.name},
            ) from None
        self.metrics.guard_webhook_calls.labels(guard.name, verdict.action).inc()
        if verdict.action == "reject":
            self.metrics.guard_findings.labels(guard.name, "request", "reject", "WEBHOOK").inc()
            _finding(ctx, "request", guard.name, "WEBHOOK", "reject")
            log.warning(
                "guard %s: webhook rejected the request route=%s consumer=%s reason=%r",
                guard.name,
                ctx.route.name,
                ctx.consumer or "-",
                verdict.reason,  # the service's words (the contract: never the text)
            )
            ctx.metadata["guard_blocked"] = guard.name
            raise _refusal(guard, "request")
        if verdict.action == "mask" and verdict.texts is not None and verdict.texts != texts:
            self.metrics.guard_findings.labels(guard.name, "request", "mask", "WEBHOOK").inc()
            _finding(ctx, "request", guard.name, "WEBHOOK", "mask")
            ctx.metadata["guard_masked"] = int(ctx.metadata.get("guard_masked", 0)) + 1
            return verdict.texts
        return texts

    # -- responses --------------------------------------------------------------------

    def _response_plan(self, ctx: RequestContext) -> Plan | None:
        plan = self.guards.plan("response", ctx.route.name, ctx.consumer)
        return plan if plan.groups else None

    def on_response_headers(self, ctx: RequestContext) -> None:
        if self._response_plan(ctx) is not None:
            ctx.buffer_response = True  # a whole JSON answer is checked before it leaves
            ctx.must_read_response = True

    def stream_filter(self, ctx: RequestContext) -> StreamFilter | None:
        plan = self._response_plan(ctx)
        if plan is None:
            return None
        decoder = ctx.decoder
        if decoder is None:  # the exchange sets it before it asks for stream filters
            return None

        def report(action: str, entry: Entry, repeat: bool) -> None:
            if action == "reject":
                self._record(ctx, "response", _one(entry))
                raise StreamBlocked(entry.guard.message("response"), _code(entry.guard), KIND)
            if repeat:
                return
            name = entry.guard.name
            _finding(ctx, "response", name, entry.type, action)
            self.metrics.guard_findings.labels(name, "response", action, entry.type).inc()
            key = "guard_masked" if action == "mask" else "guard_logged"
            ctx.metadata[key] = int(ctx.metadata.get(key, 0)) + 1
            if action == "log":
                log.info(
                    "guard %s found %s in a response (log only) route=%s consumer=%s",
                    name,
                    entry.type,
                    ctx.route.name,
                    ctx.consumer or "-",
                )

        return GuardStream(
            plan,
            decoder,
            report,
            budget_seconds=self.guards.budget_seconds,
            clock=self.clock,
        )

    def on_completion(self, ctx: RequestContext, body: bytes) -> bytes | None:
        plan = self._response_plan(ctx)
        if plan is None:
            return None
        deltas = ctx.format.completion_texts(body)
        if not deltas:
            if loads(body) is None:  # SSE under a JSON label, say: the client reads it
                raise Refusal(
                    502,
                    "The provider's answer is not JSON, so the response guard cannot read it.",
                    "decode_error",
                    kind="decode_error",
                )
            return None
        texts = [d.text for d in deltas]
        findings = Findings()
        masked = scan_texts(plan, texts, findings)
        self._record(ctx, "response", findings)
        if findings.rejected is not None:
            raise _refusal(findings.rejected.guard, "response")
        if masked == texts:
            return None
        return ctx.format.rewrite_completion(body, masked)

    # -- bookkeeping ------------------------------------------------------------------

    def _record(self, ctx: RequestContext, phase: str, findings: Findings) -> None:
        """Metrics, metadata and one log line per phase: guard names, types, counts."""
        m = self.metrics.guard_findings
        for (guard, kind), count in findings.masked.items():
            m.labels(guard, phase, "mask", kind).inc(count)
            _finding(ctx, phase, guard, kind, "mask")
        for (guard, kind), count in findings.logged.items():
            m.labels(guard, phase, "log", kind).inc(count)
            _finding(ctx, phase, guard, kind, "log")
        masked = sum(findings.masked.values())
        if masked:
            ctx.metadata["guard_masked"] = int(ctx.metadata.get("guard_masked", 0)) + masked
        if findings.logged:
            ctx.metadata["guard_logged"] = int(ctx.metadata.get("guard_logged", 0)) + sum(
                findings.logged.values()
            )
            log.info(
                "guard findings (log only) phase=%s route=%s consumer=%s: %s",
                phase,
                ctx.route.name,
                ctx.consumer or "-",
                ", ".join(f"{g}:{t}x{n}" for (g, t), n in sorted(findings.logged.items())),
            )
        rejected = findings.rejected
        if rejected is not None:
            m.labels(rejected.guard.name, phase, "reject", rejected.type).inc()
            _finding(ctx, phase, rejected.guard.name, rejected.type, "reject")
            ctx.metadata["guard_blocked"] = rejected.guard.name
            log.warning(
                "guard %s blocked the %s (%s) route=%s consumer=%s",
                rejected.guard.name,
                phase,
                rejected.type,
                ctx.route.name,
                ctx.consumer or "-",
            )


def nothing_anywhere_in(cache: dict[Plan, Any], plan: Plan, texts: list[str]) -> bool:
    """`nothing_anywhere` with the plan's regex, built once per plan (bounded)."""
    if plan not in cache:
        if len(cache) > 1024:  # as GuardSet's plans: consumers come and go
            cache.clear()
        detectors = [d for _, group in plan.groups for d in group.scanner.detectors]
        cache[plan] = anywhere(detectors)
    regex = cache[plan]
    return regex is not None and nothing_anywhere(regex, texts)


def _one(entry: Entry) -> Findings:
    findings = Findings()
    findings.rejected = entry
    return findings


def _code(guard: Guard) -> str:
    return guard.config.reject.code


def _logprobs_param(body: Any) -> str | None:
    """The field by which a request asks for log probabilities, if any: OpenAI chat's
    `logprobs` / `top_logprobs`, the Responses API's `top_logprobs` and `include`,
    Gemini's `responseLogprobs` / `logprobs` (either spelling of its config)."""
    if not isinstance(body, dict):
        return None
    for key in ("logprobs", "top_logprobs"):
        if body.get(key) not in (None, False, 0):
            return key
    include = body.get("include")
    if isinstance(include, list) and any("logprobs" in str(item) for item in include):
        return "include"
    for key in ("generationConfig", "generation_config"):
        config = body.get(key)
        if isinstance(config, dict):
            for name in ("responseLogprobs", "response_logprobs", "logprobs"):
                if config.get(name) not in (None, False, 0):
                    return f"{key}.{name}"
    return None


def _refusal(guard: Guard, phase: str) -> Refusal:
    reject = guard.config.reject
    return Refusal(
        reject.status,
        guard.message(phase),
        reject.code,
        kind=KIND,
        headers={"x-ai-gateway-guard": guard.name},
    )


MAX_FINDINGS = 64  # per exchange, in the trace


def _finding(ctx: RequestContext, phase: str, guard: str, kind: str, action: str) -> None:
    """One finding for the exchange's span (names and types only; bounded)."""
    if len(ctx.findings) < MAX_FINDINGS:
        ctx.findings.append((phase, guard, kind, action))
