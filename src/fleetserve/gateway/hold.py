"""Holding requests while their model has no ready replica but can get one (scale from zero).

A model can hold when the gateway was told it is autoscaled (its fleet-file entry has an
`autoscale` section, or the composition root names it), or when a replica of it that joined
the fleet after start-up is still starting (an actuator or discovery added it). Replicas
present at start-up were probed before the gateway served its first request, so one that is
still starting then is as likely down as booting: those models answer 503 at once, as before.

Each model has a bounded FIFO queue. The first request of a burst (queue empty -> not empty)
calls the `on_demand` hook, which wakes the autoscaler. When any replica of the model turns
ready (a Fleet listener), every held request of that model is released in arrival order and
routed as usual. A held request ends with a 503 (Retry-After) when the queue is full or the
wait bound passes; a client that disconnects leaves the queue at once (its task is
cancelled). Time comes from the injected Clock, so tests run holds on a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from fleetserve.clock import Clock
from fleetserve.config import HoldSettings
from fleetserve.errors import NoReplicaError
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.window import LoadWindow

log = logging.getLogger("fleetserve.gateway.hold")

DemandHook = Callable[[str], None]
"""Called with a model's name when requests start waiting for it. Must not block."""


class HoldTicker(Protocol):
    """Something a held request does now and then while it waits (SSE keep-alives)."""

    next_at: float  # clock time of the next tick; the ticker moves it on in tick()

    async def tick(self, held_s: float) -> None: ...


class HoldQueue:
    def __init__(
        self,
        fleet: Fleet,
        settings: HoldSettings,
        clock: Clock,
        window: LoadWindow,
        metrics: GatewayMetrics,
        *,
        retry_after_s: int,
        autoscaled: set[str] | None = None,
        on_demand: DemandHook | None = None,
    ) -> None:
        self.fleet = fleet
        self.settings = settings
        self.clock = clock
        self.window = window
        self.metrics = metrics
        self.autoscaled = set(autoscaled or ())
        self.on_demand = on_demand
        self._retry = {"Retry-After": str(retry_after_s)}
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self._boot_ids = frozenset(r.id for r in fleet.replicas())
        fleet.subscribe(self._on_change)

    # -- what can hold ----------------------------------------------------------------------
    def can_hold(self, model: str) -> bool:
        """The model can get a ready replica: autoscaled, or a runtime-added one is starting."""
        if model in self.autoscaled:
            return True
        return any(
            r.state is ReplicaState.STARTING and r.id not in self._boot_ids
            for r in self.fleet.replicas(model)
        )

    def should_hold(self, model: str) -> bool:
        """No replica of `model` is ready, and one can come."""
        replicas = self.fleet.replicas(model)
        if any(r.state is ReplicaState.READY for r in replicas):
            return False
        return self.can_hold(model)

    def held(self, model: str) -> int:
        queue = self._queues.get(model)
        return len(queue) if queue else 0

    def held_by_model(self) -> dict[str, int]:
        return {model: len(q) for model, q in self._queues.items()}

    # -- holding ----------------------------------------------------------------------------
    async def hold(self, model: str, started: float, ticker: HoldTicker | None = None) -> None:
        """Wait until a replica of `model` is ready; NoReplicaError if full or past the bound.

        `started` is when this request first began to wait: the bound covers all its waits.
        """
        queue = self._queues.setdefault(model, deque())
        if len(queue) >= self.settings.max_held:
            raise NoReplicaError(
                f"model {model!r} has no ready replica and {len(queue)} requests already wait "
                f"for one (the limit); retry later",
                code="hold_queue_full",
                headers=self._retry,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(waiter)
        entered = self.clock.now()
        self.window.hold_started(model, entered)
        gauge = self.metrics.held.labels(model)
        gauge.inc()
        if len(queue) == 1:
            self._wake(model)
        try:
            await self._wait(waiter, model, started + self.settings.timeout_s, started, ticker)
        finally:
            if not waiter.done():
                waiter.cancel()
                queue.remove(waiter)
            now = self.clock.now()
            self.window.hold_ended(model, now)
            gauge.dec()
            self.metrics.hold.labels(model).observe(now - entered)

    async def _wait(
        self,
        waiter: asyncio.Future[None],
        model: str,
        deadline: float,
        started: float,
        ticker: HoldTicker | None,
    ) -> None:
        while not waiter.done():
            now = self.clock.now()
            if now >= deadline:
                raise self._timed_out(model, now - started)
            if ticker is not None and now >= ticker.next_at:
                await ticker.tick(now - started)
                continue
            until = deadline if ticker is None else min(deadline, ticker.next_at)
            sleeper = asyncio.ensure_future(self.clock.sleep(until - now))
            try:
                await asyncio.wait((waiter, sleeper), return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()

    def _timed_out(self, model: str, waited_s: float) -> NoReplicaError:
        counts = self.fleet.count_by_state(model)
        states = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n) or "no replicas"
        return NoReplicaError(
            f"no replica of model {model!r} became ready within {waited_s:.0f} s "
            f"(now: {states}); retry later",
            code="no_replica_ready",
            headers=self._retry,
        )

    def _wake(self, model: str) -> None:
        if self.on_demand is None:
            return
        try:
            self.on_demand(model)
        except Exception:  # a broken hook must not fail the request it was called for
            log.exception("on_demand hook failed for model %r", model)

    # -- release ----------------------------------------------------------------------------
    def _on_change(self, replica: Replica) -> None:
        if replica.state is ReplicaState.READY and self.fleet.get(replica.id) is not None:
            self.release(replica.model)

    def release(self, model: str) -> int:
        """Wake every request held for `model`, oldest first; returns how many."""
        queue = self._queues.get(model)
        released = 0
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                released += 1
        return released
