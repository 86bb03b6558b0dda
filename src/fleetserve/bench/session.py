"""One `fleetserve bench` run end to end: plan -> load + fleet sampling -> report -> files.

The CLI parses options into a `BenchPlan`; `run_bench` drives the runner with the client
and the fleet sampler side by side and summarizes into one `BenchReport`; `write_outputs`
renders it. `run_sweep` repeats open-loop runs at rising rates until throughput stops
rising or an SLO breaks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import aiohttp

from fleetserve.bench.client import BenchClient, ClientSettings
from fleetserve.bench.patterns import Pattern, steady, value_at
from fleetserve.bench.records import FleetSample
from fleetserve.bench.report.csv_out import write_csv
from fleetserve.bench.report.html import write_html
from fleetserve.bench.report.json_out import write_json
from fleetserve.bench.report.model import BenchReport, RunConfig, SloSpec
from fleetserve.bench.runner import (
    Progress,
    RunLimits,
    RunResult,
    run_closed_loop,
    run_open_loop,
)
from fleetserve.bench.saturation import Saturation, SweepPoint, find_saturation
from fleetserve.bench.schedule import Arrivals, ClosedLoop, TraceEntry, bound_trace, schedule
from fleetserve.bench.stats import summarize
from fleetserve.bench.timeline import FleetSampler, SamplerSettings
from fleetserve.bench.workload import BuiltRequest, Workload, WorkloadSpec
from fleetserve.clock import Clock
from fleetserve.config import IDLE_TIMEOUT_S
from fleetserve.errors import ConfigError

FleetSourceName = Literal["auto", "fleetserve", "prometheus", "none"]
SIMULATION_NOTE = "The target's model card says it is fleetserve's simulated engine."


@dataclass(frozen=True, slots=True)
class OpenLoad:
    """Requests at intended times: a rate pattern with constant or Poisson arrivals."""

    pattern: Pattern
    arrivals: Arrivals = "poisson"
    description: str = ""


@dataclass(frozen=True, slots=True)
class ClosedLoad:
    users: ClosedLoop
    description: str = ""


@dataclass(frozen=True, slots=True)
class TraceLoad:
    entries: tuple[TraceEntry, ...]
    description: str = ""


Load = OpenLoad | ClosedLoad | TraceLoad


@dataclass(frozen=True, slots=True)
class BenchPlan:
    url: str
    workload: WorkloadSpec
    load: Load
    duration_s: float
    max_requests: int = 100_000
    drain_s: float = 30.0
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 600.0
    idle_timeout_s: float = IDLE_TIMEOUT_S
    slos: tuple[SloSpec, ...] = ()
    fleet_source: FleetSourceName = "auto"
    admin_key: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def users_pattern_peak(pattern: Pattern, duration_s: float) -> int:
    """The most users a pattern asks for within the run (sampled every 10 ms)."""
    steps = max(1, int(duration_s * 100))
    peak = max(value_at(pattern, duration_s * i / steps) for i in range(steps + 1))
    return max(1, math.ceil(peak - 1e-9))


async def detect_simulation(url: str, model: str, api_key: str | None = None) -> bool:
    """True when the target's model card says it is simulated (fleetserve's sim engine, or
    a fleetserve gateway in front of it). Unknown (no answer) counts as not simulated.
    `api_key` is for a gateway whose /v1/models asks for one."""
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"{base}/v1/models", headers=headers) as response,
        ):
            if response.status != 200:
                return False
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    cards = body.get("data", []) if isinstance(body, dict) else []
    for card in cards:
        if isinstance(card, dict) and card.get("id") == model:
            owned = str(card.get("owned_by", ""))
            return bool(card.get("simulated")) or owned.endswith("-sim")
    return False


async def run_bench(
    plan: BenchPlan,
    clock: Clock,
    on_progress: Callable[[Progress], None] | None = None,
) -> tuple[RunResult, BenchReport]:
    """Run the plan's load against its URL while sampling the fleet; return data and report."""
    simulated = await detect_simulation(plan.url, plan.workload.model, plan.api_key)
    workload = Workload(plan.workload, seed=plan.seed)
    client_settings = ClientSettings(
        base_url=plan.url,
        api_key=plan.api_key,
        total_timeout_s=plan.timeout_s,
        idle_timeout_s=plan.idle_timeout_s,
    )
    limits = RunLimits(
        duration_s=plan.duration_s, max_requests=plan.max_requests, drain_s=plan.drain_s
    )
    start_wall = clock.wall()
    start = clock.now()
    sampler = None
    if plan.fleet_source != "none":
        base = plan.url.rstrip("/").removesuffix("/v1")
        sampler = FleetSampler(
            base, clock, start, SamplerSettings(source=plan.fleet_source, admin_key=plan.admin_key)
        )
        sampler.start()

    def connect(t0: float) -> BenchClient:
        return BenchClient(client_settings, clock, t0=t0)

    fleet: list[FleetSample] = []
    try:
        result = await _run_load(plan, workload, clock, connect, limits, on_progress)
    finally:
        if sampler is not None:
            fleet = await sampler.stop()
    config = RunConfig(
        url=plan.url,
        model=plan.workload.model,
        load=plan.load.description,
        duration_s=plan.duration_s,
        stream=plan.workload.stream,
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
    return result, report


async def _run_load(
    plan: BenchPlan,
    workload: Workload,
    clock: Clock,
    connect: Callable[[float], BenchClient],
    limits: RunLimits,
    on_progress: Callable[[Progress], None] | None,
) -> RunResult:
    load = plan.load
    if isinstance(load, ClosedLoad):
        return await run_closed_loop(
            load.users,
            lambda _i: workload.next(),
            clock=clock,
            connect=connect,
            limits=limits,
            on_progress=on_progress,
        )
    if isinstance(load, TraceLoad):
        entries = bound_trace(
            list(load.entries), duration_s=plan.duration_s, max_requests=plan.max_requests
        )
        built = [workload.for_trace(e) for e in entries]
        offsets = [e.offset_s for e in entries]
        return await run_open_loop(
            offsets,
            built.__getitem__,
            clock=clock,
            connect=connect,
            limits=limits,
            on_progress=on_progress,
        )
    offsets = schedule(
        load.pattern,
        duration_s=plan.duration_s,
        max_requests=plan.max_requests,
        arrivals=load.arrivals,
        rng=random.Random(plan.seed) if load.arrivals == "poisson" else None,
    )
    # Bodies are built before the run so that building costs nothing at send time.
    built_open: list[BuiltRequest] = [workload.next() for _ in offsets]
    return await run_open_loop(
        offsets,
        built_open.__getitem__,
        clock=clock,
        connect=connect,
        limits=limits,
        on_progress=on_progress,
    )


def write_outputs(report: BenchReport, result: RunResult | None, out_dir: Path) -> list[Path]:
    """report.json, report.csv (per second), requests.csv (per request) and report.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_json(report, out_dir)]
    paths += write_csv(report, out_dir, result.records if result is not None else None)
    paths.append(write_html(report, out_dir))
    return paths


@dataclass(frozen=True, slots=True)
class SweepStep:
    rate_rps: float
    report: BenchReport


def sweep_rates(start_rps: float, factor: float, max_rps: float) -> list[float]:
    if not (start_rps > 0 and factor > 1 and max_rps >= start_rps):
        raise ConfigError("a sweep needs START > 0, FACTOR > 1 and MAX >= START")
    rates = [start_rps]
    while rates[-1] * factor <= max_rps * (1 + 1e-9):
        rates.append(rates[-1] * factor)
    return rates


async def run_sweep(
    plan: BenchPlan,
    rates: Sequence[float],
    clock: Clock,
    on_step: Callable[[SweepStep, Saturation], None] | None = None,
) -> tuple[list[SweepStep], Saturation]:
    """Open-loop runs at each rate in turn until the saturation point is passed."""
    if not isinstance(plan.load, OpenLoad):
        raise ConfigError("a sweep raises an open-loop rate: use it with --rate, not --users")
    arrivals = plan.load.arrivals
    steps: list[SweepStep] = []
    points: list[SweepPoint] = []
    saturation: Saturation | None = None
    for rate in rates:
        load = OpenLoad(steady(rate), arrivals, f"sweep step: steady {rate:g} req/s, {arrivals}")
        _, report = await run_bench(replace(plan, load=load), clock)
        step = SweepStep(rate, report)
        steps.append(step)
        points.append(SweepPoint.from_report(rate, report))
        saturation = find_saturation(points)
        if on_step is not None:
            on_step(step, saturation)
        if saturation.saturated:
            break
    assert saturation is not None
    return steps, saturation
