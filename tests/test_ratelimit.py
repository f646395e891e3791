"""Rate limits without Envoy: the GCRA core, both stores (Redis is a real server), the
config checks, and the stage driven through the exchange as Envoy would."""

from __future__ import annotations

import asyncio
import math
import random

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config import ConfigError, parse_config
from extproc.metrics import Metrics
from extproc.policy import Policy, RequestContext, Shared, Stage
from extproc.policy.ratelimit import build, gcra
from extproc.policy.ratelimit.gcra import Rate
from extproc.policy.ratelimit.local import LocalStore
from extproc.policy.ratelimit.redis import RedisStore
from extproc.policy.ratelimit.stage import RateLimitStage, estimate_prompt
from extproc.policy.ratelimit.store import StoreUnavailable
from extproc.providers.base import RequestInfo
from extproc.usage import estimate_tokens
from tests.redis_server import RedisServer, free_port
from tests.test_exchange import CHAT, Run, body_msg, headers_msg, stream_frames

# -- the GCRA core ------------------------------------------------------------------------


def admit_many(rate: Rate, n: int, now: float = 100.0, tat: float = 0.0) -> tuple[int, float]:
    admitted = 0
    for _ in range(n):
        ok, (new,) = gcra.acquire([tat], now, [rate], [1])
        if ok:
            admitted, tat = admitted + 1, new
    return admitted, tat


# Pairs whose intervals round so that limit * (window / limit) > window: without
# gcra.SLACK each of these admits limit - 1 (448 of the 995 pairs of limits 1-199 over
# windows 1 s, 7 s, 1 min, 1 h, 1 d do); the rest are exact and must stay exact.
ROUNDING_PAIRS = [(5, 1), (10, 7), (6, 7), (7, 60), (13, 3600), (17, 60), (23, 3600), (24, 7)]
EXACT_PAIRS = [(7, 86400), (3, 1), (10, 60), (1000, 3600), (13, 7)]


@pytest.mark.parametrize("limit,window", ROUNDING_PAIRS + EXACT_PAIRS)
def test_a_burst_admits_exactly_the_limit(limit, window):
    # window / limit is inexact for most pairs: the slack must not lose the last one
    # nor admit one more.
    assert admit_many(Rate(limit, window), limit + 5)[0] == limit


@pytest.mark.parametrize("limit,window", ROUNDING_PAIRS)
def test_the_rounding_pairs_need_the_slack(monkeypatch, limit, window):
    """The pairs above do hit the rounding: without the slack they lose the last unit."""
    monkeypatch.setattr(gcra, "SLACK", 0.0)
    assert admit_many(Rate(limit, window), limit + 5)[0] == limit - 1


def test_refill_is_continuous():
    rate = Rate(10, 60)  # one back every 6 s
    _, tat = admit_many(rate, 10, now=0.0)
    assert not gcra.fits(tat, 5.9, rate, 1)
    assert gcra.fits(tat, 6.0, rate, 1)
    assert gcra.remaining(tat, 30.0, rate) == 5
    assert gcra.reset_after(tat, 30.0) == pytest.approx(30.0)


def test_acquire_is_all_or_nothing():
    small, big = Rate(1, 60), Rate(100, 60)
    ok, tats = gcra.acquire([0.0, 0.0], 0.0, [small, big], [1, 10])
    assert ok
    again, after = gcra.acquire(tats, 0.0, [small, big], [1, 10])
    assert not again and after == tats  # the big bucket did not pay for a refused request


def test_settle_refunds_up_to_full_and_charges_into_debt():
    rate = Rate(100, 100)  # one token per second
    ok, (tat,) = gcra.acquire([0.0], 0.0, [rate], [100])
    assert ok and gcra.remaining(tat, 0.0, rate) == 0
    tat = gcra.adjust(tat, 0.0, rate, -60)  # used 40 of the 100 reserved
    assert gcra.remaining(tat, 0.0, rate) == 60
    tat = gcra.adjust(tat, 0.0, rate, -500)  # a refund never makes more than full
    assert gcra.remaining(tat, 0.0, rate) == 100 and tat == 0.0
    tat = gcra.adjust(tat, 0.0, rate, 150)  # used 150 more than reserved: debt
    assert gcra.remaining(tat, 0.0, rate) == 0
    assert gcra.retry_after(tat, 0.0, rate, 10) == pytest.approx(60.0)
    assert gcra.retry_after(tat, 0.0, rate, 101) == math.inf


