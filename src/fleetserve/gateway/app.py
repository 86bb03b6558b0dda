"""Builds one gateway worker from settings and the fleet file (the gateway's composition)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette

from fleetserve.clock import Clock, RealClock
from fleetserve.config import FleetFile, GatewaySettings, load_fleet_file
from fleetserve.engines.registry import adapter_for
from fleetserve.errors import ConfigError
from fleetserve.fleet.discovery import populate_static
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import EjectionPolicy
from fleetserve.gateway.asgi import GatewayApp
from fleetserve.gateway.monitor import FleetMonitor, SignalParser
from fleetserve.gateway.proxy import Proxy
from fleetserve.gateway.routes import build_routes_app
from fleetserve.gateway.upstream import UpstreamClient
from fleetserve.routing.picker import Picker
from fleetserve.routing.pickers import make_picker
from fleetserve.telemetry.metrics import GatewayMetrics

log = logging.getLogger("fleetserve.gateway")

# Workers started by uvicorn re-import the app; the parent passes the resolved configuration
# in this variable so every worker serves exactly what the parent validated.
CONFIG_ENV = "FLEETSERVE_GATEWAY_CONFIG"


def build_gateway(
    settings: GatewaySettings, fleet_file: FleetFile, clock: Clock | None = None
) -> GatewayApp:
    clock = clock or RealClock()
    health = settings.health
    fleet = Fleet(
        EjectionPolicy(health.eject_after_failures, health.eject_base_s, health.eject_max_s)
    )
    populate_static(fleet, fleet_file.models, clock.now())
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

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await monitor.start()
        try:
            yield
        finally:
            await monitor.stop()
            await upstream.close()

    cold = build_routes_app(fleet, metrics, clock, lifespan, settings.admin_key)
    proxy = Proxy(fleet, pickers, upstream, settings, metrics, clock)
    return GatewayApp(proxy, fleet, settings, metrics, clock, cold)


def encode_config(settings: GatewaySettings, fleet_file: FleetFile) -> str:
    return orjson.dumps(
        {"settings": settings.model_dump(mode="json"), "fleet": fleet_file.model_dump(mode="json")}
    ).decode()


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
        raise ConfigError("no fleet: give --fleet-file FILE or --model NAME --upstream URL")
    return load_fleet_file(settings.fleet_file)
