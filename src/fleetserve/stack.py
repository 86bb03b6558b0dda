"""The composition root for a local fleet: engine processes on this machine plus the gateway.

`fleetserve up` calls `run_local_stack`. It owns every process it starts and stops each by
PID (SIGTERM to its process group, SIGKILL after a grace period), also on errors and signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleetserve.autoscale.decision import Decision
from fleetserve.autoscale.loop import AutoscaleLoop
from fleetserve.autoscale.observers import FleetObserver, GatewayFigures, GatewayObserver
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
)
from fleetserve.engines.adapter import EngineAdapter, LaunchSpec
from fleetserve.errors import EngineError
from fleetserve.fleet.actuators import Actuator
from fleetserve.fleet.engine_process import EngineProcess, check_memory, launch, wait_ready
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.kubernetes import KubernetesActuator, KubernetesTarget
from fleetserve.fleet.local import LocalActuator, LocalActuatorSettings
from fleetserve.fleet.processes import LOOPBACK, free_port
from fleetserve.gateway.app import build_gateway, fleet_for
from fleetserve.gateway.asgi import GatewayApp
from fleetserve.gateway.serve import run_gateway, serve_app, terminate_as_interrupt
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.telemetry.window import LoadWindow


@dataclass(frozen=True)
class AdapterLauncher:
    """An `EngineAdapter` bound to one model and its options: the `fleet.local.EngineLauncher`
    that the local actuator launches replicas with (fleet does not import engines)."""

    adapter: EngineAdapter
    model: str
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def health_path(self) -> str:
        return self.adapter.health_path

    def command(self, host: str, port: int) -> list[str]:
        spec = LaunchSpec(self.model, port, host=host, options=dict(self.options))
        return self.adapter.launch_command(spec)


@dataclass(frozen=True)
class LocalStackSpec:
    adapter: EngineAdapter
    model: str
    replicas: int
    options: dict[str, str]
    engine_name: str
    picker: PickerName
    ready_timeout_s: float = READY_TIMEOUT_S


def run_local_stack(
    spec: LocalStackSpec,
    settings: GatewaySettings,
    say: Callable[[str], None],
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Start the engines, wait until each is ready, serve the gateway, stop all on exit."""
    engines: list[EngineProcess] = []
    launcher = AdapterLauncher(spec.adapter, spec.model, spec.options)
    log_dir = Path(tempfile.mkdtemp(prefix="fleetserve-up-"))

    def start(i: int) -> EngineProcess:
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        engine = launch(launcher.command(LOOPBACK, port), url, f"replica-{i}", log_dir)
        engines.append(engine)
        say(f"starting {engine.name} ({spec.engine_name}) at {engine.url}")
        return engine

    try:
        with terminate_as_interrupt():  # SIGTERM while engines start cleans up like Ctrl-C
            # The first replica alone: its measured memory tells whether the rest fit.
            first = start(0)
            waited = wait_ready(first, launcher.health_path, spec.ready_timeout_s)
            say(f"{first.name} ready in {waited:.1f}s")
            check_memory(first, spec.replicas - 1)
            rest = [start(i) for i in range(1, spec.replicas)]
            for engine in rest:
                waited = wait_ready(engine, launcher.health_path, spec.ready_timeout_s)
                say(f"{engine.name} ready in {waited:.1f}s")
        model = ModelSpec(
            name=spec.model,
            replicas=[e.url for e in engines],
            engine=spec.engine_name,
            picker=spec.picker,
        )
        say(f"engine logs in {log_dir}")
        on_ready()
        run_gateway(settings, FleetFile(models=[model]))
    finally:
        for engine in engines:
            engine.stop()


# -- an autoscaled local fleet (`fleetserve up --replicas MIN:MAX`) ------------------------


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


