"""The Fleet: the single source of truth for replicas.

The router reads it to pick, health monitors and discovery write it. Nothing else keeps
its own list of replicas.
"""

from __future__ import annotations

from collections.abc import Callable

from fleetserve.fleet.replica import EjectionPolicy, Replica
from fleetserve.routing.snapshot import EngineSignals, ReplicaSnapshot, ReplicaState

FleetListener = Callable[[Replica], None]


class Fleet:
    def __init__(self, ejection: EjectionPolicy | None = None) -> None:
        self.ejection = ejection or EjectionPolicy()
        self._replicas: dict[str, Replica] = {}
        self._by_model: dict[str, list[Replica]] = {}
        self._listeners: list[FleetListener] = []

    # -- membership -------------------------------------------------------------------
    def add(self, replica: Replica) -> None:
        if replica.id in self._replicas:
            raise ValueError(f"replica {replica.id!r} is already in the fleet")
        self._replicas[replica.id] = replica
        self._by_model.setdefault(replica.model, []).append(replica)
        self._changed(replica)

    def remove(self, replica_id: str) -> Replica | None:
        replica = self._replicas.pop(replica_id, None)
        if replica is not None:
            self._by_model[replica.model].remove(replica)
            self._changed(replica)
        return replica

    def declare_model(self, model: str) -> None:
        """A model the fleet serves, even while it has no replica (so requests get 503)."""
        self._by_model.setdefault(model, [])

    def get(self, replica_id: str) -> Replica | None:
        return self._replicas.get(replica_id)

    def __len__(self) -> int:
        return len(self._replicas)

    def models(self) -> list[str]:
        return list(self._by_model)

    def serves(self, model: str) -> bool:
        return model in self._by_model

    def replicas(self, model: str | None = None) -> list[Replica]:
        if model is None:
            return list(self._replicas.values())
        return list(self._by_model.get(model, ()))

    def ready(self, model: str) -> list[ReplicaSnapshot]:
        """Snapshots of the ready replicas of `model`: what pickers choose among."""
        return [
            r.snapshot() for r in self._by_model.get(model, ()) if r.state is ReplicaState.READY
        ]

    def count_by_state(self, model: str | None = None) -> dict[ReplicaState, int]:
        counts = dict.fromkeys(ReplicaState, 0)
        for replica in self.replicas(model):
            counts[replica.state] += 1
        return counts

    # -- load -------------------------------------------------------------------------
    def begin(self, replica_id: str) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.in_flight += 1

    def end(self, replica_id: str) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None and replica.in_flight > 0:
            replica.in_flight -= 1

    # -- health -----------------------------------------------------------------------
    def record_success(self, replica_id: str, now: float) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.record_success(now)

    def record_failure(self, replica_id: str, now: float, reason: str) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None and replica.record_failure(now, self.ejection, reason):
            self._changed(replica)

    def probe_passed(self, replica_id: str, now: float) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None and replica.probe_passed(now):
            self._changed(replica)

    def probe_failed(self, replica_id: str, now: float, reason: str) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None and replica.probe_failed(now, self.ejection, reason):
            self._changed(replica)

    def set_signals(self, replica_id: str, signals: EngineSignals, now: float) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.set_signals(signals, now)

    def clear_signals(self, replica_id: str) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.clear_signals()

    def drain(self, replica_id: str, now: float) -> None:
        replica = self._replicas.get(replica_id)
        if replica is not None and replica.drain(now):
            self._changed(replica)

    # -- observers --------------------------------------------------------------------
    def subscribe(self, listener: FleetListener) -> None:
        """Called with a replica whenever one joins, leaves or changes state."""
        self._listeners.append(listener)

    def _changed(self, replica: Replica) -> None:
        for listener in self._listeners:
            listener(replica)