@pytest.mark.parametrize(
    "seconds,text",
    [
        (0.0, "0ms"),
        (0.0201, "21ms"),
        (1.5, "1.5s"),
        (6.0, "6s"),
        (360, "6m0s"),
        (7205, "2h0m5s"),
        (90061, "1d1h1m1s"),
    ],
)
def test_reset_durations_read_like_openai(seconds, text):
    assert gcra.format_duration(seconds) == text


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 50),
    window=st.sampled_from([1.0, 7.0, 60.0, 86400.0]),
    steps=st.lists(st.tuples(st.floats(0, 2), st.integers(1, 10)), max_size=60),
)
def test_no_span_ever_admits_more_than_burst_plus_refill(limit, window, steps):
    """Whatever arrives when: in any span [t1, t2], admitted <= limit + rate * (t2 - t1)."""
    rate = Rate(limit, window)
    tat, now = 0.0, 1000.0
    admitted: list[tuple[float, int]] = []
    for dt, cost in steps:
        now += dt * window / 10
        ok, (new,) = gcra.acquire([tat], now, [rate], [cost])
        if ok:
            tat = new
            admitted.append((now, cost))
    for i, (t1, _) in enumerate(admitted):
        total = 0
        for t2, cost in admitted[i:]:
            total += cost
            # gcra.SLACK lets a unit in up to a thousandth of its interval early (float
            # rounding of the interval); never a whole extra unit.
            assert total <= limit + (t2 - t1) * limit / window + gcra.SLACK


# -- the in-process store -----------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_local_store_forgets_full_buckets():
    clock = Clock()
    store = LocalStore(clock)
    rate = Rate(5, 1)
    for i in range(5000):
        store.acquire_now([f"ip-{i}"], [rate], [1])
    assert len(store) == 5000
    clock.t += 2  # every bucket is full again
    for i in range(20000):  # new keys, each full again 0.2 s (200 writes) later
        clock.t += 0.001
        store.acquire_now([f"other-{i}"], [rate], [1])
    assert len(store) <= 4096 + 200  # swept as it goes: memory does not grow with keys


def test_local_store_settle_deletes_a_key_refunded_to_full():
    clock = Clock()
    store = LocalStore(clock)
    rate = Rate(100, 60)
    assert store.acquire_now(["k"], [rate], [40]).admitted
    store.settle(["k"], [rate], [-40])
    assert len(store) == 0


# -- config -------------------------------------------------------------------------------

ROUTES = [
    {"name": "openai", "prefix": "/openai", "provider": "mock", "rewrite": "/v1/chat/completions"},
    {"name": "v1", "prefix": "/v1/", "provider": "mock"},
]


def document(section: dict, **extra) -> dict:
    return {
        "providers": {"mock": {"url": "http://127.0.0.1:1"}},
        "routes": ROUTES,
        "rate_limits": section,
        **extra,
    }


def problems(doc: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, "policy.yaml")
    return info.value.lines()


def one_limit(**limit) -> dict:
    return {"limits": [{"name": "l", "window": "1m", "requests": 5, **limit}]}


@pytest.mark.parametrize(
    "section,expected",
    [
        (one_limit(window="0s"), "rate_limits.limits[0].window: a zero window can never admit"),
        (one_limit(window="10x"), "unknown unit 'x' in '10x' (known: s, m, h, d)"),
        (one_limit(window="1.5m"), "expected a duration like '30s'"),
        (one_limit(window=60), "expected a duration like '30s', '1m', '1h30m' or '1d', got 60"),
        (one_limit(window="400d"), "at most 366d"),
        (one_limit(requests=0), "rate_limits.limits[0].requests: expected a positive integer"),
        (
            {"limits": [{"name": "l", "window": "1m"}]},
            "rate_limits.limits[0]: set requests, tokens or both",
        ),
        (one_limit(count="input"), "rate_limits.limits[0].count: only meaningful with tokens"),
        (one_limit(by=["consumer", "ip"]), "limits[0].by[1]: unknown key 'ip'"),
        (one_limit(by="user"), "limits[0].by: unknown key 'user'"),
        (
            one_limit(match={"consumers": ["ghost"]}),
            "limits[0].match.consumers[0]: unknown consumer 'ghost' (known: none: there is "
            "no consumers: section)",
        ),
        (
            one_limit(match={"routes": ["nope"]}),
            "limits[0].match.routes[0]: unknown route 'nope' (known: openai, v1)",
        ),
        (
            {"limits": [{"name": "a", "window": "1m", "requests": 1}] * 2},
            "rate_limits.limits[1].name: duplicate limit name 'a'",
        ),
        ({"limits": []}, "rate_limits.limits: expected a non-empty list of limits"),
        ({"store": "redis", **one_limit()}, "rate_limits.redis: store: redis needs a redis:"),
        (
            {"redis": {"url": "redis://127.0.0.1:6379"}, **one_limit()},
            "a redis: section is set but store is local",
        ),
        (
            {"store": "redis", "redis": {"url": "redis://:s3cret@h:6379"}, **one_limit()},
            "credentials do not belong in the URL",
        ),
        (
            {"store": "redis", "redis": {"url": "http://h:6379"}, **one_limit()},
            "rate_limits.redis.url: expected redis://",
        ),
        (
            {
                "store": "redis",
                "redis": {"url": "redis://h", "failure_mode": "maybe"},
                **one_limit(),
            },
            "unknown failure mode 'maybe' (known: open, closed)",
        ),
        (one_limit(tokns=5), "rate_limits.limits[0].tokns: unknown key 'tokns' (did you mean"),
    ],
)
def test_a_limit_that_cannot_work_is_refused_at_start(section, expected):
    lines = problems(document(section))
    assert any(expected in line for line in lines), lines
    assert all(line.startswith("policy.yaml: ") for line in lines)
    assert not any("s3cret" in line for line in lines)


