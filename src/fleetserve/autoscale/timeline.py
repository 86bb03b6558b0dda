"""The autoscaler's timeline: every decision with its reason, and the replica count over time.

Bounded: the most recent `keep` decisions, plus the most recent `keep_changes` decisions that
changed the desired count (scaling events stay visible long after steady periods). It also
integrates replica-seconds (replicas counting toward capacity, times the time they ran),
which cost analysis and the end-to-end study quote.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fleetserve.autoscale.decision import Decision
from fleetserve.autoscale.observation import Observation


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    at: float  # the loop clock's now()
    wall: float  # Unix seconds, for people
    desired: int | None
    current: int | None
    ready: int | None = None
    starting: int | None = None
    draining: int | None = None
    held: int | None = None
    ttft_p95_s: float | None = None
    direction: str = "hold"
    reason: str = ""
    signals: dict[str, int | None] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def of(
        cls, decision: Decision, obs: Observation, wall: float, error: str | None
    ) -> TimelineEntry:
        return cls(
            at=decision.at,
            wall=wall,
            desired=decision.desired,
            current=decision.current,
            ready=obs.ready,
            starting=obs.starting,
            draining=obs.draining,
            held=obs.held,
            ttft_p95_s=obs.ttft_p95_s,
            direction=decision.direction.value,
            reason=decision.reason,
            signals=dict(decision.signals),
            error=error,
        )

    @classmethod
    def failed(cls, at: float, wall: float, message: str) -> TimelineEntry:
        return cls(at=at, wall=wall, desired=None, current=None, reason=message, error=message)

    def as_json(self, now: float) -> dict[str, object]:
        return {
            "at_s_ago": round(now - self.at, 3),
            "wall": round(self.wall, 3),
            "desired": self.desired,
            "current": self.current,
            "ready": self.ready,
            "starting": self.starting,
            "draining": self.draining,
            "held": self.held,
            "ttft_p95_s": None if self.ttft_p95_s is None else round(self.ttft_p95_s, 4),
            "direction": self.direction,
            "reason": self.reason,
            "signals": self.signals,
            "error": self.error,
        }


class Timeline:
    def __init__(self, keep: int = 3600, keep_changes: int = 1000) -> None:
        self._recent: deque[TimelineEntry] = deque(maxlen=keep)
        self._changes: deque[TimelineEntry] = deque(maxlen=keep_changes)
        self._last_desired: int | None = None
        self._last: TimelineEntry | None = None
        self.replica_seconds = 0.0  # sum over time of replicas starting, ready or draining
        self.peak_replicas = 0

    def add(self, entry: TimelineEntry) -> None:
        last = self._last
        if last is not None and entry.current is not None:
            # Replicas that held capacity since the previous successful step (left Riemann sum
            # at the loop's period: the count then held until now).
            running = (last.ready or 0) + (last.starting or 0) + (last.draining or 0)
            self.replica_seconds += running * max(0.0, entry.at - last.at)
        if entry.current is not None:
            self._last = entry
            running = (entry.ready or 0) + (entry.starting or 0) + (entry.draining or 0)
            self.peak_replicas = max(self.peak_replicas, running)
        self._recent.append(entry)
        if entry.desired is not None and entry.desired != self._last_desired:
            self._changes.append(entry)
            self._last_desired = entry.desired

    def entries(self) -> list[TimelineEntry]:
        return list(self._recent)

    def changes(self) -> list[TimelineEntry]:
        return list(self._changes)

    @property
    def latest(self) -> TimelineEntry | None:
        return self._recent[-1] if self._recent else None

    def view(self, now: float, recent: int = 60) -> dict[str, object]:
        latest = self.latest
        return {
            "latest": None if latest is None else latest.as_json(now),
            "changes": [e.as_json(now) for e in self._changes],
            "recent": [e.as_json(now) for e in list(self._recent)[-recent:]],
            "replica_seconds": round(self.replica_seconds, 3),
            "peak_replicas": self.peak_replicas,
        }
