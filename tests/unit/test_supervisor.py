"""The supervisor on a fake clock: restarts with capped jittered backoff, streaks that reset
after a healthy run, its per-service state, and cancellation that always stops it."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from fleetserve.supervisor import Backoff, ServiceState, Supervisor, cancel_all
from fleetserve.testing.clock import FakeClock


class Flaky:
    """A service that fails `failures` times (each after `runs_s` of virtual time), then runs
    until cancelled; it records the virtual time of each start."""

    def __init__(self, clock: FakeClock, failures: int, runs_s: float = 0.0) -> None:
        self.clock = clock
        self.failures = failures
        self.runs_s = runs_s
        self.starts: list[float] = []

    async def __call__(self) -> None:
        self.starts.append(self.clock.now())
        if self.runs_s:
            await self.clock.sleep(self.runs_s)
        if len(self.starts) <= self.failures:
            raise ValueError(f"boom {len(self.starts)}")
        await self.clock.sleep(10_000)


@pytest.mark.parametrize(
    ("attempt", "jitter", "delay"),
    [(1, 0.0, 0.25), (1, 1.0, 0.5), (2, 0.5, 0.75), (4, 0.0, 2.0), (7, 0.0, 15.0),
     (30, 0.999, 29.985)],
)  # fmt: skip
def test_backoff_doubles_with_half_jitter_and_a_cap(
    attempt: int, jitter: float, delay: float
) -> None:
    assert Backoff(base_s=0.5, max_s=30.0).delay_s(attempt, jitter) == pytest.approx(delay)


async def test_restarts_with_doubling_capped_backoff() -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock, backoff=Backoff(base_s=0.5, max_s=4.0), jitter=lambda: 1.0)
    service = Flaky(clock, failures=6)
    task = supervisor.spawn("flaky", service)
    try:
        await clock.advance(100)
        gaps = [b - a for a, b in itertools.pairwise(service.starts)]
        assert gaps == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0, 4.0])
        status = supervisor.status("flaky")
        assert status is not None
        assert status.state is ServiceState.RUNNING
        assert status.restarts == 6
        assert status.last_error == "ValueError: boom 6"
        assert status.since == pytest.approx(service.starts[-1])
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_state_is_restarting_during_the_backoff() -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock, jitter=lambda: 1.0)  # 0.5 s before the first restart
    task = supervisor.spawn("flaky", Flaky(clock, failures=1))
    try:
        await clock.settle()
        status = supervisor.status("flaky")
        assert status is not None
        assert (status.state, status.restarts, status.last_error) == (
            ServiceState.RESTARTING, 1, "ValueError: boom 1",
        )  # fmt: skip
        assert supervisor.view() == {
            "services": {
                "flaky": {"state": "restarting", "restarts": 1, "last_error": "ValueError: boom 1"}
            },
            "degraded": ["flaky"],
        }
        assert supervisor.counts() == [("flaky", False, 1)]
        await clock.advance(0.5)
        assert supervisor.counts() == [("flaky", True, 1)]
        assert supervisor.view()["degraded"] == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_healthy_run_resets_the_streak() -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock, healthy_after_s=60.0, jitter=lambda: 1.0)
    # Three quick failures (delays 0.5, 1, 2), then one after a 60 s run: back to 0.5.
    starts: list[float] = []

    async def service() -> None:
        starts.append(clock.now())
        if len(starts) == 4:
            await clock.sleep(60)
        if len(starts) <= 4:
            raise ValueError("boom")
        await clock.sleep(10_000)

    task = supervisor.spawn("svc", service)
    try:
        await clock.advance(200)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert gaps == pytest.approx([0.5, 1.0, 2.0, 60.0 + 0.5])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_traceback_once_per_streak_then_one_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock, jitter=lambda: 0.0)
    caplog.set_level(logging.WARNING, logger="fleetserve.supervisor")
    task = supervisor.spawn("flaky", Flaky(clock, failures=3))
    try:
        await clock.advance(10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    records = [r for r in caplog.records if r.name == "fleetserve.supervisor"]
    assert len(records) == 3
    first, *later = records
    assert first.levelno == logging.ERROR
    assert first.exc_info is not None
    assert "flaky" in first.getMessage()
    assert "ValueError: boom 1" in first.getMessage()
    assert all(r.exc_info is None and r.levelno == logging.WARNING for r in later)
    assert "restart 3 in a row" in later[-1].getMessage()


@pytest.mark.parametrize("where", ["while-running", "during-backoff"])
async def test_cancellation_stops_it_and_leaves_the_registry(where: str) -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock, jitter=lambda: 1.0)
    service = Flaky(clock, failures=0 if where == "while-running" else 100)
    task = supervisor.spawn("svc", service)
    await clock.settle()
    expected = ServiceState.RUNNING if where == "while-running" else ServiceState.RESTARTING
    assert [s.state for s in supervisor.statuses()] == [expected]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert supervisor.statuses() == ()
    await clock.advance(100)
    assert len(service.starts) == 1  # nothing runs once cancelled
    assert clock.sleepers == 0


async def test_cancelled_error_from_the_service_is_never_swallowed() -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock)
    runs = 0

    async def service() -> None:
        nonlocal runs
        runs += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await supervisor.run("svc", service)
    assert runs == 1
    assert supervisor.statuses() == ()


async def test_cancelled_before_it_ran_leaves_the_registry() -> None:
    supervisor = Supervisor(FakeClock())
    task = supervisor.spawn("svc", Flaky(FakeClock(), failures=0))
    assert [s.name for s in supervisor.statuses()] == ["svc"]  # reported from the spawn on
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert supervisor.statuses() == ()
    again = supervisor.spawn("svc", Flaky(FakeClock(), failures=0))  # the name is free again
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)


async def test_a_service_that_returns_is_restarted() -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock, jitter=lambda: 1.0)
    runs = 0

    async def service() -> None:
        nonlocal runs
        runs += 1

    task = supervisor.spawn("svc", service)
    try:
        await clock.advance(1.5)
        assert runs == 3  # at 0, 0.5 and 1.5
        status = supervisor.status("svc")
        assert status is not None
        assert status.last_error is not None
        assert "returned" in status.last_error
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_one_name_one_service() -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock)
    task = supervisor.spawn("svc", Flaky(clock, failures=0))
    try:
        with pytest.raises(ValueError, match="already supervised"):
            supervisor.spawn("svc", Flaky(clock, failures=0))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_cancel_all_stops_services_and_skips_missing_ones() -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock)
    tasks = [supervisor.spawn(f"svc{i}", Flaky(clock, failures=0)) for i in range(3)]
    await clock.settle()
    await cancel_all([*tasks, None])
    assert all(t.cancelled() for t in tasks)
    assert supervisor.statuses() == ()
