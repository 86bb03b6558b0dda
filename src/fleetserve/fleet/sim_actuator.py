"""SimActuator: replicas without processes, on an injected clock, for simulations and tests.

A replica becomes ready `cold_start_s` after its launch. Scale-down drains: a draining
replica is removed once its in-flight count (asked of the simulation) reaches 0, or when
`drain_grace_s` has passed, whatever it still had in flight being cut then, as a real
actuator would stop the process.

Time moves only when the clock says so; `advance()` applies every transition due by
`clock.now()` at its own exact time (a replica launched at t is ready at t + cold_start_s even
when advance is called later) and returns the events. A simulation loop either calls
`advance()` itself, scheduling its next wake-up at `next_due()`, or passes `listener` to be
told of every event as it happens (set_replicas and current advance first). With `fleet`
given, the replicas are mirrored into that Fleet (added starting, made ready, drained,
removed), so a gateway or an autoscaler loop under test sees them like real ones.

Replica-seconds are counted per state (starting, ready, draining), from launch to removal:
what a cost comparison charges for.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fleetserve.clock import Clock
from fleetserve.config import DRAIN_GRACE_S
from fleetserve.fleet.actuators import (
    ActuatorStatus,
    ReplicaStatus,
    VictimCandidate,
    choose_victims,
)
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.routing.snapshot import ReplicaState

COLD_STARTS_KEPT = 50
SimEventKind = Literal["launched", "ready", "draining", "removed"]


@dataclass(frozen=True, slots=True)
class SimEvent:
    at: float
    kind: SimEventKind
    replica_id: str
    cut_in_flight: int = 0  # "removed" at the drain deadline with work still running


@dataclass(frozen=True, slots=True)
class ReplicaSeconds:
    starting_s: float = 0.0
    ready_s: float = 0.0
    draining_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.starting_s + self.ready_s + self.draining_s


@dataclass(slots=True)
class _SimReplica:
    id: str
    launched_at: float
    state: ReplicaState
    since: float
    ready_at: float | None = None
    drain_deadline: float | None = None
    seconds: dict[ReplicaState, float] = field(default_factory=dict)

    def enter(self, state: ReplicaState, at: float) -> None:
        self.seconds[self.state] = self.seconds.get(self.state, 0.0) + (at - self.since)
        self.state = state
        self.since = at


class SimActuator:
    def __init__(
        self,
        clock: Clock,
        *,
        cold_start_s: float,
        drain_grace_s: float = DRAIN_GRACE_S,
        in_flight: Callable[[str], int] | None = None,
        listener: Callable[[SimEvent], None] | None = None,
        fleet: Fleet | None = None,
        model: str = "sim",
        max_concurrency: int | None = None,
    ) -> None:
        if cold_start_s < 0 or drain_grace_s < 0:
            raise ValueError("cold_start_s and drain_grace_s must be >= 0")
        self.clock = clock
        self.cold_start_s = cold_start_s
        self.drain_grace_s = drain_grace_s
        self.listener = listener
        self.fleet = fleet
        self.model = model
        self.max_concurrency = max_concurrency
        self._in_flight = in_flight or self._fleet_in_flight
        self._replicas: dict[str, _SimReplica] = {}
        self._ids = itertools.count()
        self._desired: int | None = None
        self._done = ReplicaSeconds()
        self._cold_starts: deque[float] = deque(maxlen=COLD_STARTS_KEPT)
        if fleet is not None:
            fleet.declare_model(model)

    # -- the Actuator protocol ----------------------------------------------------------
    async def set_replicas(self, n: int) -> None:
        self.scale_to(n)

    async def current(self) -> int:
        self.advance()
        return self._active_count()

    async def describe(self) -> ActuatorStatus:
        self.advance()
        replicas = tuple(
            ReplicaStatus(
                id=r.id,
                state=r.state,
                since=r.since,
                launched_at=r.launched_at,
                cold_start_s=None if r.ready_at is None else r.ready_at - r.launched_at,
                in_flight=self._in_flight(r.id),
            )
            for r in self._replicas.values()
        )
        return ActuatorStatus(
            kind="sim",
            target=f"model {self.model}",
            desired=self._desired,
            current=self._active_count(),
            replicas=replicas,
            cold_starts_s=tuple(self._cold_starts),
        )

    async def close(self) -> None:
        """Remove every replica at once (no drain), counting its time up to now."""
        self.advance()
        now = self.clock.now()
        for replica in list(self._replicas.values()):
            self._remove(replica, now, self._in_flight(replica.id))

    # -- for simulation loops -----------------------------------------------------------
    def scale_to(self, n: int) -> list[SimEvent]:
        """`set_replicas` without the coroutine; returns the events it caused."""
        if n < 0:
            raise ValueError(f"replicas must be >= 0, not {n}")
        events = self.advance()
        now = self.clock.now()
        self._desired = n
        active = [r for r in self._replicas.values() if r.state is not ReplicaState.DRAINING]
        for _ in range(n - len(active)):
            events.append(self._launch(now))
        candidates = [
            VictimCandidate(r.id, r.state, self._in_flight(r.id), r.launched_at) for r in active
        ]
        for victim in choose_victims(candidates, len(active) - n):
            replica = self._replicas[victim]
            if replica.state is ReplicaState.STARTING:
                events.append(self._remove(replica, now, 0))
            else:
                replica.drain_deadline = now + self.drain_grace_s
                replica.enter(ReplicaState.DRAINING, now)
                if self.fleet is not None:
                    self.fleet.drain(replica.id, now)
                events.append(self._emit(SimEvent(now, "draining", replica.id)))
        events.extend(self.advance())  # a zero cold start or an idle drain ends at once
        return events

    def advance(self) -> list[SimEvent]:
        """Apply every transition due by `clock.now()`, each at its own time, in time order."""
        now = self.clock.now()
        due: list[tuple[float, _SimReplica]] = []
        for replica in self._replicas.values():
            if replica.state is ReplicaState.STARTING:
                ready_at = replica.launched_at + self.cold_start_s
                if ready_at <= now:
                    due.append((ready_at, replica))
            elif replica.state is ReplicaState.DRAINING:
                assert replica.drain_deadline is not None
                if replica.drain_deadline <= now:
                    due.append((replica.drain_deadline, replica))
                elif self._in_flight(replica.id) == 0:
                    due.append((now, replica))
        events: list[SimEvent] = []
        for at, replica in sorted(due, key=lambda item: (item[0], item[1].id)):
            if replica.state is ReplicaState.STARTING:
                replica.ready_at = at
                self._cold_starts.append(at - replica.launched_at)
                replica.enter(ReplicaState.READY, at)
                if self.fleet is not None:
                    self.fleet.probe_passed(replica.id, at)
                events.append(self._emit(SimEvent(at, "ready", replica.id)))
            else:
                events.append(self._remove(replica, at, self._in_flight(replica.id)))
        return events

    def next_due(self) -> float | None:
        """The earliest time a transition is certain: a cold start ending or a drain deadline
        (a drain can also end earlier, when the simulation's last request there finishes)."""
        times = [
            r.launched_at + self.cold_start_s
            if r.state is ReplicaState.STARTING
            else r.drain_deadline
            for r in self._replicas.values()
            if r.state in (ReplicaState.STARTING, ReplicaState.DRAINING)
        ]
        return min((t for t in times if t is not None), default=None)

    def ids(self, state: ReplicaState) -> list[str]:
        """Replicas in `state` as of the last advance, in launch order."""
        return [r.id for r in self._replicas.values() if r.state is state]

    def replica_seconds(self) -> ReplicaSeconds:
        """Replica-seconds used so far, removed replicas and live ones up to now."""
        self.advance()
        now = self.clock.now()
        total = dict.fromkeys(ReplicaState, 0.0)
        for replica in self._replicas.values():
            for state, seconds in replica.seconds.items():
                total[state] += seconds
            total[replica.state] += now - replica.since
        return ReplicaSeconds(
            starting_s=self._done.starting_s + total[ReplicaState.STARTING],
            ready_s=self._done.ready_s + total[ReplicaState.READY],
            draining_s=self._done.draining_s + total[ReplicaState.DRAINING],
        )

    # -- internals ----------------------------------------------------------------------
    def _active_count(self) -> int:
        return sum(1 for r in self._replicas.values() if r.state is not ReplicaState.DRAINING)

    def _launch(self, now: float) -> SimEvent:
        rid = f"sim-{next(self._ids)}"
        self._replicas[rid] = _SimReplica(rid, now, ReplicaState.STARTING, now)
        if self.fleet is not None:
            replica = Replica(
                id=rid,
                url=f"sim://{rid}",
                model=self.model,
                max_concurrency=self.max_concurrency,
                state_since=now,
            )
            self.fleet.add(replica)
        return self._emit(SimEvent(now, "launched", rid))

    def _remove(self, replica: _SimReplica, at: float, cut: int) -> SimEvent:
        replica.enter(replica.state, at)  # close the current state's interval
        seconds = replica.seconds
        self._done = ReplicaSeconds(
            starting_s=self._done.starting_s + seconds.get(ReplicaState.STARTING, 0.0),
            ready_s=self._done.ready_s + seconds.get(ReplicaState.READY, 0.0),
            draining_s=self._done.draining_s + seconds.get(ReplicaState.DRAINING, 0.0),
        )
        del self._replicas[replica.id]
        if self.fleet is not None:
            self.fleet.remove(replica.id)
        return self._emit(SimEvent(at, "removed", replica.id, cut_in_flight=cut))

    def _emit(self, event: SimEvent) -> SimEvent:
        if self.listener is not None:
            self.listener(event)
        return event

    def _fleet_in_flight(self, replica_id: str) -> int:
        replica = self.fleet.get(replica_id) if self.fleet is not None else None
        return 0 if replica is None else replica.in_flight
