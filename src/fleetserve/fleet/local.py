"""LocalActuator: engine replicas of one model as processes on this machine, kept in the Fleet.

Scale up launches an engine in its own process group (log in `log_dir/NAME.log`), adds it to
the Fleet as starting at once, and polls its health path every `ready_poll_s`; the moment it
answers, the Fleet marks it ready (so the gateway routes to it) and the launch -> ready time
is kept as its cold start. An engine that exits while starting, or is not ready within
`ready_timeout_s`, leaves the Fleet and its log tail is kept for status.

Scale down drains: the Fleet stops routing to the victim at once, its in-flight requests
get up to `drain_grace_s` to finish, then its process group is stopped by PID and it leaves
the Fleet. Drains run as tasks, so scaling down never blocks scaling up. A replica that dies
on its own is noticed by `current()`, `describe()`, `set_replicas()` and a watcher task, and
leaves the Fleet, so the policy replaces it. `close()` stops everything by PID.

How to launch an engine comes in as an `EngineLauncher` (fleet does not import engines);
the composition root builds one from an `EngineAdapter` (`fleetserve.stack.AdapterLauncher`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fleetserve.clock import Clock
from fleetserve.config import DRAIN_GRACE_S, READY_TIMEOUT_S
from fleetserve.errors import ActuatorError
from fleetserve.fleet.actuators import (
    ActuatorStatus,
    ReplicaExit,
    ReplicaStatus,
    VictimCandidate,
    choose_victims,
)
from fleetserve.fleet.discovery import replica_id
from fleetserve.fleet.engine_process import EngineProcess, HttpProbe, launch, replicas_that_fit
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.processes import LOOPBACK, STOP_GRACE_S, free_port
from fleetserve.fleet.replica import Replica
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.supervisor import Supervisor

log = logging.getLogger("fleetserve.fleet.local")

KEPT = 50  # cold starts and exits remembered for status
PORT_TRIES = 20


class EngineLauncher(Protocol):
    """How to run one engine replica of a model on host:port, and where it says it is ready."""

    @property
    def health_path(self) -> str: ...

    def command(self, host: str, port: int) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class LocalActuatorSettings:
    model: str
    log_dir: Path
    host: str = LOOPBACK
    ready_timeout_s: float = READY_TIMEOUT_S
    ready_poll_s: float = 0.05
    probe_timeout_s: float = 1.0
    drain_grace_s: float = DRAIN_GRACE_S
    drain_poll_s: float = 0.05
    stop_grace_s: float = STOP_GRACE_S
    watch_interval_s: float = 0.25
    max_concurrency: int | None = None  # per replica, as the Fleet's Replica takes it
    name_prefix: str = "replica"
    check_memory: bool = True  # refuse replicas that the free memory cannot hold


@dataclass(eq=False)
class _Owned:
    id: str
    engine: EngineProcess
    launched_at: float
    ready_at: float | None = None
    draining: bool = False
    stopping: bool = False  # this actuator is stopping the process; its exit is expected
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class LocalActuator:
    def __init__(
        self,
        fleet: Fleet,
        launcher: EngineLauncher,
        clock: Clock,
        settings: LocalActuatorSettings,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.fleet = fleet
        self.launcher = launcher
        self.clock = clock
        self.settings = settings
        self.supervisor = supervisor or Supervisor(clock)
        self._probe = HttpProbe(settings.probe_timeout_s)
        self._owned: dict[str, _Owned] = {}
        self._names = itertools.count()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._cold_starts: deque[float] = deque(maxlen=KEPT)
        self._exits: deque[ReplicaExit] = deque(maxlen=KEPT)
        self._desired: int | None = None
        self._closed = False
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        fleet.declare_model(settings.model)

    # -- the Actuator protocol ----------------------------------------------------------
    async def set_replicas(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"replicas must be >= 0, not {n}")
        if self._closed:
            raise ActuatorError(f"the local actuator of model {self.settings.model} is closed")
        async with self._lock:
            self._desired = n
            self._reap()
            if self._watcher is None:
                name = f"local-actuator-watch/{self.settings.model}"
                self._watcher = self.supervisor.spawn(name, self._watch)
            active = self._active()
            if n > len(active):
                self._scale_up(n - len(active), active)
            elif n < len(active):
                self._scale_down(active, len(active) - n)

    async def current(self) -> int:
        self._reap()
        return len(self._active())

    async def describe(self) -> ActuatorStatus:
        self._reap()
        replicas = []
        for owned in self._owned.values():
            replica = self.fleet.get(owned.id)
            state = replica.state if replica is not None else ReplicaState.STARTING
            replicas.append(
                ReplicaStatus(
                    id=owned.id,
                    state=ReplicaState.DRAINING if owned.draining else state,
                    since=replica.state_since if replica is not None else owned.launched_at,
                    launched_at=owned.launched_at,
                    cold_start_s=None
                    if owned.ready_at is None
                    else owned.ready_at - owned.launched_at,
                    in_flight=replica.in_flight if replica is not None else 0,
                    pid=owned.engine.pid,
                    url=owned.engine.url,
                )
            )
        return ActuatorStatus(
            kind="local",
            target=f"model {self.settings.model}",
            desired=self._desired,
            current=await self.current(),
            replicas=tuple(replicas),
            cold_starts_s=tuple(self._cold_starts),
            exits=tuple(self._exits),
        )

    async def close(self) -> None:
        """Stop every replica process by PID (no drain) and take them out of the Fleet."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        for owned in self._owned.values():
            if owned.task is not None and not owned.stopping:
                owned.task.cancel()  # a stop already under way is let finish
        await asyncio.gather(*self._tasks, *filter(None, [self._watcher]), return_exceptions=True)
        remaining = list(self._owned.values())
        for owned in remaining:
            owned.stopping = True
        await asyncio.gather(
            *(asyncio.to_thread(o.engine.stop, self.settings.stop_grace_s) for o in remaining)
        )
        for owned in remaining:
            self._forget(owned)
        await self._probe.close()

    # -- scaling ----------------------------------------------------------------------------
    def _active(self) -> list[_Owned]:
        """Replicas counting toward capacity (one being stopped after a failed start is not)."""
        return [o for o in self._owned.values() if not o.draining and not o.stopping]

    def _scale_up(self, count: int, active: list[_Owned]) -> None:
        allowed, why = count, ""
        sample = next((o for o in active if o.ready_at is not None), None)
        if self.settings.check_memory and sample is not None:
            starting = sum(1 for o in active if o.ready_at is None)
            fit, why = replicas_that_fit(sample.engine.pid, count + starting)
            allowed = max(0, min(count, fit - starting))
        for _ in range(allowed):
            self._launch()
        if allowed < count:
            raise ActuatorError(
                f"started {allowed} of {count} more replicas of model {self.settings.model}: {why}"
            )

    def _launch(self) -> None:
        settings = self.settings
        port = self._free_port()
        url = f"http://{settings.host}:{port}"
        name = f"{settings.name_prefix}-{next(self._names)}"
        command = self.launcher.command(settings.host, port)
        try:
            engine = launch(command, url, name, settings.log_dir)
        except OSError as exc:
            raise ActuatorError(
                f"cannot start {name} of model {settings.model} ({command[0]}): {exc}"
            ) from exc
        now = self.clock.now()
        owned = _Owned(replica_id(url), engine, now)
        self._owned[owned.id] = owned
        self.fleet.add(
            Replica(
                id=owned.id,
                url=url,
                model=settings.model,
                max_concurrency=settings.max_concurrency,
                state_since=now,
                name=name,
            )
        )
        owned.task = self._spawn(self._await_ready(owned))
        log.info("launched %s (pid %d) at %s", name, engine.pid, url)

    def _free_port(self) -> int:
        """A free port whose replica id is not taken: a draining replica that has closed its
        socket but not yet exited still holds its id in the Fleet."""
        for _ in range(PORT_TRIES):
            port = free_port(self.settings.host)
            if self.fleet.get(replica_id(f"http://{self.settings.host}:{port}")) is None:
                return port
        raise ActuatorError(f"no free port for a replica of model {self.settings.model}")

    def _scale_down(self, active: list[_Owned], count: int) -> None:
        now = self.clock.now()
        candidates = []
        for owned in active:
            replica = self.fleet.get(owned.id)
            state = replica.state if replica is not None else ReplicaState.STARTING
            in_flight = replica.in_flight if replica is not None else 0
            candidates.append(VictimCandidate(owned.id, state, in_flight, owned.launched_at))
        for victim in choose_victims(candidates, count):
            owned = self._owned[victim]
            if owned.task is not None:
                owned.task.cancel()  # a starting replica stops waiting to become ready
            owned.draining = True
            self.fleet.drain(owned.id, now)  # no new requests route there from now on
            owned.task = self._spawn(self._drain(owned, now + self.settings.drain_grace_s))

    async def _await_ready(self, owned: _Owned) -> None:
        settings = self.settings
        health_url = owned.engine.url + self.launcher.health_path
        deadline = owned.launched_at + settings.ready_timeout_s
        while True:
            code = owned.engine.process.poll()
            if code is not None:
                self._lost(owned, while_starting=True, reason=f"exited with code {code}")
                return
            if await self._probe.ok(health_url):
                now = self.clock.now()
                owned.ready_at = now
                self._cold_starts.append(now - owned.launched_at)
                self.fleet.probe_passed(owned.id, now)
                log.info("%s ready in %.2fs", owned.engine.name, now - owned.launched_at)
                return
            if self.clock.now() >= deadline:
                owned.stopping = True
                await asyncio.to_thread(owned.engine.stop, settings.stop_grace_s)
                reason = f"not ready after {settings.ready_timeout_s:g}s"
                self._lost(owned, while_starting=True, reason=reason)
                return
            await self.clock.sleep(settings.ready_poll_s)

    async def _drain(self, owned: _Owned, deadline: float) -> None:
        while self.clock.now() < deadline and owned.engine.process.poll() is None:
            replica = self.fleet.get(owned.id)
            if replica is None or replica.in_flight == 0:
                break
            await self.clock.sleep(self.settings.drain_poll_s)
        replica = self.fleet.get(owned.id)
        cut = replica.in_flight if replica is not None else 0
        owned.stopping = True
        await asyncio.to_thread(owned.engine.stop, self.settings.stop_grace_s)
        self._forget(owned)
        log.info("%s drained and stopped (%d requests still in flight cut)", owned.engine.name, cut)

    # -- crashes ----------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            await self.clock.sleep(self.settings.watch_interval_s)
            self._reap()

    def _reap(self) -> None:
        """Take replicas whose process died on its own out of the Fleet."""
        for owned in list(self._owned.values()):
            code = owned.engine.process.poll()
            if code is None or owned.stopping or owned.draining:
                continue  # a draining one's task sees the exit and finishes the stop
            if owned.task is not None and not owned.task.done():
                owned.task.cancel()
            starting = owned.ready_at is None
            self._lost(owned, while_starting=starting, reason=f"exited with code {code}")

    def _lost(self, owned: _Owned, *, while_starting: bool, reason: str) -> None:
        owned.engine.stop(0.0)  # the leader has exited: SIGKILL what is left of its group
        self._forget(owned)
        tail = owned.engine.log_tail()
        self._exits.append(ReplicaExit(owned.id, self.clock.now(), while_starting, reason, tail))
        log.warning("%s %s; last lines of %s:\n%s", owned.engine.name, reason,
                    owned.engine.log_path, tail)  # fmt: skip

    def _forget(self, owned: _Owned) -> None:
        self._owned.pop(owned.id, None)
        self.fleet.remove(owned.id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # One-shot tasks (a start, a drain): a failure is logged, not restarted (a second
        # drain of the same replica would be wrong); the crash watcher is supervised.
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("local actuator task failed", exc_info=exc)