def test_consumer_names_are_checked_against_the_consumers_section():
    doc = document(one_limit(match={"consumers": ["team-a", "team-z"]}))
    doc["consumers"] = {"team-a": {}, "team-b": {}}
    lines = [line for line in _lines(doc) if "rate_limits." in line]
    assert lines == [
        "policy.yaml: rate_limits.limits[0].match.consumers[1]: unknown consumer 'team-z' "
        "(known: team-a, team-b)"
    ]


def _lines(doc: dict) -> list[str]:
    try:
        parse_config(doc, "policy.yaml")
    except ConfigError as exc:
        return exc.lines()
    return []


def test_in_process_store_is_refused_with_several_workers():
    lines = problems(document(one_limit(), server={"workers": 2}))
    assert any(
        line.startswith("policy.yaml: rate_limits.store: the in-process store") and "redis" in line
        for line in lines
    ), lines
    redis = {"store": "redis", "redis": {"url": "redis://127.0.0.1:6379/0"}, **one_limit()}
    assert not [line for line in _lines(document(redis, server={"workers": 2})) if "rate_" in line]


def test_full_example_parses():
    config = parse_config(
        document(
            {
                "store": "redis",
                "redis": {
                    "url": "redis://127.0.0.1:6379/0",
                    "password_env": "REDIS_PASSWORD",
                    "failure_mode": "closed",
                    "timeout_ms": 100,
                },
                "default_max_output_tokens": 512,
                "limits": [
                    {"name": "per-ip", "requests": 60, "window": "1m", "by": "client_ip"},
                    {
                        "name": "gpt4-daily",
                        "tokens": 2_000_000,
                        "count": "output",
                        "window": "1d",
                        "by": ["consumer", "model"],
                        "match": {"models": ["gpt-4o*"], "routes": ["v1"]},
                    },
                ],
            }
        )
    )
    limits = config.rate_limits
    assert limits is not None and limits.redis is not None
    assert limits.redis.failure_mode == "closed" and limits.default_max_output_tokens == 512
    assert [lim.window_seconds for lim in limits.limits] == [60, 86400]
    assert limits.limits[1].by == ("consumer", "model")


# -- the stage through the exchange -------------------------------------------------------


class Auth(Stage):
    """Stands in for the auth stage: the consumer is the x-consumer header."""

    def on_request_headers(self, ctx: RequestContext) -> None:
        ctx.consumer = ctx.headers.get("x-consumer", "")


def make_stage(limits: list[dict], store=None, metrics: Metrics | None = None, **extra):
    config = parse_config(document({"limits": limits, **extra}))
    assert config.rate_limits is not None
    metrics = metrics or Metrics()
    return RateLimitStage(config.rate_limits, store or LocalStore(Clock()), metrics), config


class Gateway:
    """Exchanges that share one stage (and so one store), as in one sidecar."""

    def __init__(self, limits: list[dict], store=None, **extra) -> None:
        self.metrics = Metrics()
        self.stage, self.config = make_stage(limits, store, self.metrics, **extra)
        self.policy = Policy(self.config, stages=(Auth(), self.stage))

    def run(self) -> Run:
        run = Run(self.config)
        run.metrics = self.metrics
        run.ex.metrics = self.metrics
        run.ex.policy = self.policy
        self.metrics.active.inc()  # Exchange() counted on its own Metrics
        return run

    def call(self, body: dict, *, consumer: str = "", route: str = "v1", frames=None):
        """One streamed exchange to the end; returns (run, response headers dict)."""
        run = self.run()
        path = "/openai" if route == "openai" else "/v1/chat/completions"
        hdrs = {":method": "POST", ":path": path, "x-consumer": consumer}
        run.send(headers_msg(hdrs, route=route))
        r2 = run.send(body_msg(orjson.dumps(body)))
        if r2.WhichOneof("response") == "immediate_response":
            run.ex.close(run.t)
            return run, r2.immediate_response
        run.respond(frames if frames is not None else stream_frames(3, usage=True))
        for work in run.ex.after:
            asyncio.run(work)
        return run, response_headers(run)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def response_headers(run: Run) -> dict[str, str]:
    mutation = run.response_headers.response_headers.response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def refusal_headers(imm) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}


