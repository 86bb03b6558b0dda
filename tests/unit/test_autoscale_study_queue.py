"""The autoscale study's model of the gateway's capacity queue, on tiny runs in virtual time."""

from __future__ import annotations

import asyncio

import pytest
from benchmarks._autoscale_scalers import FixedScaler
from benchmarks._autoscale_study import (
    MODEL,
    NO_QUEUE,
    Arrival,
    GatewayQueue,
    Request,
    RunResult,
    Simulation,
)

from fleetserve.engines.sim.profiles import get_profile

CAP = 2


def burst(n: int, at_s: float = 1.0, output_tokens: int = 40) -> list[Arrival]:
    """`n` requests 1 ms apart: more than one replica's cap at once."""
    return [Arrival(at_s + i * 0.001, 100, output_tokens) for i in range(n)]


def run(
    arrivals: list[Arrival], gateway: GatewayQueue, *, replicas: int = 1, duration_s: float = 60.0
) -> tuple[Simulation, RunResult]:
    sim = Simulation(get_profile("a10g"), cold_start_s=5.0, drain_grace_s=5.0, gateway=gateway)
    result = asyncio.run(sim.run(arrivals, FixedScaler(replicas, gateway=gateway), duration_s))
    return sim, result


def most_at_once(requests: list[Request], replica: str) -> int:
    """Requests on `replica` between dispatch (arrival + held) and their last token."""
    edges: list[tuple[float, int]] = []
    for r in requests:
        if r.replica == replica and r.finished_s is not None:
            edges += [(r.arrival.at_s + r.held_s, 1), (r.finished_s, -1)]
    peak = now = 0
    for _, step in sorted(edges):
        now += step
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize(
    ("gateway", "peak"),
    [
        pytest.param(GatewayQueue(CAP), CAP, id="capped-two-at-a-time"),
        pytest.param(NO_QUEUE, 6, id="no-queue-all-in-the-engine"),
    ],
)
def test_a_capped_replica_never_runs_more_than_its_cap(gateway: GatewayQueue, peak: int) -> None:
    _, result = run(burst(6), gateway)
    requests = list(result.requests)
    assert all(r.failed is None and r.finished_s is not None for r in requests)
    (replica,) = {r.replica for r in requests}
    assert replica is not None
    assert most_at_once(requests, replica) == peak
    assert sum(1 for r in requests if r.held_s > 0) == (6 - CAP if gateway.max_concurrency else 0)


class HeldRecorder(FixedScaler):
    """A fixed fleet that reads the window's `held` (what the autoscaler sees) every 0.5 s."""

    seen: list[int]

    @property
    def period_s(self) -> float | None:
        return 0.5

    async def tick(self, sim: Simulation) -> None:
        self.seen.append(sim.window.snapshot(MODEL, sim.clock.now()).held)


def test_held_requests_count_in_the_window_and_go_in_arrival_order() -> None:
    sim = Simulation(
        get_profile("a10g"), cold_start_s=5.0, drain_grace_s=5.0, gateway=GatewayQueue(CAP)
    )
    scaler = HeldRecorder(1, gateway=GatewayQueue(CAP))
    scaler.seen = []
    result = asyncio.run(sim.run(burst(5), scaler, 3.0))
    assert scaler.seen[:4] == [0, 0, 0, 3]  # ticks at 0, 0.5, 1 (before the burst) and 1.5 s
    requests = list(result.requests)
    started = sorted(requests, key=lambda r: r.arrival.at_s + r.held_s)
    assert started == requests  # FIFO: dispatched in the order they arrived


def test_newest_first_serves_the_last_arrival_before_the_older_waiters() -> None:
    _, result = run(burst(5), GatewayQueue(CAP, newest_first=True))
    third, _, fifth = result.requests[2:]
    assert fifth.held_s < third.held_s


def test_a_replica_that_turns_ready_takes_the_backlog_at_once() -> None:
    sim = Simulation(
        get_profile("a10g"), cold_start_s=5.0, drain_grace_s=5.0, gateway=GatewayQueue(CAP)
    )

    class AddOneAt2s(FixedScaler):
        @property
        def period_s(self) -> float | None:
            return 2.0

        async def tick(self, sim: Simulation) -> None:
            if sim.clock.now() == 2.0:
                sim.scale_to(2)

    scaler = AddOneAt2s(1, gateway=GatewayQueue(CAP))
    # 300 tokens at ~36 ms a step: the first replica's two hold their slots for ~11 s.
    result = asyncio.run(sim.run(burst(6, output_tokens=300), scaler, 60.0))
    ready_at = next(t for t, _, ready in result.timeline if ready == 2)
    assert ready_at == pytest.approx(7.0)  # asked at 2 s, cold start 5 s
    late = [r for r in result.requests if r.replica != result.requests[0].replica]
    assert len(late) == CAP
    assert all(r.arrival.at_s + r.held_s == pytest.approx(ready_at) for r in late)


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        GatewayQueue(0)
