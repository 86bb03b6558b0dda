"""Supervisor: runs a background coroutine forever, restarting it when it fails.

A gateway's health checks, the autoscaler's loop and discovery's watch are loops meant never
to end. Each handles the errors it expects; this catches the rest, so one unexpected exception
does not stop autoscaling or health checking while the process looks alive. On a failure it
logs once with context (the traceback on the first failure of a streak, one line for each later
one), waits with a capped, jittered exponential backoff and runs the coroutine afresh. A run
that lasted `healthy_after_s` ends the streak: the next failure starts again at `base_s`.

Every service's state (running or restarting, restarts, last error, since when) is kept here
for `/ready` and the `fleetserve_service_*` metrics. Cancelling the task that runs a service
stops it at once, also during a backoff; `CancelledError` always propagates.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from fleetserve.clock import Clock

log = logging.getLogger("fleetserve.supervisor")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before the n-th consecutive retry: base * 2**(n-1), capped, with equal jitter
    (half fixed, half random), so many processes do not retry in step."""

    base_s: float = 0.5
    max_s: float = 30.0

    def delay_s(self, attempt: int, jitter_frac: float) -> float:
        ceiling = min(self.max_s, self.base_s * 2.0 ** max(attempt - 1, 0))
        return ceiling / 2 + ceiling / 2 * jitter_frac


class ServiceState(enum.Enum):
    RUNNING = "running"
    RESTARTING = "restarting"  # failed; waiting out the backoff before it runs again


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    name: str
    state: ServiceState
    restarts: int  # since the service was first started (a counter, never reset)
    last_error: str | None  # "ValueError: ..." of its latest failure
    since: float  # clock time it entered `state`

    def view(self) -> dict[str, object]:
        """What `/ready` shows of it."""
        return {"state": self.state.value, "restarts": self.restarts, "last_error": self.last_error}


Service = Callable[[], Awaitable[None]]
"""Starts one run of a service: a coroutine meant to run until cancelled."""

HEALTHY_AFTER_S = 60.0


class Supervisor:
    """Runs named services (`run`) and keeps their states (`statuses`) for others to read.

    One per process composition (a gateway worker, the remote autoscaler), shared by the
    services it reports on; a service stopped by cancellation leaves the registry.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        backoff: Backoff | None = None,
        healthy_after_s: float = HEALTHY_AFTER_S,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.clock = clock
        self.backoff = backoff or Backoff()
        self.healthy_after_s = healthy_after_s
        self.jitter = jitter
        self._statuses: dict[str, ServiceStatus] = {}
        self._claims: dict[str, object] = {}  # name -> the token of the run that holds it

    def statuses(self) -> tuple[ServiceStatus, ...]:
        return tuple(self._statuses.values())

    def status(self, name: str) -> ServiceStatus | None:
        return self._statuses.get(name)

    def view(self) -> dict[str, object]:
        """For `/ready`: `services` (each one's state) and `degraded` (those restarting)."""
        statuses = self.statuses()
        return {
            "services": {s.name: s.view() for s in statuses},
            "degraded": [s.name for s in statuses if s.state is ServiceState.RESTARTING],
        }

    def counts(self) -> list[tuple[str, bool, int]]:
        """For the `fleetserve_service_*` metrics: (service, running, restarts)."""
        return [(s.name, s.state is ServiceState.RUNNING, s.restarts) for s in self.statuses()]

    def spawn(self, name: str, service: Service) -> asyncio.Task[None]:
        """`run(name, service)` as a task named after the service; cancel it to stop it."""
        claim = self._claim(name)
        task = asyncio.create_task(self._supervise(name, service, claim), name=name)
        # A task cancelled before it ran never enters `_supervise`'s finally.
        task.add_done_callback(lambda _: self._release(name, claim))
        return task

    async def run(self, name: str, service: Service) -> None:
        """Run `service` again and again until cancelled; never returns otherwise."""
        await self._supervise(name, service, self._claim(name))

    def _claim(self, name: str) -> object:
        """Reserve `name` (refused while another service has it); the token releases it."""
        if name in self._statuses:
            raise ValueError(f"a service named {name!r} is already supervised")
        self._set(name, ServiceState.RUNNING, 0, None, self.clock.now())
        claim = self._claims[name] = object()
        return claim

    def _release(self, name: str, claim: object) -> None:
        if self._claims.get(name) is claim:
            del self._claims[name]
            self._statuses.pop(name, None)

    async def _supervise(self, name: str, service: Service, claim: object) -> None:
        streak = 0
        restarts = 0
        last_error: str | None = None
        try:
            while True:
                started = self.clock.now()
                self._set(name, ServiceState.RUNNING, restarts, last_error, started)
                try:
                    await service()
                    error = "returned, but it should run until cancelled"
                    failure: BaseException | None = None
                # The one place that catches every failure: it is logged with its traceback,
                # reported in /ready and the metrics, and the service restarted.
                except Exception as exc:  # noqa: BLE001
                    error = f"{type(exc).__name__}: {exc}"
                    failure = exc
                now = self.clock.now()
                if now - started >= self.healthy_after_s:
                    streak = 0
                streak += 1
                restarts += 1
                last_error = error
                delay_s = self.backoff.delay_s(streak, self.jitter())
                self._set(name, ServiceState.RESTARTING, restarts, last_error, now)
                if streak == 1:
                    log.error(
                        "service %s failed (%s); restarting in %.1fs",
                        name, error, delay_s, exc_info=failure,
                    )  # fmt: skip
                else:
                    log.warning(
                        "service %s failed again (%s); restart %d in a row, in %.1fs",
                        name, error, streak, delay_s,
                    )  # fmt: skip
                await self.clock.sleep(delay_s)
        finally:
            self._release(name, claim)

    def _set(
        self, name: str, state: ServiceState, restarts: int, error: str | None, since: float
    ) -> None:
        self._statuses[name] = ServiceStatus(name, state, restarts, error, since)


async def cancel_all(tasks: Iterable[asyncio.Task[None] | None]) -> None:
    """Cancel the tasks (services spawned here) and wait until each has ended. The caller's
    own cancellation still propagates (no `suppress(CancelledError)` around the wait)."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