STREAM = {**CHAT, "stream": True}


def test_every_stream_carries_six_headers_that_go_down():
    gw = Gateway([{"name": "l", "requests": 5, "tokens": 10_000, "window": "1m"}])
    seen = []
    for _ in range(3):
        _, headers = gw.call({**STREAM, "max_tokens": 100})
        seen.append(headers)
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["4", "3", "2"]
    assert {h["x-ratelimit-limit-requests"] for h in seen} == {"5"}
    assert {h["x-ratelimit-limit-tokens"] for h in seen} == {"10000"}
    tokens = [int(h["x-ratelimit-remaining-tokens"]) for h in seen]
    assert tokens[0] > tokens[1] > tokens[2]
    # One request costs one request-slot of 12 s: 3 of them need 36 s to refill.
    assert seen[2]["x-ratelimit-reset-requests"] == "36s"
    assert all(h["x-ratelimit-reset-tokens"] for h in seen)


def test_429_names_the_limit_and_says_when_to_retry():
    gw = Gateway([{"name": "per-consumer", "requests": 2, "window": "1m", "by": "consumer"}])
    for _ in range(2):
        _, headers = gw.call(STREAM, consumer="team-a")
        assert "x-ratelimit-remaining-requests" in headers
    _, imm = gw.call(STREAM, consumer="team-a")
    assert imm.status.code == 429
    error = orjson.loads(imm.body)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_exceeded"
    assert "'per-consumer'" in error["message"] and "consumer team-a" in error["message"]
    assert "2 requests per 1m" in error["message"]
    headers = refusal_headers(imm)
    assert headers["retry-after"] == "30" and headers["retry-after-ms"] == "30000"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    # Another consumer has its own bucket.
    _, other = gw.call(STREAM, consumer="team-b")
    assert other["x-ratelimit-remaining-requests"] == "1"
    assert (
        gw.metric(
            "ai_gateway_ratelimit_decisions_total",
            limit="per-consumer",
            kind="requests",
            outcome="limited",
        )
        == 1
    )
    assert gw.metric("ai_gateway_errors_total", kind="rate_limited") == 1


def test_a_reservation_that_can_never_fit_gets_a_429_that_says_so():
    gw = Gateway([{"name": "small", "tokens": 100, "window": "1h"}])
    _, imm = gw.call({**STREAM, "max_tokens": 500})
    assert imm.status.code == 429
    error = orjson.loads(imm.body)["error"]
    assert "can never be admitted" in error["message"] and "Lower max_tokens" in error["message"]
    assert error["param"] == "max_tokens"
    headers = refusal_headers(imm)
    assert headers["x-should-retry"] == "false" and "retry-after" not in headers
    # The default reservation (no max_tokens) above the limit is refused the same way.
    _, imm = gw.call(STREAM)
    assert (
        imm.status.code == 429
        and "default max output" in orjson.loads(imm.body)["error"]["message"]
    )
    # A request that fits passes.
    _, headers = gw.call({**STREAM, "max_tokens": 20})
    assert "x-ratelimit-remaining-tokens" in headers


def test_settlement_refunds_what_was_reserved_but_not_used():
    gw = Gateway([{"name": "tpd", "tokens": 10_000, "window": "1d"}])
    _, first = gw.call({**STREAM, "max_tokens": 1000})
    reserved = 10_000 - int(first["x-ratelimit-remaining-tokens"])
    assert reserved > 1000  # prompt estimate + max_tokens
    # The provider reported 11 + 3 tokens: the rest came back.
    _, second = gw.call({**STREAM, "max_tokens": 1000})
    assert int(second["x-ratelimit-remaining-tokens"]) == 10_000 - 14 - reserved
    assert gw.metric("ai_gateway_ratelimit_tokens_total", limit="tpd", phase="settled") == 28
    assert gw.metric("ai_gateway_ratelimit_tokens_total", limit="tpd", phase="reserved") == (
        2 * reserved
    )


