"""The gateway's cold routes: liveness, readiness, models, metrics and the admin views.

Admin views (`/admin/fleet`, `/admin/load` and any the composition root adds, such as the
autoscaler's `/admin/autoscaler`) answer JSON behind the same admin key; so do the live
page's data endpoints (gateway/dashboard/routes.py).
"""

from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Callable, Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleetserve.clock import Clock
from fleetserve.errors import AuthenticationError, MethodNotAllowedError, NotFoundError
from fleetserve.fleet.fleet import Fleet
from fleetserve.gateway.dashboard import Dashboard, dashboard_routes
from fleetserve.gateway.hold import HoldQueue
from fleetserve.gateway.peers import Peers, merged_window
from fleetserve.gateway.responses import error_response, json_response
from fleetserve.gateway.shutdown import Shutdown
from fleetserve.gateway.tenancy_admin import TenancyApi, tenancy_routes
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.supervisor import Supervisor
from fleetserve.telemetry.metrics import GatewayMetrics, ReplicaRow, exposition
from fleetserve.telemetry.window import LoadWindow

AdminView = Callable[[], object]
"""Returns what `/admin/<name>` answers, as JSON-serialisable data (orjson: dataclasses too)."""
BUILT_IN_VIEWS = frozenset({"fleet", "load", "replicas", "tenants", "keys", "usage", "dashboard"})

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def build_routes_app(
    fleet: Fleet,
    metrics: GatewayMetrics,
    clock: Clock,
    window: LoadWindow,
    holds: HoldQueue,
    shutdown: Shutdown,
    admin_key: str | None = None,  # plain text: the settings hold it as a SecretStr
    admin_views: Mapping[str, AdminView] | None = None,
    simulated_models: frozenset[str] = frozenset(),
    supervisor: Supervisor | None = None,
    peers: Peers | None = None,
    tenancy: TenancyApi | None = None,
    dashboard: Dashboard | None = None,
) -> Starlette:
    """The cold routes. With `peers` (one of several worker processes) the admin views add
    the other workers' reports in, so they answer for the whole gateway. With `tenancy`
    (auth = keys) the tenant, key and usage admin API is served too."""
    views = dict(admin_views or {})
    if clash := BUILT_IN_VIEWS & views.keys():
        raise ValueError(f"admin views {sorted(clash)} would hide built-in admin routes")
    started = int(clock.wall())
    expected_auth = f"Bearer {admin_key}" if admin_key else None
    needs_key = expected_auth is not None

    def admin_denied(request: Request) -> Response | None:
        if expected_auth is None:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), expected_auth.encode()):
            return None
        return error_response(
            AuthenticationError("admin endpoints need the admin key as a bearer token")
        )

    async def health(_: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(_: Request) -> Response:
        """Ready when some model has a ready replica or can hold requests until it has one,
        and the gateway is not shutting down (load balancers stop sending at once).

        Background services are listed, and those restarting after a failure named under
        `degraded`, but they do not decide readiness: that is about serving requests."""
        ready_models = [m for m in fleet.models() if fleet.ready(m)]
        holding = [m for m in fleet.models() if m not in ready_models and holds.can_hold(m)]
        ok = bool(ready_models or holding) and not shutdown.draining
        body: dict[str, object] = {
            "ready": ok, "models_ready": ready_models, "models_can_hold": holding,
        }  # fmt: skip
        if shutdown.draining:
            body["shutting_down"] = True
        if supervisor is not None:
            body |= supervisor.view()
        return json_response(body, 200 if ok else 503)

    async def models(_: Request) -> Response:
        # A model served by simulated engines says so, as the engines themselves do, so that
        # clients such as `fleetserve bench` label their figures as a simulation.
        data = [
            {"id": m, "object": "model", "created": started, "owned_by": "fleetserve"}
            | ({"simulated": True} if m in simulated_models else {})
            for m in fleet.models()
        ]
        return json_response({"object": "list", "data": data})

    def state_counts() -> list[tuple[str, str, int]]:
        return [
            (model, state.value, n)
            for model in fleet.models()
            for state, n in fleet.count_by_state(model).items()
        ]

    def replica_rows() -> list[ReplicaRow]:
        now = clock.now()
        rows = []
        for r in fleet.replicas():
            age = None
            if r.state is ReplicaState.READY:
                age = now - max(r.state_since, r.scraped_at or r.state_since)
            signals = r.signals
            rows.append(ReplicaRow(r.model, r.id, r.in_flight, signals.running, signals.waiting,
                                   signals.kv_usage_frac, age))  # fmt: skip
        return rows

    async def metrics_page(_: Request) -> Response:
        services = None if supervisor is None else supervisor.counts
        body = exposition(metrics, state_counts, services, replica_rows)
        return Response(body, media_type=PROMETHEUS_TEXT)

    async def admin_fleet(request: Request) -> Response:
        if denied := admin_denied(request):
            return denied
        now = clock.now()
        reports = peers.reports() if peers is not None else []
        others: dict[str, int] = {}
        for report in reports:
            for rid, n in report.in_flight.items():
                others[rid] = others.get(rid, 0) + n
        replicas = [
            {
                "id": r.id,
                "name": r.name,
                "url": r.url,
                "model": r.model,
                "state": r.state.value,
                "state_for_s": round(now - r.state_since, 3),
                "reason": r.reason,
                "in_flight": r.in_flight + others.get(r.id, 0),
                "running": r.signals.running,
                "waiting": r.signals.waiting,
                "kv_usage_frac": r.signals.kv_usage_frac,
                "seen_s_ago": None if r.last_seen is None else round(now - r.last_seen, 3),
                "consecutive_failures": r.consecutive_failures,
            }
            for r in fleet.replicas()
        ]
        by_state = {s.value: n for s, n in fleet.count_by_state().items()}
        held = {m: holds.held(m) + sum(r.held.get(m, 0) for r in reports) for m in fleet.models()}
        return json_response({"replicas": replicas, "by_state": by_state, "ready": by_state.get(
            ReplicaState.READY.value, 0), "held": held, "workers": 1 + len(reports)})  # fmt: skip

    async def admin_load(request: Request) -> Response:
        """The rolling load window per model: what a standalone autoscaler polls."""
        if denied := admin_denied(request):
            return denied
        now = clock.now()
        source = window
        if peers is not None:
            source = merged_window(window, peers.reports(), now, window.window_s)
        models = {m: dataclasses.asdict(source.snapshot(m, now)) for m in fleet.models()}
        return json_response({"window_s": window.window_s, "models": models})

    def admin_view(name: str, view: AdminView) -> Route:
        async def endpoint(request: Request) -> Response:
            if denied := admin_denied(request):
                return denied
            return json_response(view())

        return Route(f"/admin/{name}", endpoint, name=f"admin_{name}")

    async def admin_drain(request: Request) -> Response:
        """Stop routing new requests to a replica; in-flight ones finish."""
        if denied := admin_denied(request):
            return denied
        replica_id = request.path_params["replica_id"]
        replica = fleet.get(replica_id)
        if replica is None:
            return error_response(
                NotFoundError(f"no replica {replica_id!r}", code="replica_not_found")
            )
        fleet.drain(replica_id, clock.now())
        if peers is not None:
            peers.drain(replica_id)  # every worker routes, so every worker drains it
        return json_response(
            {"id": replica_id, "state": replica.state.value, "in_flight": replica.in_flight}
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return error_response(
                MethodNotAllowedError(f"{request.url.path} does not accept {request.method}")
            )
        if exc.status_code == 404:
            return error_response(
                NotFoundError(f"no route for {request.method} {request.url.path}")
            )
        return Response(str(exc.detail), status_code=exc.status_code)

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/ready", ready),
            Route("/v1/models", models),
            Route("/metrics", metrics_page),
            Route("/admin/fleet", admin_fleet),
            Route("/admin/load", admin_load),
            *(admin_view(name, view) for name, view in views.items()),
            Route("/admin/replicas/{replica_id:path}/drain", admin_drain, methods=["POST"]),
            *(tenancy_routes(tenancy, admin_denied) if tenancy is not None else ()),
            *(dashboard_routes(dashboard, admin_denied, needs_key) if dashboard else ()),
        ],
        exception_handlers={HTTPException: not_found},
    )
