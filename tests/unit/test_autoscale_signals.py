"""Observations built from replica snapshots and the gateway's figures."""

from __future__ import annotations

import pytest

from fleetserve.autoscale.observation import Observation, ReplicaLoad
from fleetserve.autoscale.policy import AutoscaleSettings, AutoscaleState, decide
from fleetserve.autoscale.signals import observe
from fleetserve.routing.snapshot import (
    NO_SIGNALS,
    EngineSignals,
    ReplicaSnapshot,
    ReplicaState,
)


def snap(
    rid: str,
    state: ReplicaState = ReplicaState.READY,
    in_flight: int = 0,
    signals: EngineSignals = NO_SIGNALS,
) -> ReplicaSnapshot:
    return ReplicaSnapshot(
        id=rid,
        url=f"http://127.0.0.1:{8000 + len(rid)}",
        model="m",
        state=state,
        in_flight=in_flight,
        signals=signals,
        last_seen=None,
    )


FLEET = [
    snap("a", in_flight=3, signals=EngineSignals(running=3, waiting=1, kv_usage_frac=0.4)),
    snap("b", in_flight=2),
    snap("c", ReplicaState.STARTING),
    snap("d", ReplicaState.DRAINING, in_flight=4),
    snap("e", ReplicaState.UNHEALTHY, in_flight=1),
]


def test_counts_replicas_by_state_and_keeps_ready_loads() -> None:
    observation = observe(FLEET, now=12.5)
    assert observation.now == 12.5
    assert (observation.ready, observation.starting) == (2, 1)
    assert (observation.draining, observation.unhealthy) == (1, 1)
    assert observation.ready_loads == (
        ReplicaLoad(in_flight=3, running=3, waiting=1, kv_usage_frac=0.4),
        ReplicaLoad(in_flight=2),
    )
    assert observation.in_flight_not_ready == 5


def test_current_defaults_to_replicas_not_draining() -> None:
    assert observe(FLEET, now=0.0).current == 4
    assert observe(FLEET, now=0.0, current=7).current == 7


def test_gateway_figures_pass_through() -> None:
    observation = observe([], now=1.0, held=3, ttft_p95_s=0.8, arrival_rps=2.5, arrival_tps=900.0)
    assert (observation.held, observation.ttft_p95_s) == (3, 0.8)
    assert (observation.arrival_rps, observation.arrival_tps) == (2.5, 900.0)
    assert (observation.ready, observation.current) == (0, 0)


@pytest.mark.parametrize(
    ("load", "concurrency"),
    [
        pytest.param(ReplicaLoad(in_flight=5), 5.0, id="gateway-only"),
        pytest.param(ReplicaLoad(in_flight=5, running=3, waiting=1), 5.0, id="gateway-larger"),
        pytest.param(ReplicaLoad(in_flight=2, running=8, waiting=4), 12.0, id="engine-larger"),
        pytest.param(ReplicaLoad(in_flight=0, waiting=2), 2.0, id="waiting-only"),
    ],
)
def test_replica_concurrency_does_not_double_count(load: ReplicaLoad, concurrency: float) -> None:
    assert load.concurrency == concurrency


@pytest.mark.parametrize(
    ("observation", "idle"),
    [
        pytest.param(Observation(now=0.0, current=0), True, id="empty"),
        pytest.param(
            Observation(now=0.0, current=1, ready_loads=(ReplicaLoad(0, 0.0, 0.0),)),
            True,
            id="zero-counts",
        ),
        pytest.param(
            Observation(now=0.0, current=1, ready_loads=(ReplicaLoad(0, running=1.0),)),
            False,
            id="engine-running",
        ),
        pytest.param(Observation(now=0.0, current=0, held=1), False, id="held"),
        pytest.param(Observation(now=0.0, current=0, arrival_rps=0.1), False, id="arrivals"),
        pytest.param(Observation(now=0.0, current=0, arrival_rps=0.0), True, id="no-arrivals"),
    ],
)
def test_idle(observation: Observation, idle: bool) -> None:
    assert observation.idle is idle


def test_observation_from_snapshots_drives_decide() -> None:
    """Twelve requests on one ready replica, one more starting: the starting one covers it."""
    fleet = [
        snap("a", in_flight=12, signals=EngineSignals(running=8, waiting=4)),
        snap("b", ReplicaState.STARTING),
    ]
    config = AutoscaleSettings(max_replicas=8)
    decision, _ = decide(observe(fleet, now=0.0), AutoscaleState(desired=2), config)
    assert (decision.current, decision.desired) == (2, 2)
    assert "1 not reporting cover it" in decision.reason
