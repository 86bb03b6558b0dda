"""The Actuator seam: how the autoscaler changes the number of replicas, and what it reports.

Three implementations share it: `fleet.local.LocalActuator` (engine processes on this
machine), `fleet.kubernetes.KubernetesActuator` (a Deployment's `scale` subresource) and
`fleet.sim_actuator.SimActuator` (no processes; for the simulator, benchmarks and tests).

The contract the autoscaler loop relies on:

* `set_replicas(n)` returns once the change is under way (launches started, drains begun),
  not when it is done; calling it again with the same `n` is a no-op, and a new `n` simply
  supersedes the old one. Scaling down never blocks scaling up.
* `current()` counts the replicas that count toward capacity: starting, ready or unhealthy,
  never draining, never exited. A replica that crashes drops out, so the policy replaces it.
* `describe()` is plain data for status pages and the admin API.
* Failures are `fleetserve.errors.ActuatorError` with a message that names what was scaled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetserve.routing.snapshot import ReplicaState


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as an actuator sees it; times are the injected clock's `now()`."""

    id: str
    state: ReplicaState
    since: float  # when it entered `state`
    launched_at: float
    cold_start_s: float | None = None  # launch -> ready; None until ready
    in_flight: int = 0
    pid: int | None = None
    url: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaExit:
    """A replica that ended without being asked to: crashed, or never became ready."""

    id: str
    at: float
    while_starting: bool
    reason: str  # "exited with code -9", "not ready after 120s"
    log_tail: str = ""


@dataclass(frozen=True, slots=True)
class ActuatorStatus:
    kind: str  # "local", "kubernetes", "sim"
    target: str  # what it scales: "model llama", "deployment ns/name"
    desired: int | None  # the last `set_replicas`, or Kubernetes' spec.replicas
    current: int
    replicas: tuple[ReplicaStatus, ...] = ()
    cold_starts_s: tuple[float, ...] = ()  # the latest measured launch -> ready times
    exits: tuple[ReplicaExit, ...] = ()  # the latest unplanned exits, oldest first
    observed: int | None = None  # Kubernetes' status.replicas (pods that exist)


class Actuator(Protocol):
    async def set_replicas(self, n: int) -> None:
        """Start moving toward `n` replicas; returns once the change is under way."""
        ...

    async def current(self) -> int:
        """Replicas counting toward capacity: starting, ready or unhealthy, not draining."""
        ...

    async def describe(self) -> ActuatorStatus: ...

    async def close(self) -> None:
        """Stop everything this actuator started (a Kubernetes Deployment is left as it is)."""
        ...


@dataclass(frozen=True, slots=True)
class VictimCandidate:
    id: str
    state: ReplicaState
    in_flight: int
    launched_at: float


_VICTIM_RANK = {ReplicaState.STARTING: 0, ReplicaState.UNHEALTHY: 1, ReplicaState.READY: 2}


def choose_victims(candidates: Sequence[VictimCandidate], count: int) -> list[str]:
    """The `count` replicas to remove first: starting ones (they serve nothing yet), then
    unhealthy ones, then the least loaded ready ones, newest first among equals (the oldest
    have warm caches). Draining replicas are already going and are never chosen."""
    eligible = [c for c in candidates if c.state in _VICTIM_RANK]
    eligible.sort(key=lambda c: (_VICTIM_RANK[c.state], c.in_flight, -c.launched_at, c.id))
    return [c.id for c in eligible[: max(0, count)]]
