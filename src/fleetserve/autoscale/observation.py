"""What the autoscaler sees at one instant: plain numbers, gathered by the loop, read by `decide`.

`None` always means "not measured" (an engine that exports no such metric, a window with no
sample), never zero; the policy treats the two differently.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """The load of one ready replica: the gateway's count and what its engine reports."""

    in_flight: int
    running: float | None = None
    waiting: float | None = None
    kv_usage_frac: float | None = None

    @property
    def concurrency(self) -> float:
        """Requests this replica carries.

        The gateway's in-flight count already includes the requests the engine holds for it
        (running or waiting), so the two are not added; the engine's own count wins when it is
        larger because other gateway workers send to the same engine.
        """
        engine = (self.running or 0.0) + (self.waiting or 0.0)
        return max(float(self.in_flight), engine)

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or bool(self.running) or bool(self.waiting)


@dataclass(frozen=True, slots=True)
class Observation:
    """One sample of the fleet and the gateway, taken at `now` (the loop's clock, seconds)."""

    now: float
    current: int
    """Replicas the actuator reports (the count it maintains, starting ones included)."""
    ready_loads: tuple[ReplicaLoad, ...] = ()
    """One entry per ready replica."""
    starting: int = 0
    draining: int = 0
    unhealthy: int = 0
    in_flight_not_ready: int = 0
    """Requests still running on draining or unhealthy replicas (they keep a fleet awake)."""
    held: int = 0
    """Requests the gateway holds because no replica can take them (scale from zero)."""
    ttft_p95_s: float | None = None
    """Gateway-measured time to first token, 95th percentile over its recent window."""
    arrival_rps: float | None = None
    arrival_tps: float | None = None
    """Tokens per second arriving (prompt + expected output), for the utilisation estimate."""

    def __post_init__(self) -> None:
        counts = {
            "current": self.current,
            "starting": self.starting,
            "draining": self.draining,
            "unhealthy": self.unhealthy,
            "in_flight_not_ready": self.in_flight_not_ready,
            "held": self.held,
        }
        negative = [name for name, value in counts.items() if value < 0]
        if negative:
            raise ValueError(f"observation counts must not be negative: {negative}")

    @property
    def ready(self) -> int:
        return len(self.ready_loads)

    @property
    def idle(self) -> bool:
        """Nothing arrives, runs, waits or is held (an unknown arrival rate counts as none)."""
        return (
            self.held == 0
            and self.in_flight_not_ready == 0
            and not any(load.busy for load in self.ready_loads)
            and not self.arrival_rps
        )
