"""FakeClock: virtual time that moves only when the test moves it."""

from __future__ import annotations

import asyncio

import pytest

from fleetserve.testing.clock import FakeClock


async def test_sleepers_wake_in_deadline_order_as_time_advances() -> None:
    clock = FakeClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [asyncio.create_task(sleeper("late", 5.0)), asyncio.create_task(sleeper("early", 1.0))]
    await clock.advance(0.5)
    assert woke == []
    await clock.advance(4.5)
    assert woke == [("early", 1.0), ("late", 5.0)]
    assert clock.now() == 5.0
    await asyncio.gather(*tasks)


async def test_a_task_that_sleeps_repeatedly_wakes_at_each_deadline() -> None:
    clock = FakeClock()
    ticks: list[float] = []

    async def ticker() -> None:
        for _ in range(3):
            await clock.sleep(0.25)
            ticks.append(clock.now())

    task = asyncio.create_task(ticker())
    await clock.advance(1.0)
    assert ticks == [0.25, 0.5, 0.75]
    await task


async def test_run_until_idle_stops_when_nobody_sleeps_and_is_bounded() -> None:
    clock = FakeClock(start=10.0, wall_start=1000.0)
    task = asyncio.create_task(clock.sleep(3.0))
    await clock.run_until_idle()
    assert clock.now() == 13.0
    assert clock.wall() == 1003.0
    await task

    async def forever() -> None:
        while True:
            await clock.sleep(1.0)

    endless = asyncio.create_task(forever())
    with pytest.raises(TimeoutError):
        await clock.run_until_idle(max_s=10.0)
    endless.cancel()
    await asyncio.gather(endless, return_exceptions=True)
    assert clock.sleepers == 0


async def test_time_does_not_go_backwards() -> None:
    with pytest.raises(ValueError, match="backwards"):
        await FakeClock().advance(-1.0)
