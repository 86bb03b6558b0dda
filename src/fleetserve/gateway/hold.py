"""Holding requests at the gateway while no replica of their model can take them.

Two cases hold, in one bounded FIFO queue per model:

- No replica is ready but one can come (scale from zero). A model can hold when the gateway
  was told it is autoscaled (its fleet-file entry has an `autoscale` section, or the
  composition root names it), or when a replica of it that joined the fleet after start-up is
  still starting (an actuator or discovery added it). Replicas present at start-up were probed
  before the gateway served its first request, so one that is still starting then is as likely
  down as booting: those models answer 503 at once, as before. The first request of a burst
  (queue empty -> not empty) calls the `on_demand` hook, which wakes the autoscaler.
- Every ready replica is at its `max_concurrency` (any model with a cap). The backlog waits
  here rather than inside the saturated engines, so a replica that turns ready takes queued
  requests at once, as Ray Serve queues at its proxy beyond `max_ongoing_requests`.

Release, oldest first: when a replica turns ready (a Fleet listener) and when a request on a
ready replica finishes (`freed`, called by the proxy). A capped replica's free slots are
granted to waiters one by one, the slot reserved (`Fleet.begin`) before the waiter runs, so
a request arriving meanwhile cannot take it; an uncapped replica that turns ready releases
every waiter to be routed as usual. A held request ends with a 503 (Retry-After) when the
queue is full or the wait bound passes; a client that disconnects leaves the queue at once
(its task is cancelled), handing back a slot granted to it. When the gateway shuts down,
`close()` answers every held request (and any later one) with 503 at once. Time comes from
the injected Clock, so tests run holds on a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fleetserve.clock import Clock
from fleetserve.config import HoldSettings
from fleetserve.errors import NoReplicaError
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.window import LoadWindow
from fleetserve.tenancy.fairness import FairQueue, Priority

log = logging.getLogger("fleetserve.gateway.hold")

DemandHook = Callable[[str], None]
"""Called with a model's name when requests start waiting for it. Must not block."""

Waiter = asyncio.Future[str | None]
"""Resolved with the id of a replica whose slot is reserved for the waiter, or None: route."""


class HoldTicker(Protocol):
    """Something a held request does now and then while it waits (SSE keep-alives)."""

    next_at: float  # clock time of the next tick; the ticker moves it on in tick()

    async def tick(self, held_s: float) -> None: ...


@dataclass(frozen=True, slots=True)
class Share:
    """Who a held request belongs to, for the release order (tenancy/fairness.py)."""

    tenant: str = ""
    weight: float = 1.0
    priority: Priority = Priority.STANDARD
    input_tokens: int = 0


ANONYMOUS = Share()  # auth none: one tenant, so release is oldest first


def at_capacity(replica: Replica) -> bool:
    cap = replica.max_concurrency
    return cap is not None and replica.in_flight >= cap


