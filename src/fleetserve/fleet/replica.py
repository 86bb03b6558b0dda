"""One live replica: state, gateway in-flight count, engine signals and health bookkeeping.

Passive ejection follows Envoy's outlier detection: N consecutive failures eject the
replica for a base time that doubles with each ejection (capped); when that passes, one
half-open probe decides whether it comes back. As in Envoy, the ejection count decays while
the replica serves: each `decay_s` it stays healthy takes one ejection off (Envoy decrements
its ejection multiplier once per `interval`, 10 s by default, that a host is not ejected), so
a replica that had outages long ago is not ejected for the longest time at its next one.
`now` always comes in from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetserve.routing.snapshot import (
    NO_SIGNALS,
    EngineSignals,
    ReplicaSnapshot,
    ReplicaState,
)


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    after_failures: int = 3
    base_s: float = 2.0
    max_s: float = 60.0
    decay_s: float = 10.0  # healthy time that takes one ejection off the count

    def ejection_s(self, ejections: int) -> float:
        """How long the next ejection lasts after `ejections` earlier ones."""
        return min(self.base_s * 2.0**ejections, self.max_s)

    def count_after(self, ejections: int) -> int:
        """The count after one more ejection: it stops growing once the ejection time has
        reached the cap (as Envoy's does), so it never overflows and decays in a few steps."""
        return ejections + 1 if self.base_s * 2.0**ejections < self.max_s else ejections

    def decayed(self, ejections: int, healthy_s: float) -> int:
        """The count after `healthy_s` of serving without an ejection."""
        return max(0, ejections - int(healthy_s // self.decay_s))


@dataclass(slots=True)
class Replica:
    id: str
    url: str
    model: str
    state: ReplicaState = ReplicaState.STARTING
    in_flight: int = 0
    signals: EngineSignals = NO_SIGNALS
    last_seen: float | None = None
    signals_at: float | None = None
    scraped_at: float | None = None  # the last good scrape (signals_at is cleared when stale)
    max_concurrency: int | None = None
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    healthy_since: float = 0.0  # when it last became ready: the ejection count decays from then
    state_since: float = 0.0
    reason: str = ""
    name: str = ""  # what people read (replica-0, a pod's name); the id when not given
    _snapshot: ReplicaSnapshot | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.id

    def snapshot(self) -> ReplicaSnapshot:
        snap = self._snapshot
        if snap is None or snap.in_flight != self.in_flight:
            snap = ReplicaSnapshot(
                id=self.id,
                url=self.url,
                model=self.model,
                state=self.state,
                in_flight=self.in_flight,
                signals=self.signals,
                last_seen=self.last_seen,
                max_concurrency=self.max_concurrency,
            )
            self._snapshot = snap
        return snap

    def _set_state(self, state: ReplicaState, now: float, reason: str) -> bool:
        self._snapshot = None
        if state is self.state:
            return False
        self.state = state
        self.state_since = now
        self.reason = reason
        return True

    def set_signals(self, signals: EngineSignals, now: float) -> None:
        self.signals = signals
        self.signals_at = now
        self.scraped_at = now
        self.last_seen = now
        self._snapshot = None

    def clear_signals(self) -> None:
        """Forget stale engine signals so pickers fall back to the gateway's own counts."""
        self.signals = NO_SIGNALS
        self.signals_at = None
        self._snapshot = None

    def record_success(self, now: float) -> None:
        self.consecutive_failures = 0
        self.last_seen = now

    def record_failure(self, now: float, policy: EjectionPolicy, reason: str) -> bool:
        """Count a failed request or probe; returns True if this ejected the replica."""
        self.consecutive_failures += 1
        if self.state is not ReplicaState.READY:
            return False
        if self.consecutive_failures < policy.after_failures:
            return False
        self.eject(now, policy, reason)
        return True

    def eject(self, now: float, policy: EjectionPolicy, reason: str) -> None:
        if self.state is not ReplicaState.UNHEALTHY:  # time spent ejected does not decay it
            self.ejections = policy.decayed(self.ejections, now - self.healthy_since)
        backoff = policy.ejection_s(self.ejections)
        self.ejections = policy.count_after(self.ejections)
        self.ejected_until = now + backoff
        self._set_state(ReplicaState.UNHEALTHY, now, f"{reason}; ejected for {backoff:g}s")

    def probe_due(self, now: float) -> bool:
        """An unhealthy replica is probed (half-open) only after its ejection time passes."""
        return self.state is not ReplicaState.UNHEALTHY or now >= self.ejected_until

    def probe_passed(self, now: float) -> bool:
        """A passing health probe makes a starting or unhealthy replica ready; True if changed."""
        self.last_seen = now
        if self.state in (ReplicaState.STARTING, ReplicaState.UNHEALTHY):
            self.consecutive_failures = 0
            self.healthy_since = now
            return self._set_state(ReplicaState.READY, now, "health probe passed")
        return False

    def probe_failed(self, now: float, policy: EjectionPolicy, reason: str) -> bool:
        """A failed probe ejects a ready replica at once and re-ejects an unhealthy one."""
        if self.state is ReplicaState.READY or self.state is ReplicaState.UNHEALTHY:
            self.eject(now, policy, f"health probe failed: {reason}")
            return True
        return False  # starting: keep waiting for the engine to come up

    def drain(self, now: float) -> bool:
        return self._set_state(ReplicaState.DRAINING, now, "draining")
