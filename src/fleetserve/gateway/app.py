"""Builds one gateway worker from settings and the fleet file (the gateway's composition)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Protocol

from fleetserve.clock import Clock, RealClock
from fleetserve.config import (
    FleetFile,
    GatewaySettings,
    default_state_dir,
    is_loopback,
    load_fleet_file,
    tracing_settings,
)
from fleetserve.engines.registry import adapter_for
from fleetserve.errors import ConfigError
from fleetserve.fleet.discovery import populate_static
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.kubernetes_discovery import KubernetesDiscovery
from fleetserve.fleet.replica import EjectionPolicy, Replica
from fleetserve.gateway.asgi import GatewayApp
from fleetserve.gateway.dashboard import Dashboard, RequestTrail
from fleetserve.gateway.hold import DemandHook, HoldQueue
from fleetserve.gateway.monitor import FleetMonitor, SignalParser
from fleetserve.gateway.observe import Observer
from fleetserve.gateway.peers import Peers, WorkerContext, WorkerLink
from fleetserve.gateway.proxy import Proxy
from fleetserve.gateway.routes import AdminView, build_routes_app
from fleetserve.gateway.shutdown import Shutdown, shutting_down_error
from fleetserve.gateway.upstream import UpstreamClient
from fleetserve.gateway.watchdog import Watchdog
from fleetserve.routing.picker import Picker
from fleetserve.routing.pickers import make_picker
from fleetserve.supervisor import Supervisor, cancel_all
from fleetserve.telemetry.logs import AccessLog
from fleetserve.telemetry.metrics import METRICS_FLUSH_S, GatewayMetrics
from fleetserve.telemetry.tenant_metrics import TenantMetrics
from fleetserve.telemetry.window import LoadWindow
from fleetserve.tenancy.model import Price
from fleetserve.transport.http1 import Http1Client

log = logging.getLogger("fleetserve.gateway")


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
    supervisor: Supervisor | None = None,
    worker: WorkerContext | None = None,
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
    - `supervisor`: the one the composition root's services run under (else a new one); the
      monitor and discovery run under it too, and /ready and /metrics report its services.
    - `worker`: this is one of several worker processes (gateway/workers.py): it reports to
      the others and its admin views answer for all of them (gateway/peers.py).
    """
    clock = clock or RealClock()
    supervisor = supervisor or Supervisor(clock)
    health = settings.health
    if fleet is None:
        fleet = fleet_for(settings)
    _add_static(fleet, fleet_file, clock.now())
    services = [*services, *_discoveries(settings, fleet_file, fleet, clock, supervisor)]
    window = window or LoadWindow(settings.load_window_s)
    pickers: dict[str, Picker] = {
        spec.name: make_picker(spec.picker, load_factor=spec.prefix_load_factor)
        for spec in fleet_file.models
    }
    parsers: dict[str, SignalParser] = {
        spec.name: adapter_for(spec.engine).parse_signals for spec in fleet_file.models
    }
    metrics = GatewayMetrics(served=fleet.serves)
    for spec in fleet_file.models:  # their series start at zero, before the first request
        metrics.of(spec.name)
    upstream = UpstreamClient(settings.timeouts)
    tenancy = None
    if auth_mode(settings) == "keys":
        # Imported here: the store and its drivers load only in gateways that use them.
        from fleetserve.gateway.tenancy_runtime import TenancyRuntime  # noqa: PLC0415

        tenant_metrics = TenantMetrics(metrics.registry, settings.tenancy.metrics_top_tenants)
        if metrics.registry is None:  # workers: flushed with the gateway's metrics
            metrics.also_flush(tenant_metrics.flush)
        tenancy = TenancyRuntime(
            settings, default_state_dir(), _prices(fleet_file),
            {spec.name: spec.engine for spec in fleet_file.models}, clock,
            tenant_metrics, fleet,
            upstream, supervisor, workers=worker.workers if worker is not None else 1,
        )  # fmt: skip
        services = [*services, tenancy]
    fleet.subscribe(functools.partial(_forget_when_removed, fleet, upstream.http1))
    monitor = FleetMonitor(fleet, health, clock, parsers, supervisor)
    autoscaled = {spec.name for spec in fleet_file.models if spec.autoscale is not None}
    link: WorkerLink | None = None

    def wake_parent(model: str) -> None:  # the worker's report first, then the signal
        if link is not None:
            link.wake_parent(model)

    if worker is not None and worker.follow:
        on_demand = wake_parent
    holds = HoldQueue(
        fleet, settings.hold, clock, window, metrics,
        retry_after_s=settings.retry_after_s,
        autoscaled=autoscaled | set(hold_models),
        on_demand=on_demand,
    )  # fmt: skip
    peers = None
    if worker is not None:
        peers = Peers(worker.run, clock)
        link = WorkerLink(
            worker.run, fleet, window, clock, holds.held,
            parent_pid=worker.parent_pid, follow=worker.follow, workers=worker.workers,
            on_orphaned=lambda: os.kill(os.getpid(), signal.SIGTERM),
            on_parent_view=lambda view: _desired_from(view, metrics), supervisor=supervisor,
        )  # fmt: skip
        services = [link, *services]
        if worker.follow:
            views = link

            def parent_view() -> object:
                return views.parent_view or {}

            admin_views = {**(admin_views or {}), "autoscaler": parent_view}

    observer = build_observer(settings, fleet_file, clock)
    watchdog = Watchdog(clock, settings.timeouts, metrics, supervisor)
    shutdown = Shutdown(clock, settings.shutdown_grace_s)
    shutdown.on_begin(lambda: holds.close(shutting_down_error(settings.retry_after_s)))
    shutdown.on_deadline(lambda: log.warning(
        "shutdown grace of %g s is over: ending %d open request(s)",
        settings.shutdown_grace_s, watchdog.end_all("shutdown"),
    ))  # fmt: skip

    async def flush_metrics() -> None:  # workers: what other workers' scrapes read
        while True:
            await clock.sleep(METRICS_FLUSH_S)
            metrics.flush()

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        await monitor.start()
        await watchdog.start()
        flusher = None
        if metrics.registry is None:
            flusher = supervisor.spawn("metrics/flush", flush_metrics)
        try:
            async with contextlib.AsyncExitStack() as running:
                for service in services:
                    await service.start()
                    running.push_async_callback(service.stop)
                yield
        finally:
            shutdown.cancel()
            await cancel_all([flusher])
            metrics.flush()
            await watchdog.stop()
            await monitor.stop()
            await upstream.close()
            if observer is not None:
                await observer.close()

    trail = RequestTrail()
    dashboard = Dashboard(
        fleet, clock, window, holds, trail, supervisor,
        autoscaler=(admin_views or {}).get("autoscaler"), peers=peers, tenancy=tenancy,
    )  # fmt: skip
    services = [*services, dashboard]
    shutdown.on_begin(dashboard.close)  # open pages are told and their streams end
    simulated = frozenset(spec.name for spec in fleet_file.models if spec.engine == "sim")
    cold = build_routes_app(
        fleet, metrics, clock, window, holds, shutdown, settings.admin_key_value(), admin_views,
        simulated, supervisor, peers, tenancy, dashboard,
    )  # fmt: skip
    proxy = Proxy(fleet, pickers, upstream, settings, metrics, clock, window, holds, shutdown)
    return GatewayApp(
        proxy, fleet, settings, metrics, clock, cold, window, holds,
        watchdog=watchdog, shutdown=shutdown, lifespan=lifespan,
        gate=None if tenancy is None else tenancy.gate, trail=trail, observer=observer,
    )  # fmt: skip


