"""One `fleetserve bench --tenants FILE` run: every tenant at once, then one report.

Each tenant gets its own client (its own key on every request's Authorization header, its own
connection pool), its own schedule or users, and its own seeded workload; they share the
run's clock, start, in-flight cap and drain (`runner.run_tenants`), so all records are on one
timeline. The report is the usual one over every request, plus the per-tenant section
(`tenant_stats`), with the fleet sampled alongside as in a plain run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from fleetserve.bench.client import BenchClient, ClientSettings
from fleetserve.bench.records import FleetSample
from fleetserve.bench.report.model import BenchReport, RunConfig, SloSpec
from fleetserve.bench.runner import Progress, RunLimits, RunResult, TenantLoad, run_tenants
from fleetserve.bench.schedule import schedule
from fleetserve.bench.session import (
    SIMULATION_NOTE,
    ClosedLoad,
    FleetSourceName,
    detect_simulation,
)
from fleetserve.bench.stats import summarize
from fleetserve.bench.tenant_stats import TenantInfo, tenant_notes, tenant_section
from fleetserve.bench.tenants import TenantPlan
from fleetserve.bench.timeline import FleetSampler, SamplerSettings
from fleetserve.bench.workload import BuiltRequest, Workload
from fleetserve.clock import Clock
from fleetserve.config import IDLE_TIMEOUT_S
from fleetserve.errors import ConfigError

MODELS_NAMED = 4  # RunConfig.model lists this many models, then "+N more"


@dataclass(frozen=True, slots=True)
class TenantsPlan:
    url: str
    tenants: tuple[TenantPlan, ...]
    duration_s: float
    source: str  # the tenants file, as the report names it
    drain_s: float = 30.0
    timeout_s: float = 600.0
    idle_timeout_s: float = IDLE_TIMEOUT_S
    slos: tuple[SloSpec, ...] = ()
    fleet_source: FleetSourceName = "auto"
    admin_key: str | None = field(default=None, repr=False)
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tenants:
            raise ConfigError("a tenants run needs at least one tenant")


def tenant_info(tenant: TenantPlan) -> TenantInfo:
    return TenantInfo(
        name=tenant.name,
        load=tenant.load.description,
        model=tenant.workload.model,
        stream=tenant.workload.stream,
        key_prefix=tenant.key_prefix,
        key_source=tenant.key_source,
    )


def tenant_load(tenant: TenantPlan, plan: TenantsPlan, clock: Clock) -> TenantLoad:
    """The runner's view of one tenant: its sender, its requests, its schedule or users."""
    settings = ClientSettings(
        base_url=plan.url,
        api_key=tenant.key,
        total_timeout_s=plan.timeout_s,
        idle_timeout_s=plan.idle_timeout_s,
    )

    def connect(t0: float) -> BenchClient:
        return BenchClient(settings, clock, t0=t0)

    workload = Workload(tenant.workload, seed=tenant.seed)
    load = tenant.load
    if isinstance(load, ClosedLoad):
        return TenantLoad(tenant.name, connect, lambda _k: workload.next(), users=load.users,
                          max_requests=tenant.max_requests)  # fmt: skip
    offsets = schedule(
        load.pattern,
        duration_s=plan.duration_s,
        max_requests=tenant.max_requests,
        arrivals=load.arrivals,
        rng=random.Random(tenant.seed) if load.arrivals == "poisson" else None,
    )
    # Bodies are built before the run so that building costs nothing at send time.
    built: list[BuiltRequest] = [workload.next() for _ in offsets]
    return TenantLoad(tenant.name, connect, built.__getitem__, intended_s=offsets,
                      max_requests=tenant.max_requests)  # fmt: skip


async def _simulated(plan: TenantsPlan) -> bool:
    """Whether any tenant's model is simulated, asked with a key of a tenant that uses it."""
    keys: dict[str, str | None] = {}
    for tenant in plan.tenants:
        if keys.get(tenant.workload.model) is None:
            keys[tenant.workload.model] = tenant.key
    for model, key in keys.items():
        if await detect_simulation(plan.url, model, key):
            return True
    return False


def _models(plan: TenantsPlan) -> str:
    models = list(dict.fromkeys(t.workload.model for t in plan.tenants))
    named = ", ".join(models[:MODELS_NAMED])
    return named + (f" +{len(models) - MODELS_NAMED} more" if len(models) > MODELS_NAMED else "")


async def run_tenants_bench(
    plan: TenantsPlan,
    clock: Clock,
    on_progress: Callable[[Progress], None] | None = None,
) -> tuple[RunResult, BenchReport]:
    """Run every tenant of the plan at once against its URL while sampling the fleet."""
    simulated = await _simulated(plan)
    loads = [tenant_load(tenant, plan, clock) for tenant in plan.tenants]
    limits = RunLimits(duration_s=plan.duration_s, drain_s=plan.drain_s)
    start_wall = clock.wall()
    sampler = None
    if plan.fleet_source != "none":
        base = plan.url.rstrip("/").removesuffix("/v1")
        sampler = FleetSampler(
            base,
            clock,
            clock.now(),
            SamplerSettings(source=plan.fleet_source, admin_key=plan.admin_key),
        )
        sampler.start()
    fleet: list[FleetSample] = []
    try:
        result = await run_tenants(loads, clock=clock, limits=limits, on_progress=on_progress)
    finally:
        if sampler is not None:
            fleet = await sampler.stop()
    count = len(plan.tenants)
    config = RunConfig(
        url=plan.url,
        model=_models(plan),
        load=f"{count} tenant{'s' if count > 1 else ''} at once ({plan.source})",
        duration_s=plan.duration_s,
        stream=all(t.workload.stream for t in plan.tenants),
        started_at=datetime.fromtimestamp(start_wall, UTC).isoformat(timespec="seconds"),
        simulated=simulated,
        simulation_note=SIMULATION_NOTE if simulated else None,
        options=plan.options,
    )
    report = summarize(
        result.records,
        duration_s=max(result.duration_s, 1e-3),
        config=config,
        fleet=fleet,
        slos=plan.slos,
    )
    section = tenant_section(
        result.records, [tenant_info(t) for t in plan.tenants], report.totals.window_s
    )
    report = report.model_copy(
        update={"tenants": section, "notes": [*report.notes, *tenant_notes(section)]}
    )
    return result, report
