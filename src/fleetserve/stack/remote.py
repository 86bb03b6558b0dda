"""The autoscaler alone (`fleetserve autoscaler`): reads a gateway over HTTP, scales a
Kubernetes Deployment, and serves its own /admin/autoscaler, /metrics, /health and /ready."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleetserve.autoscale.decision import NO_SIGNAL, Decision, Direction
from fleetserve.autoscale.loop import AutoscaleLoop
from fleetserve.autoscale.observers import GatewayObserver
from fleetserve.autoscale.recommendations import SIGNALS
from fleetserve.clock import RealClock
from fleetserve.config import AutoscaleSettings
from fleetserve.fleet.actuators import Actuator
from fleetserve.fleet.kubernetes import KubernetesActuator, KubernetesTarget
from fleetserve.fleet.processes import LOOPBACK
from fleetserve.gateway.serve import terminate_as_interrupt
from fleetserve.supervisor import Supervisor
from fleetserve.telemetry import names
from fleetserve.telemetry.metrics import ServiceCollector
from fleetserve.telemetry.names import MetricDef

JSON = "application/json"


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
    port: int = 8081  # its own /admin/autoscaler, /metrics, /health and /ready


def build_remote_autoscaler(
    spec: RemoteAutoscalerSpec, actuator: Actuator | None = None
) -> tuple[AutoscaleLoop, Starlette]:
    """The loop reading a gateway over HTTP and scaling a Deployment, and its small HTTP app."""
    clock = RealClock()
    supervisor = Supervisor(clock)
    observer = GatewayObserver(spec.gateway_url, spec.model, spec.admin_key)
    if actuator is None:
        actuator = KubernetesActuator.connect(
            spec.target, kubeconfig=spec.kubeconfig, context=spec.context
        )
    registry = CollectorRegistry()
    desired = _gauge(names.DESIRED_REPLICAS, registry)
    ceiling = _gauge(names.MAX_REPLICAS, registry)
    decisions = Counter(
        names.DECISIONS.name, names.DECISIONS.help, names.DECISIONS.labels, registry=registry
    )
    replicas = Gauge(
        names.REPLICAS.name, "Replicas by state, as the autoscaler last observed them.",
        names.REPLICAS.labels, registry=registry,
    )  # fmt: skip
    registry.register(ServiceCollector(supervisor.counts))

    for direction in Direction:  # at zero, so that the first decision counts in increase()
        for signal in (*SIGNALS, NO_SIGNAL):
            decisions.labels(spec.model, direction.value, signal)

    def on_decision(decision: Decision) -> None:
        desired.labels(spec.model).set(decision.desired)
        ceiling.labels(spec.model).set(spec.autoscale.max_replicas)
        decisions.labels(spec.model, decision.direction.value, decision.signal).inc()
        latest = loop.timeline.latest
        if latest is not None:
            for state in ("ready", "starting", "draining"):
                value = getattr(latest, state)
                if value is not None:
                    replicas.labels(spec.model, state).set(value)

    loop = AutoscaleLoop(
        spec.model, observer, actuator, spec.autoscale, clock,
        on_decision=on_decision, supervisor=supervisor,
    )  # fmt: skip

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

    async def ready(_: Request) -> Response:
        """The loop's services, as the gateway's /ready lists them (always 200: it serves
        nothing that a load balancer routes to)."""
        return Response(orjson.dumps({"ready": True} | supervisor.view()), media_type=JSON)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/admin/autoscaler", view),
            Route("/health", health),
            Route("/ready", ready),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
    return loop, app


def _gauge(d: MetricDef, registry: CollectorRegistry) -> Gauge:
    return Gauge(d.name, d.help, d.labels, registry=registry)


def run_remote_autoscaler(spec: RemoteAutoscalerSpec) -> None:
    """Run until SIGINT/SIGTERM (then KeyboardInterrupt)."""
    _, app = build_remote_autoscaler(spec)
    with terminate_as_interrupt():
        uvicorn.run(app, host=spec.host, port=spec.port, log_level="warning", lifespan="on")
