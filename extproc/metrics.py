"""Prometheus metrics. One `Metrics` object per process; label children that the hot
path touches on every message are bound once, since `.labels()` costs a dict lookup
and a lock per call.

With several workers (`server.workers` > 1) every process writes its samples to
prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set by the
supervisor before any worker starts) and the supervisor serves one /metrics that sums
them: counters and histograms add up across workers and survive a worker's restart,
and `ai_gateway_active_streams` counts live workers only (`livesum`). Which worker
took a stream is the one per-worker figure: `ai_gateway_worker_streams_total{worker}`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
_PER_TOKEN = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
_MESSAGE = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
CHILDREN = 4096  # label children remembered by `Metrics.child`
PHASES = ("request_headers", "request_body", "response_headers", "response_body")
# Every `ai_gateway_errors_total{kind}` the code counts, so its HELP (what an operator
# reads next to a dashboard) names them all; tests/test_metrics_help.py finds the kinds
# in the code and fails when one is missing here or listed but never used.
ERROR_KINDS = (
    "bad_request",  # malformed body, oversized headers, missing model (400, 431)
    "invalid_path",  # path tricks, wrong method, unlisted endpoint (400, 404, 405)
    "auth",  # missing or refused credentials (401)
    "auth_denied",  # a known caller refused (403)
    "auth_unavailable",  # signing keys not loaded yet (503)
    "model_denied",  # the consumer may not use the model (403)
    "model_not_found",  # no route serves the model (404)
    "guard_blocked",  # a guard rejected the request or ended the stream
    "guard_budget_exceeded",  # too large for the guards' scan budget
    "guard_unavailable",  # a webhook guard failed closed (503)
    "rate_limited",  # over a request or token limit (429)
    "ratelimit_unavailable",  # the limit store is down, fail_closed (503)
    "ratelimit_busy",  # too many checks already wait for the store (503)
    "budget_exceeded",  # over a spend budget (429, or 402 if configured)
    "budget_unavailable",  # the budget store is down, fail_closed (503)
    "unpriced",  # no price for the model and prices.unpriced: refuse (400)
    "upstream_error",  # the provider answered 4xx/5xx
    "stream_aborted",  # the stream ended before its end marker
    "upstream_truncated",  # the provider ended its stream without its end marker
    "shutdown_ended",  # the shutdown grace ran out: ended with an error event
    "frame_too_large",  # a response frame over the framer's bound
    "decode_error",  # a response encoding that cannot be read (passed on uninspected)
    "malformed_stream",  # broken framing (bad CRC, not the promised JSON)
    "credentials_unavailable",  # a provider's cloud credentials not fetched yet (503)
    "failover_exhausted",  # every target of an alias failed or was skipped (503)
    "overloaded",  # shed by admission control: the worker is over its limits (503)
    "off_path_unobserved",  # an off-path metered stream whose observer never came
    "internal",  # the sidecar's own failure
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ai_gateway_requests",
            "Exchanges by route, model and final HTTP status",
            ["route", "model", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "ai_gateway_tokens",
            "Tokens metered, by model, consumer and kind (prompt, completion, cached, reasoning)",
            ["model", "consumer", "kind"],
            registry=r,
        )
        self.usage_estimated = Counter(
            "ai_gateway_usage_estimated",
            "Exchanges whose usage was estimated offline because the provider reported none",
            ["model"],
            registry=r,
        )
        self.ttft = Histogram(
            "ai_gateway_time_to_first_token_seconds",
            "Streams only: request headers to the first content delta (text, tool call or "
            "reasoning)",
            ["route", "model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "ai_gateway_time_per_output_token_seconds",
            "Streams only: mean gap between output tokens after the first content delta",
            ["route", "model"],
            buckets=_PER_TOKEN,
            registry=r,
        )
        self.stream_duration = Histogram(
            "ai_gateway_stream_duration_seconds",
            "Request headers to end of response",
            ["route", "model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.active = Gauge(
            "ai_gateway_active_streams",
            "ext_proc exchanges in flight",
            registry=r,
            multiprocess_mode="livesum",  # a dead worker's streams are not in flight
        )
        self.message_time = Histogram(
            "ai_gateway_extproc_message_seconds",
            "Time to handle one ext_proc message",
            ["phase"],
            buckets=_MESSAGE,
            registry=r,
        )
        self.errors = Counter(
            "ai_gateway_errors",
            f"Refusals and failures by kind ({', '.join(ERROR_KINDS)})",
            ["kind"],
            registry=r,
        )
        self.failover_attempts = Counter(
            "ai_gateway_failover_attempts",
            "Alias targets tried or skipped, by alias, target (provider/model) and reason "
            "(answered, a status, no_response; skipped_quota, skipped_circuit)",
            ["alias", "target", "reason"],
            registry=r,
        )
        self.upstream_closed = Counter(
            "ai_gateway_upstream_closed",
            "Provider streams closed early by the gateway (streaming.on_block: close) after "
            "it had ended the client's stream, by why it ended it (guard_blocked, "
            "frame_too_large, decode_error...)",
            ["kind"],
            registry=r,
        )
        self.config_reloads = Counter(
            "ai_gateway_config_reloads",
            "Policy file changes seen, by result (success: applied; failure: refused, "
            "the previous policy stays)",
            ["result"],
            registry=r,
        )
        self.worker_streams = Counter(
            "ai_gateway_worker_streams",
            "ext_proc streams taken, by worker process (how Envoy spreads the load)",
            ["worker"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "ai_gateway_worker_restarts",
            "Worker processes that exited unexpectedly and were started again",
            registry=r,
        )
        self.ratelimit_decisions = Counter(
            "ai_gateway_ratelimit_decisions",
            "Rate-limit decisions by limit, kind (requests, tokens) and outcome (allowed, "
            "limited, too_large: can never fit, fail_open / fail_closed: store unreachable, "
            "busy: refused because too many checks already waited for the store)",
            ["limit", "kind", "outcome"],
            registry=r,
        )
        self.ratelimit_tokens = Counter(
            "ai_gateway_ratelimit_tokens",
            "Tokens by limit and phase: reserved at request time, settled (real usage) at "
            "the end; settled < reserved means refunds",
            ["limit", "phase"],
            registry=r,
        )
        self.ratelimit_leases_expired = Counter(
            "ai_gateway_ratelimit_leases_expired",
            "Reservations a dead worker left, settled once its lease expired: from the "
            "usage it had metered, or at their reservation (estimated)",
            ["store", "settled"],
            registry=r,
        )
        self.ratelimit_store_errors = Counter(
            "ai_gateway_ratelimit_store_errors",
            "Failed calls to the rate-limit store by operation (acquire, settle, ping; "
            "*_skipped: not tried while the store is marked down; acquire_busy: refused "
            "because the queue for the store was full)",
            ["store", "op"],
            registry=r,
        )
        self.ratelimit_store_restarts = Counter(
            "ai_gateway_ratelimit_store_restarts",
            "Times this process found the rate-limit store's generation key changed: Redis "
            "restarted without persistence or was flushed, so every limit began again full",
            ["store"],
            registry=r,
        )
        self.ratelimit_store_up = Gauge(
            "ai_gateway_ratelimit_store_up",
            "1 while the shared rate-limit store answers, 0 while it does not",
            ["store"],
            registry=r,
            multiprocess_mode="livemin",  # any worker that cannot reach it shows
        )
        self.guard_findings = Counter(
            "ai_gateway_guard_findings",
            "Guard matches by guard, phase (request, response), action (mask, reject, log) "
            "and type (CREDIT_CARD, EMAIL, a pattern's name...); never the matched text",
            ["guard", "phase", "action", "type"],
            registry=r,
        )
        self.guard_webhook_calls = Counter(
            "ai_gateway_guard_webhook_calls",
            "Webhook guard calls by guard and outcome (pass, mask, reject, timeout, error)",
            ["guard", "outcome"],
            registry=r,
        )
        self.guard_webhook_seconds = Histogram(
            "ai_gateway_guard_webhook_seconds",
            "Webhook guard call duration",
            ["guard"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.jwks_refresh = Counter(
            "ai_gateway_jwks_refresh",
            "JWKS (JWT signing keys) loads by source and result (ok; error: the cached "
            "keys are kept)",
            ["source", "result"],
            registry=r,
        )
        self.cloud_credentials_refresh = Counter(
            "ai_gateway_cloud_credentials_refresh",
            "Background fetches of providers' cloud credentials (`auth:`) by provider and "
            "result (ok; error: retried, the current ones used while still valid)",
            ["provider", "result"],
            registry=r,
        )
        self.cloud_credentials_expiry = Gauge(
            "ai_gateway_cloud_credentials_expiry_timestamp_seconds",
            "Unix time the provider's current cloud credentials expire (0: none held yet)",
            ["provider"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.jwks_keys = Gauge(
            "ai_gateway_jwks_keys",
            "Signing keys cached per JWKS source",
            ["source"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.jwks_stale = Gauge(
            "ai_gateway_jwks_stale",
            "1 while the last JWKS refresh failed and older cached keys are in use",
            ["source"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.jwks_last_success = Gauge(
            "ai_gateway_jwks_last_success_timestamp_seconds",
            "Unix time of the last successful JWKS load",
            ["source"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.translations = Counter(
            "ai_gateway_translations",
            "Requests translated from the client's API (from) to the provider's (to), e.g. "
            "openai_chat -> anthropic_messages",
            ["from", "to"],
            registry=r,
        )
        self.decoders = Counter(
            "ai_gateway_responses_decoded",
            "Responses inspected, by the decoder that read "
            "them (openai_sse, anthropic_sse, gemini_json_stream, bedrock_eventstream, "
            "<format>_json...)",
            ["decoder"],
            registry=r,
        )
        self.shed = Counter(
            "ai_gateway_shed",
            "Requests refused by admission control (503 overloaded, before the provider), "
            "by the limit that was reached (open_streams, queued_requests, queue_delay)",
            ["reason"],
            registry=r,
        )
        self.queue_time = Histogram(
            "ai_gateway_extproc_queue_seconds",
            "Event-loop lag: how late a ready ext_proc message is handled (probed every "
            "50 ms); admission sheds while it is over server.max_queue_delay_ms",
            buckets=(*_MESSAGE, 0.1, 0.25, 0.5, 1, 2, 5),
            registry=r,
        )
        self.saturated = Gauge(
            "ai_gateway_worker_saturated",
            "1 while a worker is over its admission limits (readiness NOT_SERVING)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.trace_spans_dropped = Counter(
            "ai_gateway_trace_spans_dropped",
            "Exchange spans not exported (telemetry:): queue_full (the collector is slow or "
            "down), export_failed (it refused or was unreachable)",
            ["reason"],
            registry=r,
        )
        self.cost = Counter(
            "ai_gateway_cost_usd",
            "Spend in USD, exact from the metered usage and the price catalog, by consumer, "
            "team, model and provider (a stream cut short: what streamed)",
            ["consumer", "team", "model", "provider"],
            registry=r,
        )
        self.price_lookups = Counter(
            "ai_gateway_price_lookups",
            "Price lookups by status (priced: the catalog; override: the policy's prices; "
            "estimated: priced as prices.unpriced's stand-in; unpriced: no price)",
            ["status"],
            registry=r,
        )
        self.budget_decisions = Counter(
            "ai_gateway_budget_decisions",
            "Budget checks by budget and outcome (allowed, exceeded: refused; fail_open / "
            "fail_closed: store unreachable; busy)",
            ["budget", "outcome"],
            registry=r,
        )
        self.budget_soft_limit = Counter(
            "ai_gateway_budget_soft_limit",
            "Soft limits crossed, by budget: once per period (per subject) across replicas",
            ["budget"],
            registry=r,
        )
        self.budget_webhook_calls = Counter(
            "ai_gateway_budget_webhook_calls",
            "Soft-limit webhook calls by outcome (ok, error, timeout)",
            ["outcome"],
            registry=r,
        )
        self.ledger_rows = Counter(
            "ai_gateway_ledger_rows",
            "Spend ledger rows by outcome (recorded, written, replayed: from the journal "
            "after an outage or a restart, unspooled: the journal was full, lost)",
            ["outcome"],
            registry=r,
        )
        self.ledger_failures = Counter(
            "ai_gateway_ledger_write_failures",
            "Ledger batches the database could not take (rows stay in the journal)",
            registry=r,
        )
        self.phase_time = {p: self.message_time.labels(p) for p in PHASES}
        self._children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, remembered: the per-exchange series (settlement's
        requests, tokens, durations) cost a dict lookup instead of labels()' checks,
        conversions and lock. Bounded: label values come from bounded sets (labels.py),
        and the cache starts over past CHILDREN (labels() returns the same child)."""
        key = (metric, *values)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= CHILDREN:
                self._children.clear()
            found = self._children[key] = metric.labels(*values)
        return found

    def settled(self, route: str, model: str, consumer: str) -> Settled:
        """The series settlement adds to for one route, model and consumer, remembered
        like `child` (one lookup per exchange instead of one per series)."""
        key = ("settled", route, model, consumer)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= CHILDREN:
                self._children.clear()
            found = self._children[key] = Settled(self, route, model, consumer)
        return found


