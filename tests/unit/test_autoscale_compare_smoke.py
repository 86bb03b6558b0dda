"""The autoscaler comparison's core on tiny scenarios, so the benchmark cannot rot unnoticed."""

from __future__ import annotations

import asyncio

import pytest
from benchmarks._autoscale_hpa import HpaSettings, VllmPodModel, metric_replicas
from benchmarks._autoscale_scalers import FixedScaler, FleetserveScaler, HpaScaler
from benchmarks._autoscale_study import Arrival, RunResult, Scaler, Simulation, make_workload

from fleetserve.bench.patterns import spike
from fleetserve.config import AutoscaleSettings
from fleetserve.engines.sim.profiles import get_profile

DURATION_S = 40.0
WARMUP_S = 10.0
COLD_START_S = 5.0


def workload(seed: int = 3) -> list[Arrival]:
    # 1 req/s, then 6 req/s from 15 s: enough to make an autoscaler move within 40 s.
    return make_workload(
        spike(base_rps=1.0, peak_rps=6.0, at_s=15.0, for_s=20.0),
        duration_s=DURATION_S,
        seed=seed,
        prompt_tokens=(64, 128),
        output_tokens=(8, 16),
    )


def run(scaler: Scaler, arrivals: list[Arrival]) -> RunResult:
    sim = Simulation(get_profile("a10g"), cold_start_s=COLD_START_S, drain_grace_s=5.0)
    return asyncio.run(sim.run(arrivals, scaler, DURATION_S, warmup_s=WARMUP_S))


def fleetserve() -> Scaler:
    return FleetserveScaler(
        AutoscaleSettings(
            min_replicas=1,
            max_replicas=4,
            ttft_slo_s=2.0,
            target_concurrency=2.0,
            scale_down={"stabilization_window_s": 5.0},
        )
    )


def hpa(cpu_request_cores: float) -> Scaler:
    return HpaScaler(HpaSettings(max_replicas=4), VllmPodModel(cpu_request_cores=cpu_request_cores))


@pytest.mark.parametrize(
    ("make_scaler", "min_peak", "max_peak"),
    [
        pytest.param(fleetserve, 2, 4, id="fleetserve-grows-under-the-spike"),
        pytest.param(lambda: hpa(1.0), 2, 4, id="hpa-1cpu-grows"),
        pytest.param(lambda: hpa(2.0), 1, 1, id="hpa-2cpu-never-reaches-70pct"),
        pytest.param(lambda: FixedScaler(3), 3, 3, id="fixed-3"),
    ],
)
def test_every_request_is_accounted_and_replica_seconds_counted(
    make_scaler: object, min_peak: int, max_peak: int
) -> None:
    assert callable(make_scaler)
    scaler = make_scaler()
    arrivals = workload()
    result = run(scaler, arrivals)

    measured = [a for a in arrivals if a.at_s >= WARMUP_S]
    assert len(result.requests) == len(measured) > 0
    for request in result.requests:
        if request.failed is None:
            assert request.first_token_s is not None
            assert request.finished_s is not None
            assert request.arrival.at_s <= request.first_token_s <= request.finished_s
        else:
            assert request.failed  # a reason, never an empty string
    assert result.replica_seconds > 0
    assert min_peak <= result.peak_replicas <= max_peak
    assert result.duration_s == DURATION_S - WARMUP_S


def test_fixed_fleet_keeps_its_count_and_charges_count_times_duration() -> None:
    result = run(FixedScaler(3), workload())
    # Launched a cold start before the run, ready at its start, then no change at all.
    after_launch = [active for at, active, _ in result.timeline if at >= -WARMUP_S]
    assert after_launch == [3, 3, 3]
    assert result.peak_replicas == 3
    assert result.replica_seconds == pytest.approx(3 * (DURATION_S - WARMUP_S))
    assert all(r.failed is None for r in result.requests)


def test_same_seed_same_arrivals() -> None:
    assert workload(7) == workload(7)
    assert workload(7) != workload(8)


@pytest.mark.parametrize(
    ("current", "ready", "unready", "expected"),
    [
        pytest.param(2, [1.0, 1.0], 0, 3, id="busy-pods-at-100pct-ask-for-43pct-more"),
        pytest.param(2, [0.72, 0.70], 0, 2, id="within-tolerance-holds"),
        pytest.param(4, [0.2, 0.2, 0.2, 0.2], 0, 2, id="idle-pods-scale-down"),
        pytest.param(2, [1.0], 1, 2, id="a-starting-pod-counts-at-0pct-and-absorbs-it"),
        pytest.param(4, [1.2, 1.2, 1.2], 1, 6, id="starting-pod-at-0pct-still-over"),
        pytest.param(2, [], 2, 2, id="no-sample-holds"),
    ],
)
def test_hpa_metric_replicas(current: int, ready: list[float], unready: int, expected: int) -> None:
    assert metric_replicas(current, ready, unready, target=0.7, tolerance=0.1) == expected
