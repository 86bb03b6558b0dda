"""Builds one gateway worker from settings and the fleet file (the gateway's composition)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Protocol

import orjson
from starlette.applications import Starlette

from fleetserve.clock import Clock, RealClock
from fleetserve.config import FleetFile, GatewaySettings, load_fleet_file
from fleetserve.engines.registry import adapter_for
from fleetserve.errors import ConfigError
from fleetserve.fleet.discovery import populate_static
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.kubernetes_discovery import KubernetesDiscovery
from fleetserve.fleet.replica import EjectionPolicy
from fleetserve.gateway.asgi import GatewayApp
from fleetserve.gateway.hold import DemandHook, HoldQueue
from fleetserve.gateway.monitor import FleetMonitor, SignalParser
from fleetserve.gateway.proxy import Proxy
from fleetserve.gateway.routes import AdminView, build_routes_app
from fleetserve.gateway.upstream import UpstreamClient
from fleetserve.routing.picker import Picker
from fleetserve.routing.pickers import make_picker
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.window import LoadWindow

log = logging.getLogger("fleetserve.gateway")

# Workers started by uvicorn re-import the app; the parent passes the resolved configuration
# in this variable so every worker serves exactly what the parent validated.
CONFIG_ENV = "FLEETSERVE_GATEWAY_CONFIG"


class BackgroundService(Protocol):
    """Something that runs beside the gateway in its event loop (the autoscaler loop, a
    discovery watch): started after the fleet monitor, stopped before it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def build_gateway(
    settings: GatewaySettings,
    fleet_file: FleetFile,
    clock: Clock | None = None,
    *,
    fleet: Fleet | None = None,
    window: LoadWindow | None = None,
    services: Sequence[BackgroundService] = (),
    on_demand: DemandHook | None = None,
    admin_views: Mapping[str, AdminView] | None = None,
    hold_models: Iterable[str] = (),
) -> GatewayApp:
    """One gateway worker. The keyword hooks are for a composition root in the same process:

    - `fleet`: a Fleet it also writes (actuators, discovery); the fleet file's models are
      declared in it and its listed replicas added unless a replica with that URL is there.
    - `window`: the load window to fill (else one of `settings.load_window_s`).
    - `services`: started in the app's lifespan after the monitor, stopped before it; the
      models with `discovery: {kubernetes: ...}` add their EndpointSlice watches to them.
    - `on_demand(model)`: called when requests start being held for a model.
    - `admin_views`: more JSON views at `/admin/<name>`, behind the admin key.
    - `hold_models`: models that hold requests while they have no ready replica, on top of
      those with an `autoscale` section in the fleet file.
    """
    clock = clock or RealClock()
    health = settings.health
    if fleet is None:
        fleet = fleet_for(settings)
    _add_static(fleet, fleet_file, clock.now())
    services = [*services, *_discoveries(settings, fleet_file, fleet, clock)]
    window = window or LoadWindow(settings.load_window_s)
    pickers: dict[str, Picker] = {
        spec.name: make_picker(spec.picker, load_factor=spec.prefix_load_factor)
        for spec in fleet_file.models
    }
    parsers: dict[str, SignalParser] = {
        spec.name: adapter_for(spec.engine).parse_signals for spec in fleet_file.models
    }
    metrics = GatewayMetrics()
    upstream = UpstreamClient(settings.timeouts)
    monitor = FleetMonitor(fleet, health, clock, parsers)
    autoscaled = {spec.name for spec in fleet_file.models if spec.autoscale is not None}
    holds = HoldQueue(
        fleet, settings.hold, clock, window, metrics,
        retry_after_s=settings.retry_after_s,
        autoscaled=autoscaled | set(hold_models),
        on_demand=on_demand,
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await monitor.start()
        try:
            async with contextlib.AsyncExitStack() as running:
                for service in services:
                    await service.start()
                    running.push_async_callback(service.stop)
                yield
        finally:
            await monitor.stop()
            await upstream.close()

    simulated = frozenset(spec.name for spec in fleet_file.models if spec.engine == "sim")
    cold = build_routes_app(
        fleet,
        metrics,
        clock,
        lifespan,
        window,
        holds,
        settings.admin_key_value(),
        admin_views,
        simulated,
    )
    proxy = Proxy(fleet, pickers, upstream, settings, metrics, clock, window, holds)
    return GatewayApp(proxy, fleet, settings, metrics, clock, cold, window, holds)


def fleet_for(settings: GatewaySettings) -> Fleet:
    """An empty Fleet that ejects replicas as the settings' health section says."""
    health = settings.health
    return Fleet(
        EjectionPolicy(health.eject_after_failures, health.eject_base_s, health.eject_max_s)
    )


def _add_static(fleet: Fleet, fleet_file: FleetFile, now: float) -> None:
    """The fleet file's models and replicas, skipping replicas the fleet already has."""
    known = {r.url for r in fleet.replicas()}
    specs = [
        spec.model_copy(update={"replicas": [u for u in spec.replicas if u not in known]})
        for spec in fleet_file.models
    ]
    populate_static(fleet, specs, now)


def _discoveries(
    settings: GatewaySettings, fleet_file: FleetFile, fleet: Fleet, clock: Clock
) -> list[BackgroundService]:
    """One EndpointSlice watch per model whose replicas Kubernetes knows (ConfigError now if
    no Kubernetes configuration loads)."""
    return [
        KubernetesDiscovery.connect(fleet, spec, clock, settings.kubeconfig)
        for spec in fleet_file.models
        if spec.discovery is not None
    ]


def encode_config(settings: GatewaySettings, fleet_file: FleetFile) -> str:
    # The admin key goes in plain text (a JSON dump masks a SecretStr) for the workers to
    # compare; the fleet file's `gateway:` section is already in the settings.
    dumped = settings.model_dump(mode="json") | {"admin_key": settings.admin_key_value()}
    fleet = fleet_file.model_dump(mode="json", exclude={"gateway"})
    return orjson.dumps({"settings": dumped, "fleet": fleet}).decode()


def app_from_env() -> GatewayApp:
    """uvicorn factory for worker processes: rebuild the app from CONFIG_ENV."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise ConfigError(f"{CONFIG_ENV} is not set; start workers with `fleetserve gateway`")
    data = orjson.loads(raw)
    settings = GatewaySettings.model_validate(data["settings"])
    return build_gateway(settings, FleetFile.model_validate(data["fleet"]))


def resolve_fleet(settings: GatewaySettings, inline: FleetFile | None) -> FleetFile:
    if inline is not None:
        return inline
    if settings.fleet_file is None:
        raise ConfigError(
            "no fleet: give --fleet-file FILE, --model NAME --upstream URL, "
            "or --model NAME --k8s-service SERVICE"
        )
    return load_fleet_file(settings.fleet_file)