def adder(child: Any) -> Callable[[float], None]:
    """`child.inc` of a counter child without its per-call checks: the value's own `inc`
    (prometheus-client's `_value`, in-process or multiprocess). Callers add counts,
    never a negative amount (which `inc` would refuse)."""
    value = getattr(child, "_value", None)
    return value.inc if callable(getattr(value, "inc", None)) else child.inc


def observer(child: Any) -> Callable[[float], None]:
    """`child.observe` of a histogram child, the bucket found by `bisect` rather than
    its Python loop over the bounds: the same sum and bucket (a NaN lands in none, as
    with `observe`). A child without prometheus-client's attributes gets `observe`."""
    bounds = tuple(getattr(child, "_upper_bounds", ()))
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if not bounds or buckets is None or len(buckets) != len(bounds) or total is None:
        return child.observe
    add_sum = total.inc
    last = len(bounds)

    def observe(amount: float) -> None:
        add_sum(amount)
        at = bisect_left(bounds, amount)  # the first bound >= amount
        if at < last and amount <= bounds[at]:
            buckets[at].inc(1)

    return observe


def _lazy(make: Callable[[], Callable[[float], None]]) -> Callable[[float], None]:
    """A series bound on its first use: a label child shows in /metrics once made, so
    one that an exchange never adds to (cached tokens, time per token) is not made."""
    bound: Callable[[float], None] | None = None

    def add(amount: float) -> None:
        nonlocal bound
        if bound is None:
            bound = make()
        bound(amount)

    return add


class Settled:
    """Settlement's series of one route, model and consumer: the tokens counters by
    kind and the duration, TTFT and per-token histograms, each an `adder` or
    `observer` of the child `Metrics.child` gives, bound on first use."""

    __slots__ = ("cached", "completion", "duration", "prompt", "reasoning", "tpot", "ttft")

    def __init__(self, m: Metrics, route: str, model: str, consumer: str) -> None:
        def tokens(kind: str) -> Callable[[float], None]:
            return _lazy(lambda: adder(m.child(m.tokens, model, consumer, kind)))

        def seconds(metric: Any) -> Callable[[float], None]:
            return _lazy(lambda: observer(m.child(metric, route, model)))

        self.prompt = tokens("prompt")
        self.completion = tokens("completion")
        self.cached = tokens("cached")
        self.reasoning = tokens("reasoning")
        self.duration = seconds(m.stream_duration)
        self.ttft = seconds(m.ttft)
        self.tpot = seconds(m.tpot)
