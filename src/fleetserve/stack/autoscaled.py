"""An autoscaled local fleet (`fleetserve up --replicas MIN:MAX`).

With one gateway worker, the local actuator and the autoscaler loop run in the gateway's
process and read its Fleet and load window directly. With `--workers N` they run in the
parent process that supervises the workers (gateway/workers.py): the workers follow the
parent's replica set and report their load, which the autoscaler observes merged
(gateway/peers.py), so it sees the whole gateway's load, not one worker's share.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from fleetserve.autoscale.decision import NO_SIGNAL, Decision, Direction
from fleetserve.autoscale.loop import AutoscaleLoop
from fleetserve.autoscale.observers import FleetObserver, GatewayFigures
from fleetserve.autoscale.recommendations import SIGNALS
from fleetserve.clock import RealClock
from fleetserve.config import (
    DRAIN_GRACE_S,
    READY_TIMEOUT_S,
    AutoscaleSettings,
    EngineName,
    FleetFile,
    GatewaySettings,
    ModelSpec,
    PickerName,
    PriceSpec,
)
from fleetserve.engines.adapter import EngineAdapter
from fleetserve.errors import EngineError
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.local import LocalActuator, LocalActuatorSettings
from fleetserve.gateway.app import build_gateway, fleet_for
from fleetserve.gateway.asgi import GatewayApp
from fleetserve.gateway.monitor import FleetMonitor
from fleetserve.gateway.peers import ParentLink
from fleetserve.gateway.serve import serve_app
from fleetserve.gateway.workers import new_run_dir, run_workers
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.stack.launcher import AdapterLauncher
from fleetserve.supervisor import Supervisor
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.window import LoadWindow


@dataclass(frozen=True)
class AutoscaledStackSpec:
    adapter: EngineAdapter
    model: str
    options: dict[str, str]
    engine_name: EngineName
    picker: PickerName
    autoscale: AutoscaleSettings
    ready_timeout_s: float = READY_TIMEOUT_S
    drain_grace_s: float = DRAIN_GRACE_S
    # In flight per replica; the gateway queues the rest, so new replicas take the backlog.
    max_concurrency: int | None = None
    pricing: PriceSpec | None = None  # the fleet file's, for tenants' costs and budgets


class _StartFleet:
    """Starts the floor of replicas with the gateway and stops every replica with it.

    Runs as the gateway's first background service, so the autoscaler loop (the next one)
    starts from a fleet that is already up; `up` fails at start, with the engine's log, when
    the first replicas cannot start.
    """

    def __init__(self, actuator: LocalActuator, fleet: Fleet, spec: AutoscaledStackSpec) -> None:
        self.actuator = actuator
        self.fleet = fleet
        self.spec = spec

    async def start(self) -> None:
        floor = self.spec.autoscale.min_replicas
        if floor == 0:
            return
        await self.actuator.set_replicas(floor)
        deadline = time.monotonic() + self.spec.ready_timeout_s
        while self.fleet.count_by_state(self.spec.model)[ReplicaState.READY] < floor:
            status = await self.actuator.describe()
            if status.exits:
                failed = status.exits[-1]
                await self.actuator.close()
                raise EngineError(
                    f"{failed.id} {failed.reason} while starting; last lines of its log:\n"
                    f"{failed.log_tail}"
                )
            if time.monotonic() > deadline:
                await self.actuator.close()
                raise EngineError(
                    f"{floor} replica(s) were not ready after {self.spec.ready_timeout_s:g}s"
                )
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.actuator.close()


class _Announce:
    """Calls `on_ready` once the gateway's port accepts connections (after the lifespan)."""

    def __init__(self, host: str, port: int, on_ready: Callable[[], None]) -> None:
        self.host, self.port, self.on_ready = host, port, on_ready
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._wait())

    async def _wait(self) -> None:
        for _ in range(500):  # 10 s at most
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            self.on_ready()
            return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _local_actuator(
    spec: AutoscaledStackSpec,
    fleet: Fleet,
    clock: RealClock,
    supervisor: Supervisor,
    log_dir: Path | None = None,
) -> LocalActuator:
    """Engine processes of the spec's model on this machine, kept in `fleet`."""
    return LocalActuator(
        fleet,
        AdapterLauncher(spec.adapter, spec.model, spec.options),
        clock,
        LocalActuatorSettings(
            model=spec.model,
            log_dir=log_dir or Path(tempfile.mkdtemp(prefix="fleetserve-up-")),
            ready_timeout_s=spec.ready_timeout_s,
            drain_grace_s=spec.drain_grace_s,
            max_concurrency=spec.max_concurrency,
        ),
        supervisor,
    )


def _figures_of(window_at: Callable[[float], LoadWindow]) -> Callable[[str, float], GatewayFigures]:
    """What the autoscaler observes of the gateway, from the load window `window_at(now)`
    gives: the gateway's own, or its workers' merged."""

    def figures(model: str, now: float) -> GatewayFigures:
        load = window_at(now).snapshot(model, now)
        return GatewayFigures(
            held=load.held,
            ttft_p95_s=load.ttft_p95_s,
            arrival_rps=load.arrival_rps,
            arrival_tps=load.demand_tps,
        )

    return figures


