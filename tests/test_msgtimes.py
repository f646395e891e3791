"""Message times counted per stream and added in bulk give the histogram exactly what
one `observe` per message gives it."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from extproc import msgtimes
from extproc.metrics import _MESSAGE, PHASES, Metrics
from extproc.msgtimes import MessageTimes


def samples(metrics: Metrics) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metrics.registry.collect()
        if family.name == "ai_gateway_extproc_message_seconds"
        for s in family.samples
        if not s.name.endswith("_created")
    }


def times_of(seed: int, n: int) -> list[tuple[str, float]]:
    rng = random.Random(seed)
    edges = [*_MESSAGE, 0.0, 1.0]  # on a bound is in its bucket (le), past the last in +Inf
    out = []
    for _ in range(n):
        phase = rng.choice(PHASES)
        value = rng.choice(edges) if rng.random() < 0.3 else rng.uniform(0, 0.02)
        out.append((phase, value))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_bulk_counts_equal_one_observe_per_message(seed):
    direct, bulk = Metrics(), Metrics()
    times = MessageTimes(bulk.phase_time)
    for phase, value in times_of(seed, 3 * msgtimes.FLUSH_EVERY + 7):
        direct.phase_time[phase].observe(value)
        times.observe(phase, value)
    times.flush()
    want, got = samples(direct), samples(bulk)
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_a_long_stream_shows_its_messages_before_it_ends():
    metrics = Metrics()
    times = MessageTimes(metrics.phase_time)
    count = ("ai_gateway_extproc_message_seconds_count", (("phase", "response_body"),))
    for _ in range(msgtimes.FLUSH_EVERY - 1):
        times.observe("response_body", 0.0001)
    assert samples(metrics)[count] == 0  # counted here, not yet added
    times.observe("response_body", 0.0001)
    assert samples(metrics)[count] == msgtimes.FLUSH_EVERY
    times.observe("response_body", 0.0001)
    times.flush()
    assert samples(metrics)[count] == msgtimes.FLUSH_EVERY + 1


def test_children_without_the_bulk_attributes_get_one_observe_each():
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, value: float) -> None:
            self.seen.append(value)

    child = Plain()
    times = MessageTimes({"response_body": child})
    times.observe("response_body", 0.5)
    assert child.seen == [0.5]
    times.flush()
    assert child.seen == [0.5]


@pytest.mark.parametrize(("how", "at"), [("none", 0), ("hangup", 5)])
def test_the_servicer_adds_every_answered_message_by_the_end_of_its_stream(how, at):
    """A whole stream, and one the client leaves mid-way: each message the servicer
    answered is in the histogram once the stream is over."""
    from extproc.policy import Policy
    from extproc.server import ExternalProcessor
    from tests.test_cancellation import MESSAGES, FakeEnvoy
    from tests.test_exchange import CONFIG

    metrics = Metrics()
    processor = ExternalProcessor(Policy(CONFIG), metrics)
    envoy = FakeEnvoy(how, at)

    async def run() -> None:
        task = asyncio.ensure_future(processor.Process(envoy))
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    answered: dict[str, int] = {}
    for message in MESSAGES[: len(envoy.written)]:
        kind = message.WhichOneof("request")
        answered[kind] = answered.get(kind, 0) + 1
    assert len(envoy.written) == (len(MESSAGES) if how == "none" else at)
    sample = metrics.registry.get_sample_value
    for phase in PHASES:
        count = sample("ai_gateway_extproc_message_seconds_count", {"phase": phase})
        assert count == answered.get(phase, 0), phase