def build_observer(
    settings: GatewaySettings, fleet_file: FleetFile, clock: Clock
) -> Observer | None:
    """Traces and access lines, or None when both are off (the hot path then pays nothing).
    The OpenTelemetry SDK is imported only when tracing is configured."""
    traced = tracing_settings(fleet_file.tracing)
    access = settings.access_log
    if access is None:
        access = settings.log_format == "json"
    if traced is None and not access:
        return None
    tracing = None
    if traced is not None:
        from fleetserve.telemetry.tracing import Sampling, Tracing  # noqa: PLC0415

        tracing = Tracing.otlp(
            traced.traces_url, traced.header_values(),
            Sampling.named(traced.sampler, traced.ratio), traced.service_name, traced.timeout_s,
        )  # fmt: skip
    return Observer(
        tracing, AccessLog(settings.log_format) if access else None, _prices(fleet_file),
        {spec.name: spec.engine for spec in fleet_file.models}, clock,
    )  # fmt: skip


def auth_mode(settings: GatewaySettings) -> str:
    """`keys` or `none`: as set, else keys on a non-loopback address and none on loopback."""
    if settings.tenancy.auth is not None:
        return settings.tenancy.auth
    return "none" if is_loopback(settings.host) else "keys"


def _prices(fleet_file: FleetFile) -> dict[str, Price]:
    return {
        spec.name: Price(spec.pricing.input_per_mtok_usd, spec.pricing.output_per_mtok_usd)
        for spec in fleet_file.models
        if spec.pricing is not None
    }


def _desired_from(view: dict[str, object], metrics: GatewayMetrics) -> None:
    """The parent's autoscaler decided: its target (and ceiling) in this worker's /metrics."""
    desired, model, settings = view.get("desired"), view.get("model"), view.get("settings")
    if isinstance(desired, int) and isinstance(model, str):
        ceiling = settings.get("max_replicas") if isinstance(settings, dict) else None
        metrics.set_desired_replicas(model, desired, ceiling if isinstance(ceiling, int) else None)


def _forget_when_removed(fleet: Fleet, client: Http1Client, replica: Replica) -> None:
    """A Fleet listener: a replica that left the fleet leaves the connection pool, unless
    another replica (of another model) has the same URL."""
    if fleet.get(replica.id) is None and all(r.url != replica.url for r in fleet.replicas()):
        client.forget(replica.url)


def fleet_for(settings: GatewaySettings) -> Fleet:
    """An empty Fleet that ejects replicas as the settings' health section says."""
    health = settings.health
    return Fleet(
        EjectionPolicy(
            health.eject_after_failures,
            health.eject_base_s,
            health.eject_max_s,
            health.eject_decay_s,
        )
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
    settings: GatewaySettings,
    fleet_file: FleetFile,
    fleet: Fleet,
    clock: Clock,
    supervisor: Supervisor,
) -> list[BackgroundService]:
    """One EndpointSlice watch per model whose replicas Kubernetes knows (ConfigError now if
    no Kubernetes configuration loads)."""
    return [
        KubernetesDiscovery.connect(fleet, spec, clock, settings.kubeconfig, supervisor)
        for spec in fleet_file.models
        if spec.discovery is not None
    ]


def resolve_fleet(settings: GatewaySettings, inline: FleetFile | None) -> FleetFile:
    if inline is not None:
        return inline
    if settings.fleet_file is None:
        raise ConfigError(
            "no fleet: give --fleet-file FILE, --model NAME --upstream URL, "
            "or --model NAME --k8s-service SERVICE"
        )
    return load_fleet_file(settings.fleet_file)