def build_autoscaled_gateway(
    spec: AutoscaledStackSpec,
    settings: GatewaySettings,
    on_ready: Callable[[], None] = lambda: None,
    log_dir: Path | None = None,
) -> GatewayApp:
    """The gateway with a local actuator and the autoscaler loop in its process."""
    clock = RealClock()
    supervisor = Supervisor(clock)  # the loop, the watcher, the monitor: one /ready view
    fleet = fleet_for(settings)
    window = LoadWindow(settings.load_window_s)
    actuator = _local_actuator(spec, fleet, clock, supervisor, log_dir)
    observer = FleetObserver(fleet, spec.model, _figures_of(lambda _now: window))
    loop = AutoscaleLoop(
        spec.model, observer, actuator, spec.autoscale, clock, supervisor=supervisor
    )
    model = ModelSpec(
        name=spec.model,
        engine=spec.engine_name,
        picker=spec.picker,
        autoscale=spec.autoscale,
        max_concurrency=spec.max_concurrency,
        pricing=spec.pricing,
    )
    app = build_gateway(
        settings,
        FleetFile(models=[model]),
        clock,
        fleet=fleet,
        window=window,
        services=[
            _StartFleet(actuator, fleet, spec),
            loop,
            _Announce(settings.host, settings.port, on_ready),
        ],
        on_demand=lambda _model: loop.wake(),
        admin_views={"autoscaler": loop.view},
        supervisor=supervisor,
    )
    # The gateway's metrics exist once it is built; the loop only decides after it starts.
    loop.on_decision = functools.partial(_count_decision, app.metrics, spec)
    app.metrics.start_decisions(spec.model, [d.value for d in Direction], [*SIGNALS, NO_SIGNAL])
    app.metrics.set_desired_replicas(spec.model, spec.autoscale.min_replicas,
                                     spec.autoscale.max_replicas)  # fmt: skip
    return app


def _count_decision(metrics: GatewayMetrics, spec: AutoscaledStackSpec, decision: Decision) -> None:
    metrics.set_desired_replicas(spec.model, decision.desired, spec.autoscale.max_replicas)
    metrics.decided(spec.model, decision.direction.value, decision.signal)


def run_autoscaled_stack(
    spec: AutoscaledStackSpec,
    settings: GatewaySettings,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Serve the gateway with the autoscaler until SIGINT/SIGTERM; every replica is stopped."""
    if settings.workers > 1:
        run_autoscaled_workers(spec, settings, on_ready)
        return
    serve_app(build_autoscaled_gateway(spec, settings, on_ready), settings)


class _AnnounceWhenServing:
    """Calls `on_ready` once a gateway worker answers /health (the parent bound the port
    before the workers started, so an accepted connection proves nothing)."""

    def __init__(self, url: str, on_ready: Callable[[], None], clock: RealClock) -> None:
        self.url, self.on_ready, self.clock = url, on_ready, clock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._wait())

    async def _wait(self) -> None:
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(1200):  # a minute at most
                try:
                    async with http.get(self.url + "/health") as response:
                        if response.status == 200:
                            self.on_ready()
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await self.clock.sleep(0.05)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def run_autoscaled_workers(
    spec: AutoscaledStackSpec,
    settings: GatewaySettings,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """`up --replicas MIN:MAX --workers N`: the actuator, health checks and autoscaler in this
    (the parent) process, N gateway workers on the port. Blocks until SIGINT/SIGTERM."""
    clock = RealClock()
    supervisor = Supervisor(clock)
    run = new_run_dir()
    fleet = fleet_for(settings)  # the actuator's replicas: what the workers follow
    actuator = _local_actuator(spec, fleet, clock, supervisor)
    # Engine signals (running, waiting, KV use) for the policy, and health, as a gateway has.
    monitor = FleetMonitor(
        fleet, settings.health, clock, {spec.model: spec.adapter.parse_signals}, supervisor
    )
    loop: AutoscaleLoop | None = None

    def view() -> dict[str, object]:
        return loop.view() if loop is not None else {}

    link = ParentLink(run, fleet, spec.model, clock, settings.load_window_s, view, supervisor)

    observer = FleetObserver(fleet, spec.model, _figures_of(link.load))
    loop = AutoscaleLoop(
        spec.model, observer, actuator, spec.autoscale, clock,
        supervisor=supervisor, on_decision=lambda _decision: link.step(),
    )  # fmt: skip
    model = ModelSpec(
        name=spec.model,
        engine=spec.engine_name,
        picker=spec.picker,
        autoscale=spec.autoscale,
        max_concurrency=spec.max_concurrency,
        pricing=spec.pricing,
    )
    url = f"http://{settings.host}:{settings.port}"
    run_workers(
        settings,
        FleetFile(models=[model]),
        run=run,
        services=[
            monitor,
            link,
            _StartFleet(actuator, fleet, spec),
            loop,
            _AnnounceWhenServing(url, on_ready, clock),
        ],
        on_wake=loop.wake,
        follow=True,
    )