def build_autoscaled_gateway(
    spec: AutoscaledStackSpec,
    settings: GatewaySettings,
    on_ready: Callable[[], None] = lambda: None,
    log_dir: Path | None = None,
) -> GatewayApp:
    """The gateway with a local actuator and the autoscaler loop in its process."""
    clock = RealClock()
    fleet = fleet_for(settings)
    window = LoadWindow(settings.load_window_s)
    actuator = LocalActuator(
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
    )

    def figures(model: str, now: float) -> GatewayFigures:
        load = window.snapshot(model, now)
        return GatewayFigures(
            held=load.held,
            ttft_p95_s=load.ttft_p95_s,
            arrival_rps=load.arrival_rps,
            arrival_tps=load.demand_tps,
        )

    loop = AutoscaleLoop(
        spec.model, FleetObserver(fleet, spec.model, figures), actuator, spec.autoscale, clock
    )
    model = ModelSpec(
        name=spec.model,
        engine=spec.engine_name,
        picker=spec.picker,
        autoscale=spec.autoscale,
        max_concurrency=spec.max_concurrency,
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
    )
    # The gateway's metrics exist once it is built; the loop only decides after it starts.
    loop.on_decision = lambda decision: app.metrics.set_desired_replicas(
        spec.model, decision.desired
    )
    return app


def run_autoscaled_stack(
    spec: AutoscaledStackSpec,
    settings: GatewaySettings,
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Serve the gateway with the autoscaler until SIGINT/SIGTERM; every replica is stopped."""
    serve_app(build_autoscaled_gateway(spec, settings, on_ready), settings)


# -- the autoscaler alone (`fleetserve autoscaler`) ----------------------------------------


@dataclass(frozen=True)
class RemoteAutoscalerSpec:
    gateway_url: str
    model: str
    target: KubernetesTarget
    autoscale: AutoscaleSettings
    admin_key: str | None = None
    kubeconfig: Path | None = None
    context: str | None = None
    host: str = LOOPBACK
    port: int = 8081  # its own /admin/autoscaler, /metrics and /health


def build_remote_autoscaler(
    spec: RemoteAutoscalerSpec, actuator: Actuator | None = None
) -> tuple[AutoscaleLoop, Starlette]:
    """The loop reading a gateway over HTTP and scaling a Deployment, and its small HTTP app."""
    clock = RealClock()
    observer = GatewayObserver(spec.gateway_url, spec.model, spec.admin_key)
    if actuator is None:
        actuator = KubernetesActuator.connect(
            spec.target, kubeconfig=spec.kubeconfig, context=spec.context
        )
    registry = CollectorRegistry()
    desired = Gauge(
        "fleetserve_desired_replicas", "Replicas the autoscaler wants, by model.", ["model"],
        registry=registry,
    )  # fmt: skip
    replicas = Gauge(
        "fleetserve_replicas", "Replicas by state, as the autoscaler last observed them.",
        ["model", "state"], registry=registry,
    )  # fmt: skip

    def on_decision(decision: Decision) -> None:
        desired.labels(spec.model).set(decision.desired)
        latest = loop.timeline.latest
        if latest is not None:
            for state in ("ready", "starting", "draining"):
                value = getattr(latest, state)
                if value is not None:
                    replicas.labels(spec.model, state).set(value)

    loop = AutoscaleLoop(
        spec.model, observer, actuator, spec.autoscale, clock, on_decision=on_decision
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await loop.start()
        try:
            yield
        finally:
            await loop.stop()
            await observer.close()
            await actuator.close()

    async def view(_: Request) -> Response:
        return Response(orjson.dumps(loop.view()), media_type="application/json")

    async def health(_: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/admin/autoscaler", view),
            Route("/health", health),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
    return loop, app


def run_remote_autoscaler(spec: RemoteAutoscalerSpec) -> None:
    """Run until SIGINT/SIGTERM (then KeyboardInterrupt)."""
    _, app = build_remote_autoscaler(spec)
    with terminate_as_interrupt():
        uvicorn.run(app, host=spec.host, port=spec.port, log_level="warning", lifespan="on")
