"""The autoscaler's control loop: observe, `decide`, actuate, every `period_s` or when woken.

The loop owns no policy: it gathers an `Observation` (from an `Observer`), calls the pure
`decide`, and hands the result to an `Actuator`. Every decision goes on a bounded timeline,
with its reason, for the admin API, `fleetserve status` and metrics. An observation or
actuation that fails is recorded on the timeline and the loop keeps going: a failed step
never scales (missing data is never read as "idle"). Any other error is the `Supervisor`'s:
it logs it and restarts the loop with backoff, and `/ready` and the metrics show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from fleetserve.autoscale.decision import AutoscaleState, Decision
from fleetserve.autoscale.observation import Observation
from fleetserve.autoscale.policy import decide
from fleetserve.autoscale.timeline import Timeline, TimelineEntry
from fleetserve.clock import Clock
from fleetserve.config import AutoscaleSettings
from fleetserve.errors import ActuatorError, FleetserveError
from fleetserve.fleet.actuators import Actuator, ActuatorStatus
from fleetserve.supervisor import Supervisor, cancel_all

log = logging.getLogger("fleetserve.autoscale")


class Observer(Protocol):
    async def observe(self, now: float, current: int) -> Observation:
        """The fleet and gateway at `now`; `current` is what the actuator reports.

        Raises a `FleetserveError` when the observation cannot be made (the step is skipped).
        """
        ...


DecisionListener = Callable[[Decision], None]
STATUS_REFRESH_S = 1.0


class AutoscaleLoop:
    """Runs one model's autoscaler; `start()`/`stop()` fit a gateway's background services."""

    def __init__(
        self,
        model: str,
        observer: Observer,
        actuator: Actuator,
        settings: AutoscaleSettings,
        clock: Clock,
        *,
        on_decision: DecisionListener | None = None,
        timeline: Timeline | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.model = model
        self.observer = observer
        self.actuator = actuator
        self.settings = settings
        self.clock = clock
        self.timeline = timeline or Timeline()
        self.on_decision = on_decision  # told of every decision (metrics)
        self.supervisor = supervisor or Supervisor(clock)
        self._state = AutoscaleState()
        self._applied: int | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._status_task: asyncio.Task[None] | None = None
        self.actuator_status: ActuatorStatus | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = self.supervisor.spawn(f"autoscaler/{self.model}", self._run)
            self._status_task = self.supervisor.spawn(
                f"autoscaler-status/{self.model}", self._refresh_status
            )

    async def stop(self) -> None:
        tasks = (self._task, self._status_task)
        self._task = self._status_task = None
        await cancel_all(tasks)

    async def _refresh_status(self) -> None:
        """Keep the actuator's status (replica states, cold starts) fresh between decisions."""
        while True:
            await self.clock.sleep(STATUS_REFRESH_S)
            with contextlib.suppress(ActuatorError):
                self.actuator_status = await self.actuator.describe()

    def wake(self) -> None:
        """Decide now rather than at the next period (the gateway holds a request)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self.step()
            await self._wait_period()

    async def _wait_period(self) -> None:
        if self._wake.is_set():
            self._wake.clear()
            return
        sleeper = asyncio.ensure_future(self.clock.sleep(self.settings.period_s))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pending in (sleeper, waker):
                pending.cancel()
            self._wake.clear()

    # -- one step -----------------------------------------------------------------------
    async def step(self) -> Decision | None:
        """Observe, decide and actuate once; returns the decision (None when the step failed)."""
        now = self.clock.now()
        try:
            current = await self.actuator.current()
            observation = await self.observer.observe(now, current)
        except FleetserveError as exc:
            self._record_failure(now, f"observation failed: {exc}")
            return None
        decision, self._state = decide(observation, self._state, self.settings)
        error = None
        if decision.desired != self._applied or decision.desired != decision.current:
            try:
                await self.actuator.set_replicas(decision.desired)
                self._applied = decision.desired
            except ActuatorError as exc:
                error = f"actuation failed: {exc}"
                log.warning("autoscaler %s: %s", self.model, error)
        with contextlib.suppress(ActuatorError):
            self.actuator_status = await self.actuator.describe()
        self.timeline.add(TimelineEntry.of(decision, observation, self.clock.wall(), error))
        if self.on_decision is not None:
            self.on_decision(decision)
        return decision

    def _record_failure(self, now: float, message: str) -> None:
        log.warning("autoscaler %s: %s", self.model, message)
        self.timeline.add(TimelineEntry.failed(now, self.clock.wall(), message))

    # -- views --------------------------------------------------------------------------
    def view(self) -> dict[str, object]:
        """Plain JSON data for `/admin/autoscaler` and `fleetserve status`."""
        status = self.actuator_status
        return {
            "model": self.model,
            "settings": self.settings.model_dump(mode="json"),
            "desired": self._state.desired,
            **self.timeline.view(self.clock.now()),
            "actuator": None if status is None else _status_view(status, self.clock.now()),
        }


def _status_view(status: ActuatorStatus, now: float) -> dict[str, object]:
    return {
        "kind": status.kind,
        "target": status.target,
        "desired": status.desired,
        "current": status.current,
        "observed": status.observed,
        "cold_starts_s": [round(s, 3) for s in status.cold_starts_s],
        "replicas": [
            {
                "id": r.id,
                "state": r.state.value,
                "for_s": round(now - r.since, 3),
                "cold_start_s": None if r.cold_start_s is None else round(r.cold_start_s, 3),
                "in_flight": r.in_flight,
                "pid": r.pid,
                "url": r.url,
            }
            for r in status.replicas
        ],
        "exits": [
            {
                "id": e.id,
                "at_s_ago": round(now - e.at, 3),
                "reason": e.reason,
                "while_starting": e.while_starting,
            }
            for e in status.exits
        ],
    }
