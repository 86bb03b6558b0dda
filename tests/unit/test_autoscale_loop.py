"""The autoscaler loop on a fake clock: observe -> decide -> actuate, wake-ups, failures."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from fleetserve.autoscale.loop import AutoscaleLoop
from fleetserve.autoscale.observation import Observation
from fleetserve.autoscale.observers import FleetObserver, GatewayFigures
from fleetserve.config import AutoscaleSettings
from fleetserve.errors import ActuatorError, ObserveError
from fleetserve.fleet.actuators import ActuatorStatus
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.sim_actuator import SimActuator
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.testing.clock import FakeClock

MODEL = "m"


class Figures:
    def __init__(self) -> None:
        self.held = 0

    def __call__(self, model: str, now: float) -> GatewayFigures:
        return GatewayFigures(held=self.held)


def build(
    settings: AutoscaleSettings, cold_start_s: float = 10.0
) -> tuple[FakeClock, Fleet, SimActuator, Figures, AutoscaleLoop]:
    clock = FakeClock()
    fleet = Fleet()
    actuator = SimActuator(clock, cold_start_s=cold_start_s, fleet=fleet, model=MODEL)
    figures = Figures()
    loop = AutoscaleLoop(MODEL, FleetObserver(fleet, MODEL, figures), actuator, settings, clock)
    return clock, fleet, actuator, figures, loop


def load(fleet: Fleet, per_replica: int) -> None:
    """Set every ready replica's in-flight count."""
    for replica in fleet.replicas(MODEL):
        replica.in_flight = per_replica if replica.state is ReplicaState.READY else 0


async def test_scales_up_under_load_and_down_after_it() -> None:
    settings = AutoscaleSettings(min_replicas=1, max_replicas=6, period_s=5, target_concurrency=4)
    clock, fleet, actuator, _, loop = build(settings, cold_start_s=10)
    await actuator.set_replicas(1)
    await clock.advance(10)
    await loop.start()
    try:
        sizes: list[int] = []
        for t in range(0, 400, 5):
            load(fleet, 12 if 20 <= t < 120 else 0)
            await clock.advance(5)
            sizes.append(await actuator.current())
        assert max(sizes) >= 3, sizes
        assert sizes[-1] == 1, sizes  # back to the floor once idle (after the down window)
        changes = loop.timeline.changes()
        assert any(c.direction == "up" for c in changes)
        assert any(c.direction == "down" for c in changes)
        assert all(c.reason for c in loop.timeline.entries())
        assert loop.timeline.peak_replicas >= 3
        assert loop.timeline.replica_seconds > 400  # at least one replica all along
    finally:
        await loop.stop()


async def test_wake_decides_at_once_for_held_requests() -> None:
    settings = AutoscaleSettings(min_replicas=0, max_replicas=4, period_s=30)
    clock, _, actuator, figures, loop = build(settings, cold_start_s=2)
    await loop.start()
    try:
        await clock.advance(1)
        assert await actuator.current() == 0
        figures.held = 3
        loop.wake()
        await clock.settle()
        # No period passed, yet a replica is on its way.
        assert await actuator.current() == 1
        assert "held" in (loop.timeline.latest.reason if loop.timeline.latest else "")
    finally:
        await loop.stop()


class BrokenObserver:
    async def observe(self, now: float, current: int) -> Observation:
        raise ObserveError("gateway unreachable")


class BrokenActuator(SimActuator):
    async def set_replicas(self, n: int) -> None:
        raise ActuatorError("deployment ns/x: forbidden")


async def test_failed_observation_is_recorded_and_nothing_scales() -> None:
    clock = FakeClock()
    actuator = SimActuator(clock, cold_start_s=0)
    await actuator.set_replicas(2)
    loop = AutoscaleLoop(MODEL, BrokenObserver(), actuator, AutoscaleSettings(), clock)
    assert await loop.step() is None
    assert await actuator.current() == 2
    latest = loop.timeline.latest
    assert latest is not None
    assert latest.error == "observation failed: gateway unreachable"
    assert loop.view()["latest"] is not None


async def test_failed_actuation_is_recorded_and_retried() -> None:
    clock = FakeClock()
    fleet = Fleet()
    actuator = BrokenActuator(clock, cold_start_s=0, fleet=fleet, model=MODEL)
    figures = Figures()
    figures.held = 1
    settings = AutoscaleSettings(min_replicas=1, max_replicas=2)
    loop = AutoscaleLoop(MODEL, FleetObserver(fleet, MODEL, figures), actuator, settings, clock)
    first = await loop.step()
    second = await loop.step()
    assert first is not None
    assert second is not None
    assert first.desired == 1
    errors = [e.error for e in loop.timeline.entries()]
    assert errors == ["actuation failed: deployment ns/x: forbidden"] * 2


class FailsOnce:
    """An observer with a bug that shows once: a ValueError (as a JSONDecodeError is)."""

    def __init__(self, inner: FleetObserver, at_call: int) -> None:
        self.inner = inner
        self.at_call = at_call
        self.calls = 0

    async def observe(self, now: float, current: int) -> Observation:
        self.calls += 1
        if self.calls == self.at_call:
            raise ValueError("Expecting value: line 1 column 1 (char 0)")
        return await self.inner.observe(now, current)


async def test_unexpected_observer_error_restarts_the_loop_and_it_keeps_deciding() -> None:
    settings = AutoscaleSettings(min_replicas=1, max_replicas=4, period_s=5)
    clock = FakeClock()
    fleet = Fleet()
    actuator = SimActuator(clock, cold_start_s=0, fleet=fleet, model=MODEL)
    observer = FailsOnce(FleetObserver(fleet, MODEL, Figures()), at_call=3)
    loop = AutoscaleLoop(MODEL, observer, actuator, settings, clock)
    await actuator.set_replicas(1)
    await loop.start()
    try:
        await clock.advance(60)
        decided_at = [e.at for e in loop.timeline.entries()]
        assert observer.calls >= 10
        assert decided_at[-1] >= 55  # still deciding long after the failure at t=10
        # The loop was restarted once, after a backoff of at most the supervisor's first step.
        status = loop.supervisor.status(f"autoscaler/{MODEL}")
        assert status is not None
        assert status.restarts == 1
        assert status.last_error == "ValueError: Expecting value: line 1 column 1 (char 0)"
    finally:
        await loop.stop()
    assert loop.supervisor.statuses() == ()


@pytest.mark.parametrize("period_s", [1.0, 5.0])
async def test_loop_steps_once_per_period(period_s: float) -> None:
    settings = AutoscaleSettings(min_replicas=1, max_replicas=2, period_s=period_s)
    clock, _, actuator, _, loop = build(settings, cold_start_s=0)
    await actuator.set_replicas(1)
    await loop.start()
    try:
        await clock.advance(period_s * 10)
        steps = len(loop.timeline.entries())
        assert steps in (10, 11)  # one at start, then one per period
    finally:
        await loop.stop()
    await asyncio.sleep(0)


async def test_view_is_plain_json() -> None:
    settings = AutoscaleSettings(min_replicas=1, max_replicas=2)
    clock, _, actuator, _, loop = build(settings, cold_start_s=0)
    await actuator.set_replicas(1)
    await loop.step()
    view = loop.view()
    data = orjson.loads(orjson.dumps(view))
    assert data["model"] == MODEL
    assert data["actuator"]["kind"] == "sim"
    assert isinstance(await actuator.describe(), ActuatorStatus)
    assert clock.now() == 0