def test_usage_beyond_the_reservation_is_charged():
    gw = Gateway([{"name": "tpd", "tokens": 10_000, "window": "1d", "count": "output"}])
    _, _ = gw.call({**STREAM, "max_tokens": 2}, frames=stream_frames(40, usage=True))
    _, after = gw.call({**STREAM, "max_tokens": 2})
    # 40 output tokens charged although 2 were reserved; the second reserved 2 more.
    assert int(after["x-ratelimit-remaining-tokens"]) == 10_000 - 40 - 2


def test_a_stream_cut_short_is_charged_for_what_was_streamed():
    gw = Gateway([{"name": "tpd", "tokens": 10_000, "window": "1d", "count": "output"}])
    run = gw.run()
    run.send(headers_msg({":method": "POST", ":path": "/v1/chat/completions"}, route="v1"))
    run.send(body_msg(orjson.dumps({**STREAM, "max_tokens": 500})))
    frames = stream_frames(30, usage=True)
    run.send(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    for frame in frames[:11]:  # role chunk + 10 content chunks, then the client hangs up
        run.send(body_msg(frame, end=False, response=True))
    run.ex.close(run.t)
    for work in run.ex.after:  # none for the local store: it settles in place
        asyncio.run(work)
    assert gw.metric("ai_gateway_ratelimit_tokens_total", limit="tpd", phase="settled") == 10
    _, after = gw.call({**STREAM, "max_tokens": 1})
    assert int(after["x-ratelimit-remaining-tokens"]) == 10_000 - 10 - 1


def test_a_failed_upstream_call_refunds_its_tokens_but_counts_as_a_request():
    gw = Gateway([{"name": "l", "requests": 10, "tokens": 5000, "window": "1d"}])
    run = gw.run()
    run.request({**STREAM, "max_tokens": 1000})
    run.send(headers_msg({":status": "503", "content-type": "application/json"}, response=True))
    run.ex.close(run.t)
    for work in run.ex.after:
        asyncio.run(work)
    _, after = gw.call({**STREAM, "max_tokens": 1})
    assert after["x-ratelimit-remaining-requests"] == "8"
    reserved_now = 5000 - int(after["x-ratelimit-remaining-tokens"])
    assert reserved_now < 100  # only this request's small reservation is held


def test_limits_combine_and_filters_select():
    gw = Gateway(
        [
            {"name": "ip", "requests": 3, "window": "1h", "by": "client_ip"},
            {"name": "route", "requests": 100, "window": "1h", "by": "route"},
            {
                "name": "gpt4",
                "requests": 1,
                "window": "1h",
                "by": "model",
                "match": {"models": ["gpt-4*"], "routes": ["v1"]},
            },
        ]
    )
    # gpt-4o on v1 meets all three limits; the tightest (gpt4: 0 left) shows.
    _, h = gw.call({**STREAM, "model": "gpt-4o"})
    assert h["x-ratelimit-remaining-requests"] == "0"
    _, imm = gw.call({**STREAM, "model": "gpt-4o"})
    assert imm.status.code == 429 and "'gpt4'" in orjson.loads(imm.body)["error"]["message"]
    # Refused by gpt4, so the ip limit was not spent: 2 left of 3, then 1.
    _, h = gw.call({**STREAM, "model": "gpt-3.5-turbo"})
    assert h["x-ratelimit-remaining-requests"] == "1"
    # Another gpt-4 model is another bucket of the per-model limit.
    _, h = gw.call({**STREAM, "model": "gpt-4.1-mini"})
    assert h["x-ratelimit-remaining-requests"] == "0"
    # The openai route is not matched by gpt4; the ip limit (3) is now spent.
    _, imm = gw.call({**STREAM, "model": "gpt-4o"}, route="openai")
    assert "'ip'" in orjson.loads(imm.body)["error"]["message"]


async def test_concurrent_requests_never_overspend_a_local_limit():
    metrics = Metrics()
    stage, config = make_stage(
        [{"name": "t", "tokens": 1000, "requests": 1000, "window": "1d"}], metrics=metrics
    )

    async def one() -> bool:
        ctx = context(config, max_tokens=90)
        try:
            await stage.on_request(ctx)
        except Exception:
            return False
        await asyncio.sleep(0)
        return True

    results = await asyncio.gather(*(one() for _ in range(50)))
    each = estimate_prompt(context(config).info) + 90  # prompt estimate + max_tokens
    assert sum(results) == 1000 // each
    reserved = metrics.registry.get_sample_value(
        "ai_gateway_ratelimit_tokens_total", {"limit": "t", "phase": "reserved"}
    )
    assert reserved == sum(results) * each <= 1000


def context(config, *, max_tokens: int | None = None, consumer: str = "") -> RequestContext:
    route = config.routes[1]
    ctx = RequestContext(
        route=route,
        provider=config.providers["mock"],
        format=None,  # type: ignore[arg-type]
        method="POST",
        path="/v1/chat/completions",
        upstream_path="/v1/chat/completions",
        headers={},
        client_address="127.0.0.1",
        consumer=consumer,
    )
    ctx.info = RequestInfo(
        model="gpt-4o-mini",
        stream=True,
        body={},
        prompt_texts=["hello there"],
        max_output_tokens=max_tokens,
    )
    return ctx


def test_a_huge_prompt_is_estimated_by_sampling_within_a_few_percent():
    """A 1 MiB prompt must not hold the event loop for 100+ ms: sampled, yet close."""
    text = "The quick brown fox jumps over the lazy dog, 1234 times! " * 18_000
    info = RequestInfo(model="m", stream=True, body={}, prompt_texts=[text, "short"])
    exact = estimate_tokens(text) + estimate_tokens("short") + 3 * 2 + 3
    assert abs(estimate_prompt(info) - exact) <= exact * 0.02
    small = RequestInfo(model="m", stream=True, body={}, prompt_texts=["hello there", "hi"])
    assert estimate_prompt(small) == 2 + 1 + 3 * 2 + 3  # exact below the sample size


def test_build_keeps_the_store_across_reloads():
    shared = Shared()
    config = parse_config(document(one_limit()))
    first = build(config, shared, {})
    second = build(config, shared, {})
    assert first is not None and second is not None and first is not second
    assert first.store is second.store
    assert build(parse_config(document({"limits": one_limit()["limits"]})), shared, {}) is not None
    no_limits = parse_config({k: v for k, v in document({}).items() if k != "rate_limits"})
    assert build(no_limits, shared, {}) is None


# -- Redis: a real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


_prefix_counter = iter(range(10**9))


def fresh_prefix() -> str:
    return f"t{next(_prefix_counter)}:{random.getrandbits(32)}:"


async def test_redis_and_local_stores_decide_alike(redis_server):
    """Same operations, same clock: the Lua script and gcra.py agree on every answer."""
    clock = Clock(1_000_000.0)
    local = LocalStore(clock)
    remote = RedisStore(redis_server.url, key_prefix=fresh_prefix(), clock=clock, timeout=10.0)
    rng = random.Random(5)
    rates = [Rate(10, 60), Rate(1000, 3600), Rate(7, 86400)]
    keys = ["a", "b", "c"]
    try:
        for _ in range(300):
            clock.t += rng.choice([0.0, 0.0, 0.5, 3.0, 20.0])
            pick = rng.sample(range(3), rng.randint(1, 3))
            ks, rs = [keys[i] for i in pick], [rates[i] for i in pick]
            if rng.random() < 0.7:
                costs = [rng.randint(1, 4) if r.limit < 100 else rng.randint(1, 300) for r in rs]
                mine = local.acquire_now(ks, rs, costs)
                theirs = await remote.acquire(ks, rs, costs)
                assert (mine.admitted, mine.blocked) == (theirs.admitted, theirs.blocked)
                assert theirs.now == pytest.approx(mine.now, abs=1e-6)
                for a, b in zip(mine.tats, theirs.tats, strict=True):
                    assert max(a, mine.now) == pytest.approx(max(b, theirs.now), abs=1e-5)
            else:
                deltas = [rng.randint(-300, 100) for _ in rs]
                local.settle(ks, rs, deltas)
                await remote.settle(ks, rs, deltas)
    finally:
        await remote.close()


async def test_the_redis_script_keeps_the_slack_for_rounding_pairs(redis_server):
    """The Lua copy of the arithmetic must not lose the last unit either."""
    clock = Clock(1_000_000.0)
    store = RedisStore(redis_server.url, key_prefix=fresh_prefix(), clock=clock, timeout=10.0)
    try:
        for limit, window in ROUNDING_PAIRS:
            rate, key = Rate(limit, window), f"{limit}/{window}"
            outcomes = [await store.acquire([key], [rate], [1]) for _ in range(limit + 2)]
            assert sum(o.admitted for o in outcomes) == limit, (limit, window)
    finally:
        await store.close()


async def test_replicas_sharing_redis_admit_exactly_the_limit(redis_server):
    prefix = fresh_prefix()
    # A generous timeout: this checks atomicity, and on a loaded machine the 200 ms
    # default can expire and (correctly) mark Redis down, which is another test's case.
    replicas = [RedisStore(redis_server.url, key_prefix=prefix, timeout=10.0) for _ in range(3)]
    rate = Rate(100, 86400)
    try:
        outcomes = await asyncio.gather(
            *(replicas[i % 3].acquire(["shared"], [rate], [1]) for i in range(300))
        )
        assert sum(o.admitted for o in outcomes) == 100
    finally:
        for r in replicas:
            await r.close()


async def test_a_burst_beyond_the_connection_pool_queues_instead_of_failing(redis_server):
    store = RedisStore(redis_server.url, key_prefix=fresh_prefix(), max_connections=4, timeout=10.0)
    rate = Rate(150, 86400)
    try:
        outcomes = await asyncio.gather(*(store.acquire(["k"], [rate], [1]) for _ in range(300)))
        assert sum(o.admitted for o in outcomes) == 150  # none failed for want of a connection
        assert store.up
    finally:
        await store.close()


async def test_redis_keys_expire_when_their_bucket_is_full_again(redis_server):
    prefix = fresh_prefix()
    store = RedisStore(redis_server.url, key_prefix=prefix, timeout=10.0)
    rate = Rate(100, 3600)
    try:
        assert (await store.acquire(["k"], [rate], [50])).admitted
        ttl = await store.client.pttl(prefix + "k")
        # Half the window in use, plus a second of slack; a minute of margin for a
        # loaded machine between the write and the read, far from 1 h or 31 min.
        assert 1_741_000 < ttl <= 1_801_000
        await store.settle(["k"], [rate], [-50])
        assert await store.client.exists(prefix + "k") == 0
    finally:
        await store.close()


async def test_redis_outage_fails_then_recovers_without_restart(tmp_path):
    server = RedisServer(tmp_path / "redis", persist=False).start()
    metrics = Metrics()
    store = RedisStore(
        server.url, key_prefix=fresh_prefix(), retry_interval=0.2, metrics=metrics, timeout=10.0
    )
    rate = Rate(1000, 60)

    def sample(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    try:
        assert (await store.acquire(["k"], [rate], [1])).admitted
        server.kill()
        with pytest.raises(StoreUnavailable):
            await store.acquire(["k"], [rate], [1])
        assert sample("ai_gateway_ratelimit_store_up", store="redis") == 0
        assert sample("ai_gateway_ratelimit_store_errors_total", store="redis", op="acquire") == 1
        # Marked down: no connection attempt (and no latency) until the retry interval.
        with pytest.raises(StoreUnavailable):
            await store.acquire(["k"], [rate], [1])
        assert (
            sample("ai_gateway_ratelimit_store_errors_total", store="redis", op="acquire_skipped")
            == 1
        )
        assert await store.ping() is not None
        server.start()  # same port, empty: no keys, no cached scripts
        await asyncio.sleep(0.25)
        outcome = await store.acquire(["k"], [rate], [1])
        assert outcome.admitted
        assert sample("ai_gateway_ratelimit_store_up", store="redis") == 1
        assert await store.ping() is None
        # It came back empty: every limit started again from full, which is counted.
        assert sample("ai_gateway_ratelimit_store_restarts_total", store="redis") == 1
    finally:
        await store.close()
        server.stop()


def restarts(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "ai_gateway_ratelimit_store_restarts_total", {"store": "redis"}
    )
    return value or 0.0


async def test_a_redis_that_restarts_empty_is_counted_and_logged_once(tmp_path, caplog):
    """Without persistence a restart resets every limit (issue 17: a 30/h limit let
    40-50 through): the generation key's change says so, once per loss."""
    server = RedisServer(tmp_path / "redis", persist=False).start()
    metrics = Metrics()
    store = RedisStore(server.url, key_prefix=fresh_prefix(), metrics=metrics, timeout=10.0)
    rate = Rate(3, 3600)
    try:
        assert [(await store.acquire(["k"], [rate], [1])).admitted for _ in range(4)] == [
            True, True, True, False
        ]  # fmt: skip
        assert restarts(metrics) == 0  # the first generation seen is no loss
        server.stop()
        server.start()
        await store.ping()  # reconnect (the pooled connection died with the server)
        caplog.clear()
        assert (await store.acquire(["k"], [rate], [1])).admitted  # the limit was reset
        assert restarts(metrics) == 1
        lost = [r for r in caplog.records if "lost its state" in r.getMessage()]
        assert len(lost) == 1 and lost[0].levelname == "ERROR"
        assert (await store.acquire(["k"], [rate], [1])).admitted
        assert restarts(metrics) == 1 and len(caplog.records) == len(lost)
        await store.client.flushdb()  # a flush loses the state just the same
        await store.acquire(["k"], [rate], [1])
        assert restarts(metrics) == 2
    finally:
        await store.close()
        server.stop()


async def test_a_persistent_redis_keeps_every_limit_over_a_restart(tmp_path):
    """The append-only file (as the k8s manifest runs it): a clean restart keeps the
    buckets and the generation, so nothing is counted and the limit still holds."""
    server = RedisServer(tmp_path / "redis").start()
    metrics = Metrics()
    store = RedisStore(server.url, key_prefix=fresh_prefix(), metrics=metrics, timeout=10.0)
    rate = Rate(3, 3600)
    try:
        for _ in range(3):
            assert (await store.acquire(["k"], [rate], [1])).admitted
        server.stop()  # SIGTERM: the file is synced before exit
        server.start()
        await store.ping()
        assert not (await store.acquire(["k"], [rate], [1])).admitted
        assert restarts(metrics) == 0
    finally:
        await store.close()
        server.stop()


def redis_limits(url: str, mode: str, limits: list[dict]) -> dict:
    return {
        "store": "redis",
        "redis": {"url": url, "failure_mode": mode, "timeout_ms": 10_000, "key_prefix": "x:"},
        "limits": limits,
    }


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_unreachable_redis_fails_open_or_closed_as_configured(mode):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    config = parse_config(
        document(redis_limits(url, mode, [{"name": "l", "requests": 5, "window": "1m"}]))
    )
    shared = Shared()
    metrics = shared.metrics
    stage = build(config, shared, {})
    assert stage is not None
    ctx = context(config)
    try:
        if mode == "closed":
            with pytest.raises(Exception) as info:
                await stage.on_request(ctx)
            refusal = info.value
            assert refusal.status == 503 and refusal.code == "rate_limit_unavailable"
            assert refusal.headers["retry-after"] == "1"
        else:
            await stage.on_request(ctx)  # admitted unchecked
            assert "x-ratelimit-remaining-requests" not in ctx.response_headers
            assert stage.on_complete(ctx, ctx_usage(), True) is None
        assert (
            metrics.registry.get_sample_value(
                "ai_gateway_ratelimit_decisions_total",
                {"limit": "l", "kind": "requests", "outcome": f"fail_{mode}"},
            )
            == 1
        )
    finally:
        await stage.store.close()


async def test_redis_store_survives_reloads_and_reports_readiness_when_failing_closed():
    """The worker's readiness probe finds `readiness_check` on objects in Shared."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    limits = [{"name": "l", "requests": 5, "window": "1m"}]
    shared = Shared()
    first = build(parse_config(document(redis_limits(dead, "open", limits))), shared, {})
    again = build(parse_config(document(redis_limits(dead, "closed", limits))), shared, {})
    assert first is not None and again is not None and first.store is again.store
    slots = [v for v in shared.values() if hasattr(v, "readiness_check")]
    assert len(slots) == 1
    assert "unreachable" in (await slots[0].readiness_check() or "")  # closed: not ready
    build(parse_config(document(redis_limits(dead, "open", limits))), shared, {})
    assert await slots[0].readiness_check() is None  # open: stays ready
    other = f"redis://127.0.0.1:{free_port()}/1"
    moved = build(parse_config(document(redis_limits(other, "open", limits))), shared, {})
    assert moved is not None and moved.store is not first.store
    assert [v for v in shared.values() if hasattr(v, "readiness_check")] == slots  # one slot
    for store in (first.store, moved.store):
        await store.close()


def ctx_usage():
    from extproc.usage import Usage

    usage = Usage()
    usage.set_reported(10, 10)
    return usage


async def test_stage_on_redis_reserves_and_settles(redis_server):
    config = parse_config(
        document(
            redis_limits(
                redis_server.url,
                "closed",
                [{"name": "t", "tokens": 1000, "window": "1d", "by": "consumer"}],
            )
        )
    )
    shared = Shared()
    stage = build(config, shared, {})
    assert stage is not None
    await stage.store.client.flushdb()
    try:
        ctx = context(config, max_tokens=100, consumer="c1")
        await stage.on_request(ctx)
        first = int(ctx.response_headers["x-ratelimit-remaining-tokens"])
        assert 880 <= first < 900
        await stage.on_complete(ctx, ctx_usage(), True)  # 20 used: the rest comes back
        ctx = context(config, max_tokens=1, consumer="c1")
        await stage.on_request(ctx)
        assert int(ctx.response_headers["x-ratelimit-remaining-tokens"]) >= 1000 - 20 - 15
    finally:
        await stage.store.close()
