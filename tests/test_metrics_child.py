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