def burst_cap(cap: int, headroom: float) -> int:
    """The in-flight bound of a replica capped at `cap` for an interactive request: `cap`
    plus `headroom` of it, rounded, and at least one slot more when headroom is on."""
    if headroom <= 0:
        return cap
    return cap + max(1, round(cap * headroom))


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
        metrics.hold_capacity.set(settings.max_held)
        self.autoscaled = set(autoscaled or ())
        self.on_demand = on_demand
        self._retry = {"Retry-After": str(retry_after_s)}
        self._queues: dict[str, FairQueue[Waiter]] = {}
        self._closed: NoReplicaError | None = None  # shutting down: nothing is held any more
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

    def should_hold(self, model: str, tried: set[str] | frozenset[str] = frozenset()) -> bool:
        """No replica of `model` can take a request now, and one can: none is ready and one
        can come, or every ready one is at its concurrency cap (finishing requests free it).

        A retry (`tried`: the replicas it failed on) holds only for a ready replica it has not
        tried that is at its cap: it waits for a slot there rather than fail while one will
        free, and does not wait for the replicas that just failed it."""
        ready = [r for r in self.fleet.replicas(model) if r.state is ReplicaState.READY]
        if tried:
            untried = [r for r in ready if r.id not in tried]
            return bool(untried) and all(at_capacity(r) for r in untried)
        if ready:
            return all(at_capacity(r) for r in ready)
        return self.can_hold(model)

    def held(self, model: str) -> int:
        queue = self._queues.get(model)
        return len(queue) if queue else 0

    # -- holding ----------------------------------------------------------------------------
    async def hold(
        self,
        model: str,
        started: float,
        ticker: HoldTicker | None = None,
        share: Share = ANONYMOUS,
    ) -> str | None:
        """Wait until a replica of `model` can take the request; NoReplicaError if the queue is
        full or the wait passes its bound.

        Returns the id of a replica whose slot was reserved for this request (the caller sends
        there and calls `Fleet.end` after), or None: route as usual. `started` is when this
        request first began to wait: the bound covers all its waits. Waiters are released
        by priority class, then fair share across tenants (`share`; VTC), oldest first within
        a tenant.
        """
        if self._closed is not None:
            raise self._closed
        queue = self._queues.get(model)
        if queue is None:
            queue = self._queues[model] = FairQueue()
        ready = self._has_ready(model)
        if len(queue) >= self.settings.max_held:
            why = (
                "all its ready replicas are at their concurrency limit"
                if ready
                else "it has no ready replica"
            )
            raise NoReplicaError(
                f"model {model!r}: {why} and {len(queue)} requests already wait "
                f"(the limit); retry later",
                code="hold_queue_full",
                headers=self._retry,
            )
        waiter: Waiter = asyncio.get_running_loop().create_future()
        queue.push(
            waiter, share.tenant, now=self.clock.now(), weight=share.weight,
            priority=share.priority, input_tokens=share.input_tokens,
        )  # fmt: skip
        self.window.hold_started(model, self.clock.now())
        counted = self.metrics.of(model)
        counted.held += 1
        if len(queue) == 1 and not ready:
            self._wake(model)
        try:
            await self._wait(waiter, model, started + self.settings.timeout_s, started, ticker)
        except BaseException:
            self._hand_back(waiter)
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            queue.remove(waiter)
            self.window.hold_ended(model, self.clock.now())
            counted.held -= 1
        return waiter.result()

    async def _wait(
        self,
        waiter: Waiter,
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

    def _has_ready(self, model: str) -> bool:
        return any(r.state is ReplicaState.READY for r in self.fleet.replicas(model))

    def _timed_out(self, model: str, waited_s: float) -> NoReplicaError:
        replicas = self.fleet.replicas(model)
        ready = [r for r in replicas if r.state is ReplicaState.READY]
        if ready:
            caps = sorted({r.max_concurrency for r in ready if r.max_concurrency is not None})
            each = "/".join(str(c) for c in caps) or "?"
            which = "the ready replica" if len(ready) == 1 else f"all {len(ready)} ready replicas"
            return NoReplicaError(
                f"{which} of model {model!r} stayed at the concurrency limit ({each} in "
                f"flight each) for {waited_s:.0f} s; retry later",
                code="replicas_at_capacity",
                headers=self._retry,
            )
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

    def _hand_back(self, waiter: Waiter) -> None:
        """A waiter granted a slot that will not use it (cancelled, failed): pass it on."""
        if not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
            return
        replica_id = waiter.result()
        if replica_id is not None:
            self.fleet.end(replica_id)
            replica = self.fleet.get(replica_id)
            if replica is not None:
                self.freed(replica_id, replica.model)

    # -- release ----------------------------------------------------------------------------
    def _on_change(self, replica: Replica) -> None:
        if replica.state is ReplicaState.READY and self.fleet.get(replica.id) is not None:
            queue = self._queues.get(replica.model)
            if queue:
                self._grant(replica, queue)

    def freed(self, replica_id: str, model: str) -> None:
        """A request on `replica_id` finished: its slot goes to the oldest waiter, if any.

        On the hot path after every request: O(1) while nothing waits for `model`.
        """
        queue = self._queues.get(model)
        if not queue:
            return
        replica = self.fleet.get(replica_id)
        if replica is not None and replica.state is ReplicaState.READY:
            self._grant(replica, queue)

    def charge(self, model: str, tenant: str, tokens: int) -> None:
        """`tokens` of output streamed to `tenant`: service counted in the fair order."""
        queue = self._queues.get(model)
        if queue is not None:
            queue.charge(tenant, tokens)

    def _grant(self, replica: Replica, queue: FairQueue[Waiter]) -> None:
        if replica.max_concurrency is None:
            self.release(replica.model)
            return
        now = self.clock.now()
        cap = replica.max_concurrency
        interactive = burst_cap(cap, self.settings.interactive_headroom)
        while queue:
            # An interactive request at the head of the queue may take a headroom slot.
            bound = interactive if queue.next_priority(now) is Priority.INTERACTIVE else cap
            if replica.in_flight >= bound:
                break
            waiter = queue.release(now)
            if waiter is not None and not waiter.done():
                self.fleet.begin(replica.id)
                waiter.set_result(replica.id)

    def close(self, error: NoReplicaError) -> int:
        """Answer every held request with `error` now, and every later one (shutdown).

        Returns how many were waiting."""
        self._closed = error
        answered = 0
        now = self.clock.now()
        for queue in self._queues.values():
            while queue:
                waiter = queue.release(now)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(error)
                    answered += 1
        return answered

    def release(self, model: str) -> int:
        """Wake every request held for `model`, oldest first, to be routed; returns how many."""
        queue = self._queues.get(model)
        released = 0
        now = self.clock.now()
        while queue:
            waiter = queue.release(now)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
                released += 1
        return released
