"""The rolling load window: percentiles, rates, expiry, held and in-flight counts."""

from __future__ import annotations

import pytest

from fleetserve.telemetry.window import (
    DEFAULT_COMPLETION_TOKENS,
    TTFT_BIN_RATIO,
    LoadWindow,
    estimate_demand_tokens,
)

M = "m"


@pytest.mark.parametrize(
    ("samples", "true_p95"),
    [
        pytest.param([0.5], 0.5, id="one-sample"),
        pytest.param([0.1] * 95 + [2.0] * 5, 0.1, id="95-fast-5-slow"),
        pytest.param([0.1] * 94 + [2.0] * 6, 2.0, id="94-fast-6-slow"),
        pytest.param([i / 100 for i in range(1, 101)], 0.95, id="uniform-10ms-to-1s"),
        pytest.param([0.00001, 0.00002], 0.0001, id="below-the-lowest-bin"),
        pytest.param([30.0, 60.0, 90.0], 90.0, id="cold-start-scale"),
    ],
)
def test_ttft_p95_is_the_nearest_rank_within_two_percent_above(
    samples: list[float], true_p95: float
) -> None:
    window = LoadWindow()
    for i, s in enumerate(samples):
        window.observe_ttft(M, 100.0 + i * 0.001, s)
    snap = window.snapshot(M, 100.5)
    assert snap.ttft_samples == len(samples)
    assert snap.ttft_p95_s is not None
    assert true_p95 <= snap.ttft_p95_s <= true_p95 * TTFT_BIN_RATIO


def test_no_stream_means_no_ttft_and_unknown_model_is_empty() -> None:
    window = LoadWindow()
    window.arrived(M, 10.0, 100)
    assert window.snapshot(M, 10.5).ttft_p95_s is None
    empty = window.snapshot("other", 10.5)
    assert (empty.ttft_p95_s, empty.arrival_rps, empty.held, empty.in_flight) == (None, 0.0, 0, 0)


def test_rates_over_a_full_window() -> None:
    window = LoadWindow(window_s=30.0)
    window.arrived(M, 0.0, 0)  # the model is known long before: the span is the whole window
    t = 100.0
    while t < 160.0:  # 10 requests/s for 60 s, each 50 tokens, each answered at once
        window.arrived(M, t, 50)
        window.finished(M, t)
        t += 0.1
    snap = window.snapshot(M, 160.0)
    assert snap.window_s == pytest.approx(29.0)  # 29 whole buckets + 0 s of the 30th
    assert snap.arrival_rps == pytest.approx(10.0, rel=0.05)
    assert snap.demand_tps == pytest.approx(500.0, rel=0.05)
    assert snap.completed_rps == pytest.approx(10.0, rel=0.05)


def test_young_model_divides_by_its_age_not_the_window() -> None:
    window = LoadWindow(window_s=30.0)
    for i in range(20):  # 20 requests over the first 4 s of the model's life
        window.arrived(M, 1000.0 + i * 0.2, 10)
    snap = window.snapshot(M, 1004.0)
    assert snap.window_s == pytest.approx(4.0)
    assert snap.arrival_rps == pytest.approx(5.0)


def test_old_buckets_expire_and_slots_are_reused() -> None:
    window = LoadWindow(window_s=10.0)
    window.arrived(M, 0.0, 0)
    for i in range(50):
        window.arrived(M, 100.0 + i * 0.1, 1)  # 5 s of 10 rps
        window.observe_ttft(M, 100.0 + i * 0.1, 0.2)
    assert window.snapshot(M, 105.0).arrival_rps == pytest.approx(50 / 9.0)
    later = window.snapshot(M, 120.0)
    assert (later.arrival_rps, later.ttft_p95_s, later.ttft_samples) == (0.0, None, 0)
    window.arrived(M, 131.0, 1)  # lands in a slot bucket 101 used: old counts must be gone
    assert window.snapshot(M, 131.5).arrival_rps == pytest.approx(1 / 9.5)


def test_held_and_in_flight() -> None:
    window = LoadWindow()
    for i in range(3):
        window.arrived(M, float(i), 10)
    window.hold_started(M, 3.0)
    window.hold_started(M, 3.0)
    snap = window.snapshot(M, 3.0)
    assert (snap.held, snap.in_flight) == (2, 1)
    window.hold_ended(M, 4.0)
    window.finished(M, 4.0)
    window.finished(M, 4.0)
    snap = window.snapshot(M, 4.0)
    assert (snap.held, snap.in_flight) == (1, 0)
    window.hold_ended(M, 5.0)
    window.hold_ended(M, 5.0)  # never below zero
    window.finished(M, 5.0)
    window.finished(M, 5.0)
    snap = window.snapshot(M, 5.0)
    assert (snap.held, snap.in_flight) == (0, 0)


@pytest.mark.parametrize(
    ("body_bytes", "max_tokens", "tokens"),
    [
        pytest.param(400, 50, 150, id="prompt-plus-max-tokens"),
        pytest.param(400, None, 100 + DEFAULT_COMPLETION_TOKENS, id="no-max-tokens"),
        pytest.param(3, 1, 1, id="tiny"),
    ],
)
def test_demand_estimate(body_bytes: int, max_tokens: int | None, tokens: int) -> None:
    assert estimate_demand_tokens(body_bytes, max_tokens) == tokens


@pytest.mark.parametrize(("window_s", "bucket_s"), [(1.0, 0.0), (0.5, 1.0), (10.0, -1.0)])
def test_bad_shapes_are_refused(window_s: float, bucket_s: float) -> None:
    with pytest.raises(ValueError, match="bucket_s"):
        LoadWindow(window_s, bucket_s)
