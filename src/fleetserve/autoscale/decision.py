"""What `decide` returns: the decision (with its reason) and the state carried to the next call."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

NO_SIGNAL = "none"  # what `Decision.signal` says when no signal was measured


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision of the policy, made at `at` (the observation's `now`)."""

    at: float
    desired: int
    """Replicas the actuator should run."""
    current: int
    """Replicas the actuator reported in the observation."""
    direction: Direction
    """`desired` against `current`."""
    recommendation: int
    """The signals' recommendation before the guards (stabilization, steps, bounds)."""
    reason: str
    """Why, for people: the deciding signal, then every guard that changed the number."""
    signals: Mapping[str, int | None]
    """Replicas each signal asked for; None when it was not measured or asked for nothing."""

    @property
    def signal(self) -> str:
        """The signal whose recommendation won (the first of the largest, as `decide` picks
        it); `none` when no signal was measured."""
        for name, replicas in self.signals.items():
            if replicas is not None and replicas == self.recommendation:
                return name
        return NO_SIGNAL


@dataclass(frozen=True, slots=True)
class TimedRecommendation:
    at: float
    replicas: int


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """A change of the desired count: `delta` replicas (negative going down) at `at`."""

    at: float
    delta: int


@dataclass(frozen=True, slots=True)
class AutoscaleState:
    """What `decide` remembers between calls; start with `AutoscaleState()`."""

    recommendations: tuple[TimedRecommendation, ...] = ()
    """Recent unstabilized recommendations, for the stabilization windows."""
    events: tuple[ScaleEvent, ...] = ()
    """Recent changes of the desired count, for the step policies."""
    desired: int | None = None
    """The last desired count; None before the first decision."""
    last_direction: Direction | None = None
    last_change_at: float | None = None
    idle_since: float | None = None
    """When the fleet was last seen becoming idle; None while it is busy."""
