"""FakeClock: virtual time for tests of loops that sleep, finishing in milliseconds.

Semantics:

* `now()` starts at `start` (0.0 by default) and moves only when the test moves it;
  `wall()` is `wall_start + now()`.
* `await sleep(s)` with s > 0 parks the caller until virtual time reaches now + s; it never
  sleeps for real. `sleep(0)` (or less) just yields to the event loop once.
* `await advance(dt)` moves time forward by dt, stopping at each parked sleeper's deadline on
  the way: it sets the time to that deadline, wakes every sleeper due then (in the order they
  slept), and lets the event loop run until the woken tasks are parked again. So a task that
  sleeps repeatedly inside the window is woken at each of its deadlines, as on a real clock.
* `await run_until_idle()` keeps advancing to the next deadline until nobody sleeps (for
  example until an engine has finished all its requests and waits for more work). It is
  bounded by virtual time (`max_s`) and by a wake-up count.

Time never moves on its own: a test that awaits something that needs time must advance it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

DEFAULT_WALL_START = 1_700_000_000.0
# Event-loop turns granted to woken tasks before time moves on. A woken task needs one turn to
# run; tasks it wakes need one more each. Twenty covers every chain in fleetserve's loops.
SETTLE_TURNS = 20


class FakeClock:
    """A `fleetserve.clock.Clock` whose time moves only when told to."""

    def __init__(self, start: float = 0.0, wall_start: float = DEFAULT_WALL_START) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), waiter))
        await waiter

    @property
    def sleepers(self) -> int:
        """Tasks parked in sleep() right now."""
        return sum(1 for _, _, waiter in self._sleepers if not waiter.done())

    @property
    def next_deadline(self) -> float | None:
        self._drop_cancelled()
        return self._sleepers[0][0] if self._sleepers else None

    async def settle(self) -> None:
        """Let ready tasks run until they park again (a fixed number of loop turns)."""
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking sleepers at their deadlines on the way."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        target = self._now + seconds
        await self.settle()
        while (deadline := self.next_deadline) is not None and deadline <= target:
            self._wake_due(deadline)
            await self.settle()
        self._now = target
        await self.settle()

    async def run_until_idle(self, max_s: float = 3600.0, max_wakeups: int = 1_000_000) -> None:
        """Advance from deadline to deadline until no task sleeps.

        Raises TimeoutError if that takes more than `max_s` of virtual time or `max_wakeups`
        deadlines (a loop that never stops sleeping).
        """
        limit = self._now + max_s
        await self.settle()
        for _ in range(max_wakeups):
            deadline = self.next_deadline
            if deadline is None:
                return
            if deadline > limit:
                raise TimeoutError(f"still sleeping after {max_s} s of virtual time")
            self._wake_due(deadline)
            await self.settle()
        raise TimeoutError(f"still sleeping after {max_wakeups} wake-ups")

    def _wake_due(self, deadline: float) -> None:
        self._now = max(self._now, deadline)
        while self._sleepers and self._sleepers[0][0] <= deadline:
            _, _, waiter = heapq.heappop(self._sleepers)
            if not waiter.done():
                waiter.set_result(None)

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
