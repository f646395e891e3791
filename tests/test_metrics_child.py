"""`Metrics.child`: settlement's label children, remembered, are the children
`labels()` gives (the samples land in the same series), and the cache is bounded."""

from __future__ import annotations

from extproc import metrics as metrics_module
from extproc.metrics import Metrics


def test_a_remembered_child_is_the_labels_child_and_counts_there() -> None:
    m = Metrics()
    child = m.child(m.requests, "r", "gpt-4o", "200")
    assert child is m.requests.labels("r", "gpt-4o", "200")
    assert m.child(m.requests, "r", "gpt-4o", "200") is child
    child.inc()
    m.child(m.requests, "r", "gpt-4o", "200").inc(2)
    m.child(m.requests, "r", "other", "200").inc()
    sample = m.registry.get_sample_value
    labels = {"route": "r", "model": "gpt-4o", "status": "200"}
    assert sample("ai_gateway_requests_total", labels) == 3
    assert sample("ai_gateway_requests_total", {**labels, "model": "other"}) == 1
    # Another metric with the same label values is another child.
    assert m.child(m.stream_duration, "r", "gpt-4o") is not child


def test_the_cache_starts_over_past_its_bound(monkeypatch) -> None:
    monkeypatch.setattr(metrics_module, "CHILDREN", 4)
    m = Metrics()
    for i in range(10):
        m.child(m.requests, "r", f"model-{i}", "200").inc()
        assert len(m._children) <= 4
    labels = {"route": "r", "model": "model-0", "status": "200"}
    m.child(m.requests, "r", "model-0", "200").inc()  # dropped from the cache: same series
    assert m.registry.get_sample_value("ai_gateway_requests_total", labels) == 2


def _samples(m: Metrics, name: str) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in m.registry.collect()
        if family.name == name
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_the_observer_lands_where_observe_does() -> None:
    import math
    import random

    from extproc.metrics import observer

    rng = random.Random(7)
    bounds = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300]
    amounts = [*bounds, -1.0, 0.0, math.inf, math.nan, 1e9, *(b + 1e-12 for b in bounds)]
    amounts += [rng.uniform(-1, 400) for _ in range(500)]
    slow, fast = Metrics(), Metrics()
    add = observer(fast.child(fast.stream_duration, "r", "m"))
    for amount in amounts:
        slow.child(slow.stream_duration, "r", "m").observe(amount)
        add(amount)
    expected = _samples(slow, "ai_gateway_stream_duration_seconds")
    got = _samples(fast, "ai_gateway_stream_duration_seconds")
    assert len(expected) == len(bounds) + 3  # every bucket, +Inf, count, sum
    nan_free = {k: v for k, v in expected.items() if not k[0].endswith("_sum")}
    assert {k: v for k, v in got.items() if not k[0].endswith("_sum")} == nan_free
    [sum_key] = [k for k in expected if k[0].endswith("_sum")]
    assert math.isnan(expected[sum_key]) and math.isnan(got[sum_key])  # the NaN counted


def test_settled_series_are_the_children_and_made_only_when_used() -> None:
    m = Metrics()
    series = m.settled("r", "gpt-4o", "alice")
    assert m.settled("r", "gpt-4o", "alice") is series
    series.prompt(7)
    series.completion(3)
    series.prompt(1)
    series.duration(0.2)
    sample = m.registry.get_sample_value
    tokens = {"model": "gpt-4o", "consumer": "alice"}
    assert sample("ai_gateway_tokens_total", {**tokens, "kind": "prompt"}) == 8
    assert sample("ai_gateway_tokens_total", {**tokens, "kind": "completion"}) == 3
    assert m.child(m.tokens, "gpt-4o", "alice", "prompt")._value.get() == 8
    assert sample("ai_gateway_stream_duration_seconds_bucket",
                  {"route": "r", "model": "gpt-4o", "le": "0.25"}) == 1  # fmt: skip
    # Never added to: no series in /metrics (as before, where labels() ran on use only).
    assert sample("ai_gateway_tokens_total", {**tokens, "kind": "cached"}) is None
    ttft = {"route": "r", "model": "gpt-4o"}
    assert sample("ai_gateway_time_to_first_token_seconds_count", ttft) is None
    series.ttft(0.01)
    assert sample("ai_gateway_time_to_first_token_seconds_count", ttft) == 1
