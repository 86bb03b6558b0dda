"""Build an `Observation` from the fleet's replica snapshots and the gateway's measurements.

Pure: the loop reads the `Fleet` (one model's snapshots) and the gateway's load window, and
passes plain numbers here, so this module needs nothing from `gateway` (a sibling layer).
"""

from __future__ import annotations

from collections.abc import Iterable

from fleetserve.autoscale.observation import Observation, ReplicaLoad
from fleetserve.routing.snapshot import ReplicaSnapshot, ReplicaState

__all__ = ["observe", "replica_load"]


def replica_load(snapshot: ReplicaSnapshot) -> ReplicaLoad:
    signals = snapshot.signals
    return ReplicaLoad(
        in_flight=snapshot.in_flight,
        running=signals.running,
        waiting=signals.waiting,
        kv_usage_frac=signals.kv_usage_frac,
    )


def observe(
    replicas: Iterable[ReplicaSnapshot],
    *,
    now: float,
    current: int | None = None,
    held: int = 0,
    ttft_p95_s: float | None = None,
    arrival_rps: float | None = None,
    arrival_tps: float | None = None,
) -> Observation:
    """One model's replicas and gateway figures as an `Observation`.

    `current` is what the actuator reports; without one, the replicas that are ready, starting
    or unhealthy count (draining ones are on their way out).
    """
    loads: list[ReplicaLoad] = []
    counts = dict.fromkeys(ReplicaState, 0)
    in_flight_not_ready = 0
    for snapshot in replicas:
        counts[snapshot.state] += 1
        if snapshot.state is ReplicaState.READY:
            loads.append(replica_load(snapshot))
        else:
            in_flight_not_ready += snapshot.in_flight
    if current is None:
        current = len(loads) + counts[ReplicaState.STARTING] + counts[ReplicaState.UNHEALTHY]
    return Observation(
        now=now,
        current=current,
        ready_loads=tuple(loads),
        starting=counts[ReplicaState.STARTING],
        draining=counts[ReplicaState.DRAINING],
        unhealthy=counts[ReplicaState.UNHEALTHY],
        in_flight_not_ready=in_flight_not_ready,
        held=held,
        ttft_p95_s=ttft_p95_s,
        arrival_rps=arrival_rps,
        arrival_tps=arrival_tps,
    )
