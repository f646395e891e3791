"""Admission control, sans-I/O: which new stream is shed and why, the hysteresis of
saturation (what readiness reports), and the shed answer Envoy gets."""

from __future__ import annotations

import asyncio
import time

import orjson

from extproc.admission import Admission, Limits, shed_response
from extproc.errors import SIDECAR_DETAILS_PREFIX
from extproc.metrics import Metrics
from extproc.server import probe_lag

LIMITS = Limits(max_open_streams=10, max_queued_requests=5, max_queue_delay=0.5)


def test_admits_up_to_the_open_limit_then_sheds():
    a = Admission(LIMITS)
    assert [a.admit() for _ in range(9)] == [None] * 9
    assert not a.saturated
    assert a.admit() is None
    assert a.open == 10
    assert a.saturated  # at the limit: readiness says so before anything is shed
    assert a.admit() == "open_streams"
    assert a.open == 10  # a shed stream is not counted open
    assert a.saturated


def test_admitted_streams_are_never_cut_by_a_lower_limit():
    """A reload that lowers the limit only refuses new streams: the open count stays."""
    a = Admission(LIMITS)
    for _ in range(8):
        a.admit()
    a.limits = Limits(4, 5, 0.5)
    assert a.admit() == "open_streams"
    assert a.open == 8
    for _ in range(8):
        a.release()
    assert a.open == 0
    assert a.admit() is None


def test_hysteresis_saturation_ends_only_below_the_low_water_mark():
    a = Admission(LIMITS)
    for _ in range(10):
        a.admit()
    assert a.admit() == "open_streams"
    assert a.readiness() is not None
    a.release()  # 9 open: below the limit, above 80 %
    assert a.saturated
    assert "9/10 open streams" in (a.readiness() or "")
    assert a.admit() is None  # admission itself follows the limit, not the hysteresis
    a.release()
    a.release()  # 8 open: not below 8
    assert a.saturated
    a.release()  # 7 open
    assert not a.saturated
    assert a.readiness() is None


def test_queued_request_phases_shed_new_streams():
    a = Admission(LIMITS)
    a.admit()
    for _ in range(5):
        a.wait_started()
    assert a.admit() == "queued_requests"
    for _ in range(2):
        a.wait_ended()  # 3 queued: below 80 % of 5
    assert not a.saturated
    assert a.admit() is None


def test_loop_lag_sheds_and_recovers():
    a = Admission(LIMITS)
    a.observe_lag(0.6)
    assert a.saturated
    assert a.admit() == "queue_delay"
    a.observe_lag(0.45)  # under the limit, over the low-water mark (0.4)
    assert a.saturated
    assert a.admit() is None
    a.observe_lag(0.01)
    assert not a.saturated


def test_a_zero_delay_limit_turns_the_lag_check_off():
    a = Admission(Limits(10, 5, 0.0))
    a.observe_lag(30.0)
    assert a.admit() is None
    assert not a.saturated


def test_shed_answer_is_an_openai_style_503_with_retry_after():
    immediate = shed_response().immediate_response
    assert immediate.status.code == 503
    headers = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
    assert headers["retry-after"] == "1"
    assert headers["content-type"] == "application/json"
    error = orjson.loads(immediate.body)["error"]
    assert error["code"] == "overloaded"
    assert error["type"] == "server_error"
    assert immediate.details == f"{SIDECAR_DETAILS_PREFIX}overloaded"


async def test_the_lag_probe_sees_a_blocked_loop_and_saturates():
    """A handler that holds the loop (here 300 ms of blocking) delays every ready message
    by as much: the probe reports at least the block minus one probe interval."""
    metrics = Metrics()
    admission = Admission(Limits(10, 5, 0.2))
    probe = asyncio.create_task(probe_lag(admission, metrics, interval=0.05))
    await asyncio.sleep(0.06)  # the probe is asleep, due within 50 ms
    time.sleep(0.3)
    for _ in range(1000):  # let the probe wake (late); nothing awaits after it did
        await asyncio.sleep(0)
        if admission.lag >= 0.1:
            break
    probe.cancel()
    assert admission.lag >= 0.3 - 0.05
    assert admission.saturated
    assert admission.admit() == "queue_delay"
    assert metrics.queue_time.collect()[0].samples  # observed into the histogram
