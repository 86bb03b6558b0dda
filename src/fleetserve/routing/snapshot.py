"""The frozen view of one replica that pickers and policies read.

It lives here, in the lowest layer that reads it, so that `routing` stays pure and below
`fleet`; `fleet.Fleet` builds these from its live replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ReplicaState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class EngineSignals:
    """What an engine's /metrics says about its load; None where the engine did not say."""

    running: float | None = None
    waiting: float | None = None
    kv_usage_frac: float | None = None
    # Cumulative output tokens the engine generated (a counter): the dashboard's tokens/s is
    # its rate between two scrapes. Pickers and policies do not read it.
    generation_tokens: float | None = None


NO_SIGNALS = EngineSignals()


@dataclass(frozen=True, slots=True)
class ReplicaSnapshot:
    id: str
    url: str
    model: str
    state: ReplicaState
    in_flight: int
    signals: EngineSignals
    last_seen: float | None
    max_concurrency: int | None = None

    @property
    def has_capacity(self) -> bool:
        return self.max_concurrency is None or self.in_flight < self.max_concurrency


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a picker may know about a request."""

    model: str
    prefix_key: str = ""
    exclude: frozenset[str] = frozenset()
