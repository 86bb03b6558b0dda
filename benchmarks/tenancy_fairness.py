"""Fairness under saturation (issue 10, must-show 5): the gateway's fair queue, measured.

One gateway (`--auth keys`, one worker) in front of simulated engines whose fleet-file entry
has a small `max_concurrency`, so that requests beyond the slots wait in the gateway's hold
queue, released by priority class and then by VTC across tenants (tenancy/fairness.py).
Tenants are created through the admin API, each with its own key; their clients keep them
backlogged (closed loop) for the whole measured span. Service is VTC's unit, input + output
tokens, counted per 60 s window from what each client received (and from the usage ledger's
rows, as a cross-check). Four scenarios, one after the other on the same gateway:

1. equal weights, one tenant with 10x the other's clients: each gets 50% +/- 5 points;
2. weights 1:2:3:4: shares within 5 points of 10/20/30/40%;
3. equal weights in a new spell of saturation: a new tenant fills the fleet first, and the
   10x tenant of scenario 1 (which has a past in the fair queue's counters) is back 2 s
   later, after the queue ran empty: 50% +/- 5 points again, from the first window;
4. an `interactive` tenant at a modest open-loop rate, alone (the idle fleet) and then while a
   `batch` tenant saturates every slot: its TTFT p95 stays within 2x of the idle figure, and
   the batch tenant still completes requests.

    .venv/bin/python -m benchmarks.tenancy_fairness            # about 10 minutes
    .venv/bin/python -m benchmarks.tenancy_fairness --quick    # about 30 s, a smoke run
    flock /tmp/fleetserve-bench.lock .venv/bin/python -m benchmarks.tenancy_fairness

The exit status is 1 if a request failed (an HTTP error, a broken stream), else 0, bounds met
or not (the report says which).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from benchmarks._fairness_load import (
    PhaseResult,
    RequestRecord,
    ServiceLog,
    Shape,
    TenantLoad,
    run_phase,
    ttft_ms,
)
from benchmarks._harness import LOCALHOST, Processes, first_line, sigterm_as_exit
from fleetserve.fleet.processes import free_port
from fleetserve.telemetry.quantiles import percentile_of
from fleetserve.tenancy.model import UsageRow
from fleetserve.tenancy.store import TenancyStore

MODEL = "bench-fair"
READY_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 60.0  # the fleet drains between scenarios within this
LEDGER_TIMEOUT_S = 20.0
SHARE_TOLERANCE_PTS = 5.0
TTFT_RATIO_BOUND = 2.0
REPO_ROOT = Path(__file__).resolve().parents[1]


SHARE_SHAPE = Shape(prompt_words=(100, 300), max_tokens=(32, 96))
INTERACTIVE_SHAPE = Shape(prompt_words=(100, 300), max_tokens=(16, 48))
BATCH_SHAPE = Shape(prompt_words=(100, 300), max_tokens=(64, 128))


@dataclass(frozen=True, slots=True)
class Plan:
    profile: str = "a10g"
    replicas: int = 2
    max_concurrency: int = 8  # per replica: the gateway holds what does not fit
    window_s: float = 60.0
    windows: int = 2
    warmup_s: float = 10.0  # before the first window: the queues fill
    idle_s: float = 45.0  # the interactive tenant alone, for the idle TTFT
    interactive_rps: float = 2.0
    history_s: float = 30.0  # the rejoin scenario's past, when scenario 1 did not run
    rejoin_after_s: float = 2.0
    shape: Shape = SHARE_SHAPE
    interactive_shape: Shape = INTERACTIVE_SHAPE
    batch_shape: Shape = BATCH_SHAPE
    seed: int = 1

    @property
    def slots(self) -> int:
        return self.replicas * self.max_concurrency

    @property
    def light_sessions(self) -> int:
        # More than half the slots: the light tenant alone would take more than its share,
        # so it stays backlogged at 50%.
        return max(2, math.ceil(self.slots * 7 / 8))

    @property
    def weighted_sessions(self) -> int:
        # Above the largest share (40% of the slots) with room to spare.
        return max(2, math.ceil(self.slots * 3 / 4))

    @property
    def rejoin_sessions(self) -> int:
        # Each saturates the fleet alone: the new tenant waits before the other is back.
        return max(2, math.ceil(self.slots * 3 / 2))

    @property
    def batch_sessions(self) -> int:
        return 2 * self.slots

    @property
    def phase_s(self) -> float:
        return self.warmup_s + self.windows * self.window_s + 1.0  # +1: the last bin closes


FULL = Plan()
QUICK = Plan(
    replicas=1,
    max_concurrency=4,
    window_s=4.0,
    windows=1,
    warmup_s=2.0,
    idle_s=4.0,
    interactive_rps=4.0,
    history_s=3.0,
    rejoin_after_s=1.0,
    shape=Shape(prompt_words=(20, 60), max_tokens=(8, 16)),
    interactive_shape=Shape(prompt_words=(20, 60), max_tokens=(4, 8)),
    batch_shape=Shape(prompt_words=(20, 60), max_tokens=(8, 16)),
)


# --- the stack ---------------------------------------------------------------------------


def _fleetserve(python: Path, *args: str) -> list[str]:
    return [str(python), "-m", "fleetserve", *args]


def start_stack(
    procs: Processes, plan: Plan, state_dir: Path, python: Path, gateway_src: Path | None
) -> tuple[str, list[str]]:
    """Sim engines (core 1) and one gateway worker (core 0), ready; (gateway URL, engine URLs)."""
    engines = []
    for i in range(plan.replicas):
        port = free_port()
        argv = _fleetserve(python, "engine", "sim", "--port", str(port), "--model", MODEL,
                           "--profile", plan.profile, "--cold-start-s", "0")  # fmt: skip
        engines.append((procs.start(f"engine{i}", argv, core=1), f"http://{LOCALHOST}:{port}"))
    for proc, url in engines:
        proc.wait_ready(url + "/health", READY_TIMEOUT_S)
    fleet = state_dir / "fleet.yaml"
    replicas = ", ".join(url for _, url in engines)
    # Held requests may wait a long time behind a 10x tenant: the hold bound is raised so
    # that only the fair order decides who waits, never a timeout.
    fleet.write_text(
        f"models:\n  - name: {MODEL}\n    engine: sim\n    replicas: [{replicas}]\n"
        f"    max_concurrency: {plan.max_concurrency}\n"
        "gateway:\n  hold: {timeout_s: 600, max_held: 5000}\n"
        "  timeouts: {first_byte_s: 600}\n"
    )
    port = free_port()
    argv = _fleetserve(python, "gateway", "--port", str(port), "--fleet-file", str(fleet),
                       "--auth", "keys")  # fmt: skip
    env = {"FLEETSERVE_STATE_DIR": str(state_dir), "FLEETSERVE_KEY_PEPPER": "bench-fairness"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FLEETSERVE_")}, **env}
    if gateway_src is not None:
        env["PYTHONPATH"] = str(gateway_src)
    gateway = procs.start("gateway", argv, core=0, env=env)
    url = f"http://{LOCALHOST}:{port}"
    gateway.wait_ready(url + "/ready", READY_TIMEOUT_S)
    return url, [u for _, u in engines]


async def create_tenant(
    http: aiohttp.ClientSession, url: str, name: str, weight: float, priority: str
) -> str:
    """A tenant and a key of its own (the admin API on loopback needs no admin key)."""
    body = {"name": name, "weight": weight, "priority": priority}
    async with http.post(url + "/admin/tenants", json=body) as answer:
        if answer.status != 201:
            raise RuntimeError(f"creating tenant {name}: {answer.status} {await answer.text()}")
    async with http.post(url + "/admin/keys", json={"tenant": name}) as answer:
        if answer.status != 201:
            raise RuntimeError(f"creating a key of {name}: {answer.status} {await answer.text()}")
        key = (await answer.json())["key"]
    assert isinstance(key, str)
    return key


async def wait_idle(http: aiohttp.ClientSession, engines: Sequence[str]) -> None:
    """Until no engine runs or queues a request (what the last phase left is cancelled)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        busy = 0.0
        for engine in engines:
            async with http.get(engine + "/metrics") as answer:
                text = await answer.text()
            for line in text.splitlines():
                if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                    busy += float(line.rsplit(" ", 1)[1])
        if busy == 0:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the engines did not go idle within {IDLE_TIMEOUT_S:.0f} s")


async def ledger_rows(state_dir: Path, since: float, tenants: Sequence[str]) -> list[UsageRow]:
    """The ledger's rows of `tenants` started at `since` or later, once the count stops
    growing (rows are written in batches every 250 ms)."""
    store = await TenancyStore.open(None, state_dir, upgrade=False)
    try:
        deadline = time.monotonic() + LEDGER_TIMEOUT_S
        last = -1
        rows: list[UsageRow] = []
        while time.monotonic() < deadline:
            rows = [r for r in await store.usage_rows(since=since) if r.tenant in tenants]
            if len(rows) == last:
                return rows
            last = len(rows)
            await asyncio.sleep(0.5)  # two ledger batches
        return rows
    finally:
        await store.close()


# --- scenarios ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantSpec:
    name: str
    weight: float
    priority: str
    sessions: int
    shape: Shape
    start_after_s: float = 0.0
    note: str = ""


@dataclass
class WindowShare:
    start_s: float  # from the phase start
    tenant: str
    tokens: int
    share: float  # of the window's tokens, 0..1
    target: float
    ledger_share: float | None
    waiting_mean: float
    waiting_frac: float

    @property
    def deviation_pts(self) -> float:
        return 100.0 * (self.share - self.target)


@dataclass
class ShareReport:
    title: str
    tenants: list[TenantSpec]
    windows: list[WindowShare] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)
    usage_mismatches: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def worst_pts(self) -> float:
        return max((abs(w.deviation_pts) for w in self.windows), default=math.inf)

    @property
    def met(self) -> bool:
        return bool(self.windows) and self.worst_pts <= SHARE_TOLERANCE_PTS


@dataclass
class PriorityReport:
    interactive: str
    batch: str
    idle: dict[str, float | None] = field(default_factory=dict)  # p50/p95/p99 ms, n
    loaded: list[dict[str, float | None]] = field(default_factory=list)  # per window
    loaded_all: dict[str, float | None] = field(default_factory=dict)
    batch_done: list[int] = field(default_factory=list)  # per window
    batch_tokens_s: list[float] = field(default_factory=list)
    interactive_share: list[float] = field(default_factory=list)
    # From the ledger's rows of the interactive tenant: the wait in the gateway's hold queue
    # (queue_s) and the rest of TTFT (ttft_s - queue_s: the engine's prefill and step), ms.
    split: dict[str, dict[str, float | None]] = field(default_factory=dict)
    slot_gap_ms: float | None = None  # measured span / requests finished in it
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        idle, loaded = self.idle.get("p95"), self.loaded_all.get("p95")
        return None if idle is None or loaded is None or idle <= 0 else loaded / idle

    @property
    def met(self) -> bool:
        ratio = self.ratio
        progressed = bool(self.batch_done) and all(n > 0 for n in self.batch_done)
        return ratio is not None and ratio <= TTFT_RATIO_BOUND and progressed


def _window_starts(plan: Plan) -> list[float]:
    return [plan.warmup_s + i * plan.window_s for i in range(plan.windows)]


def _merge_errors(into: dict[str, int], result: PhaseResult) -> None:
    for kind, n in result.errors().items():
        into[kind] = into.get(kind, 0) + n


async def share_scenario(
    http: aiohttp.ClientSession,
    url: str,
    state_dir: Path,
    plan: Plan,
    title: str,
    specs: list[TenantSpec],
    keys: dict[str, str],
) -> ShareReport:
    """Every tenant of `specs` backlogged at once (each from its `start_after_s`); a tenant
    already in `keys` is not created again (it keeps its history in the fair queue)."""
    loads = []
    for i, spec in enumerate(specs):
        key = keys.get(spec.name)
        if key is None:
            key = keys[spec.name] = await create_tenant(
                http, url, spec.name, spec.weight, spec.priority
            )
        loads.append(TenantLoad(spec.name, key, spec.shape, sessions=spec.sessions,
                                start_after_s=spec.start_after_s,
                                seed=plan.seed + 100 * len(keys) + i))  # fmt: skip
    t0 = time.time()
    log = ServiceLog(t0)
    result = await run_phase(url, MODEL, loads, plan.phase_s, log)
    names = [s.name for s in specs]
    rows = await ledger_rows(state_dir, t0 - 1.0, names)
    report = ShareReport(title, specs)
    _merge_errors(report.errors, result)
    total_weight = sum(s.weight for s in specs)
    for start in _window_starts(plan):
        end = start + plan.window_s
        served = {n: log.served(n, start, end) for n in names}
        total = sum(served.values()) or 1
        ledger = dict.fromkeys(names, 0)
        for row in rows:
            if t0 + start <= row.ended_at < t0 + end:
                ledger[row.tenant] += row.prompt_tokens + row.completion_tokens
        ledger_total = sum(ledger.values())
        for spec in specs:
            mean, frac = log.waiting(spec.name, start, end)
            report.windows.append(
                WindowShare(
                    start, spec.name, served[spec.name], served[spec.name] / total,
                    spec.weight / total_weight,
                    ledger[spec.name] / ledger_total if ledger_total else None, mean, frac,
                )
            )  # fmt: skip
    for name in names:
        done = [r for r in result.by_tenant(name) if r.ok]
        report.requests[name] = len(done)
        report.usage_mismatches += sum(
            1 for r in done if r.usage is not None and r.usage != (r.prompt_tokens, r.output_tokens)
        )
    return report


async def rejoin_scenario(
    http: aiohttp.ClientSession,
    url: str,
    state_dir: Path,
    plan: Plan,
    keys: dict[str, str],
    engines: Sequence[str],
) -> ShareReport:
    """A tenant with a past (eq-heavy, served half of scenario 1; or rj-past, alone for
    `history_s` first) comes back after the queue ran empty, just after a new tenant that
    saturates the fleet on its own: both backlogged, equal weights, 50/50 from the start."""
    past = "eq-heavy" if "eq-heavy" in keys else "rj-past"
    if past not in keys:
        keys[past] = await create_tenant(http, url, past, 1, "standard")
        history = TenantLoad(past, keys[past], plan.shape, sessions=plan.rejoin_sessions,
                             seed=plan.seed + 50)  # fmt: skip
        await run_phase(url, MODEL, [history], plan.history_s, ServiceLog(time.time()))
        await wait_idle(http, engines)
    n = plan.rejoin_sessions
    specs = [
        TenantSpec("rj-new", 1, "standard", n, plan.shape, note="new, first to wait"),
        TenantSpec(past, 1, "standard", n, plan.shape, start_after_s=plan.rejoin_after_s,
                   note=f"has a past, back after {plan.rejoin_after_s:g} s"),
    ]  # fmt: skip
    title = "equal weights, a new spell of saturation: a new tenant first, then one with a past"
    return await share_scenario(http, url, state_dir, plan, title, specs, keys)


def _ttft_split(rows: Sequence[UsageRow], lo: float, hi: float) -> dict[str, float | None]:
    """p50/p95 of the hold-queue wait and of the rest of TTFT, ms, of rows started in
    [lo, hi)."""
    picked = [r for r in rows if lo <= r.started_at < hi and r.ttft_s is not None]
    held = [r.queue_s for r in picked]
    rest = [r.ttft_s - r.queue_s for r in picked if r.ttft_s is not None]

    def ms(values: Sequence[float], pct: float) -> float | None:
        value = percentile_of(values, pct)
        return None if value is None else value * 1000.0

    return {"held_p50": ms(held, 50), "held_p95": ms(held, 95),
            "rest_p50": ms(rest, 50), "rest_p95": ms(rest, 95)}  # fmt: skip


async def priority_scenario(
    http: aiohttp.ClientSession, url: str, state_dir: Path, plan: Plan, engines: Sequence[str]
) -> PriorityReport:
    inter_key = await create_tenant(http, url, "inter", 1.0, "interactive")
    batch_key = await create_tenant(http, url, "batch", 1.0, "batch")
    inter = TenantLoad("inter", inter_key, plan.interactive_shape,
                       rate_rps=plan.interactive_rps, seed=plan.seed + 10)  # fmt: skip
    report = PriorityReport("inter", "batch")
    # Idle fleet: the interactive tenant alone.
    idle_t0 = time.time()
    idle_log = ServiceLog(idle_t0)
    idle = await run_phase(url, MODEL, [inter], plan.idle_s, idle_log)
    _merge_errors(report.errors, idle)
    report.idle = _ttft_figures(idle.by_tenant("inter"))
    await wait_idle(http, engines)
    # The batch tenant saturates the fleet from the start; the interactive one comes in at
    # the same rate once the batch backlog has formed.
    batch = TenantLoad("batch", batch_key, plan.batch_shape, sessions=plan.batch_sessions,
                       seed=plan.seed + 11)  # fmt: skip
    loaded_inter = dataclasses.replace(inter, start_after_s=plan.warmup_s, seed=plan.seed + 12)
    t0 = time.time()
    log = ServiceLog(t0)
    loaded = await run_phase(url, MODEL, [batch, loaded_inter], plan.phase_s, log)
    _merge_errors(report.errors, loaded)
    measured = []
    for start in _window_starts(plan):
        end = start + plan.window_s
        in_window = [r for r in loaded.by_tenant("inter") if t0 + start <= r.sched_wall < t0 + end]
        measured += in_window
        report.loaded.append(_ttft_figures(in_window))
        done = [
            r for r in loaded.by_tenant("batch")
            if r.ok and r.end_wall is not None and t0 + start <= r.end_wall < t0 + end
        ]  # fmt: skip
        report.batch_done.append(len(done))
        batch_tokens = log.served("batch", start, end)
        inter_tokens = log.served("inter", start, end)
        report.batch_tokens_s.append(batch_tokens / plan.window_s)
        report.interactive_share.append(inter_tokens / max(1, batch_tokens + inter_tokens))
    report.loaded_all = _ttft_figures(measured)
    span_lo, span_hi = t0 + plan.warmup_s, t0 + plan.warmup_s + plan.windows * plan.window_s
    finished = sum(
        1
        for r in loaded.records
        if r.ok and r.end_wall is not None and span_lo <= r.end_wall < span_hi
    )
    if finished:
        report.slot_gap_ms = 1000.0 * (span_hi - span_lo) / finished
    rows = await ledger_rows(state_dir, idle_t0 - 1.0, ["inter"])
    report.split = {
        "idle": _ttft_split(rows, idle_t0, idle_t0 + plan.idle_s),
        "loaded": _ttft_split(rows, span_lo, span_hi),
    }
    return report


def _ttft_figures(records: Sequence[RequestRecord]) -> dict[str, float | None]:
    ok = [r for r in records if r.error is None and r.ttft_s is not None]
    return {
        "n": float(len(ok)),
        "p50": ttft_ms(ok, 50),
        "p95": ttft_ms(ok, 95),
        "p99": ttft_ms(ok, 99),
    }


# --- rendering ---------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render_share(report: ShareReport, plan: Plan, number: int) -> str:
    lines = [f"\n{number}. {report.title}"]
    for spec in report.tenants:
        lines.append(
            f"   {spec.name:<9} weight {spec.weight:g}, {spec.priority}, "
            f"{spec.sessions} closed-loop clients, {spec.shape.describe()}"
            f"{'; ' + spec.note if spec.note else ''}; "
            f"{report.requests.get(spec.name, 0)} requests completed"
        )
    lines.append(
        f"   {'window':<12} {'tenant':<9} {'tokens':>8} {'share':>7} {'target':>7} "
        f"{'dev pts':>8} {'ledger':>7} {'waiting':>8} {'backlogged':>10}"
    )
    for w in report.windows:
        span = f"{w.start_s - plan.warmup_s:.0f}-{w.start_s - plan.warmup_s + plan.window_s:.0f} s"
        ledger = "-" if w.ledger_share is None else f"{100 * w.ledger_share:.1f}%"
        lines.append(
            f"   {span:<12} {w.tenant:<9} {w.tokens:>8,} {100 * w.share:>6.1f}% "
            f"{100 * w.target:>6.1f}% {w.deviation_pts:>+8.1f} {ledger:>7} "
            f"{w.waiting_mean:>8.1f} {100 * w.waiting_frac:>9.0f}%"
        )
    verdict = "met" if report.met else "MISSED"
    lines.append(
        f"   [{verdict:>6}] every tenant within +/-{SHARE_TOLERANCE_PTS:g} points of its target "
        f"in every window: worst {report.worst_pts:.1f} points"
    )
    if report.usage_mismatches:
        lines.append(f"   note: {report.usage_mismatches} answers whose usage differs from the "
                     "client's own count")  # fmt: skip
    if report.errors:
        lines.append(f"   errors: {report.errors}")
    return "\n".join(lines)


def render_priority(report: PriorityReport, plan: Plan, number: int) -> str:
    lines = [
        f"\n{number}. priority: `{report.interactive}` (interactive, Poisson "
        f"{plan.interactive_rps:g} req/s, {plan.interactive_shape.describe()}) alone, then "
        f"while `{report.batch}` (batch, {plan.batch_sessions} closed-loop clients, "
        f"{plan.batch_shape.describe()}) saturates the {plan.slots} slots",
        f"   {'phase':<22} {'requests':>8} {'TTFT p50':>9} {'p95':>7} {'p99':>7} "
        f"{'batch done':>10} {'batch tok/s':>11} {'inter share':>11}",
    ]

    def row(label: str, figs: dict[str, float | None], extra: str = "") -> str:
        n = figs.get("n") or 0
        return (
            f"   {label:<22} {n:>8.0f} {_ms(figs.get('p50')):>9} {_ms(figs.get('p95')):>7} "
            f"{_ms(figs.get('p99')):>7} {extra}"
        ).rstrip()

    lines.append(row(f"idle fleet ({plan.idle_s:.0f} s)", report.idle))
    for i, figs in enumerate(report.loaded):
        start = i * plan.window_s
        extra = (
            f"{report.batch_done[i]:>10} {report.batch_tokens_s[i]:>11.0f} "
            f"{100 * report.interactive_share[i]:>10.1f}%"
        )
        lines.append(row(f"under batch {start:.0f}-{start + plan.window_s:.0f} s", figs, extra))
    lines.append(row("under batch, all", report.loaded_all))
    for phase, label in (("idle", "idle fleet"), ("loaded", "under batch")):
        split = report.split.get(phase, {})
        lines.append(
            f"   ledger, {label:<12}: held at the gateway p50/p95 {_ms(split.get('held_p50'))}"
            f"/{_ms(split.get('held_p95'))} ms; rest of TTFT (engine) p50/p95 "
            f"{_ms(split.get('rest_p50'))}/{_ms(split.get('rest_p95'))} ms"
        )
    if report.slot_gap_ms is not None:
        lines.append(
            f"   under batch a slot frees every {report.slot_gap_ms:.0f} ms on average (requests "
            "finished / measured span): what a held interactive request waits for"
        )
    ratio = report.ratio
    idle95, loaded95 = report.idle.get("p95"), report.loaded_all.get("p95")
    shown = "-" if ratio is None else f"{ratio:.2f}x"
    met = ratio is not None and ratio <= TTFT_RATIO_BOUND
    lines.append(
        f"   [{'met' if met else 'MISSED':>6}] interactive TTFT p95 under batch <= "
        f"{TTFT_RATIO_BOUND:g}x idle: {_ms(loaded95)} ms vs {_ms(idle95)} ms idle ({shown})"
    )
    progressed = bool(report.batch_done) and all(n > 0 for n in report.batch_done)
    lines.append(
        f"   [{'met' if progressed else 'MISSED':>6}] the batch tenant progresses: "
        f"{', '.join(str(n) for n in report.batch_done)} requests completed per window"
    )
    if report.errors:
        lines.append(f"   errors: {report.errors}")
    return "\n".join(lines)


def machine_facts(plan: Plan, gateway_src: Path | None) -> str:
    load1, _, _ = os.getloadavg()
    commit = first_line(["git", "rev-parse", "--short", "HEAD"])
    if gateway_src is not None:
        checkout = gateway_src.parent
        commit = first_line(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"])
        commit += f", from {gateway_src}"
    return "\n".join(
        [
            f"machine : {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"python {platform.python_version()}, load average {load1:.2f} at start",
            f"gateway : commit {commit}, 1 worker, --auth keys, SQLite ledger; gateway on "
            "core 0, engines and clients on core 1",
            f"fleet   : {plan.replicas} sim engines (SIMULATED, profile {plan.profile}), "
            f"max_concurrency {plan.max_concurrency} each: {plan.slots} slots; beyond them "
            "requests wait in the gateway's hold queue",
            f"windows : {plan.windows} x {plan.window_s:g} s per scenario after a "
            f"{plan.warmup_s:g} s warm-up; service = prompt + output tokens (VTC's unit)",
        ]
    )


# --- main --------------------------------------------------------------------------------


SCENARIOS = ("equal", "weights", "rejoin", "priority")


async def run_all(
    url: str, engines: Sequence[str], state_dir: Path, plan: Plan, which: Sequence[str],
    say: Callable[[str], None],
) -> tuple[list[ShareReport], PriorityReport | None]:  # fmt: skip
    shares: list[ShareReport] = []
    priority = None
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        keys: dict[str, str] = {}
        light = plan.light_sessions
        if "equal" in which:
            say("  equal weights, 10x load ...")
            specs = [
                TenantSpec("eq-light", 1, "standard", light, plan.shape),
                TenantSpec("eq-heavy", 1, "standard", 10 * light, plan.shape),
            ]
            title = "equal weights, one tenant with 10x the other's clients"
            shares.append(await share_scenario(http, url, state_dir, plan, title, specs, keys))
            await wait_idle(http, engines)
        if "weights" in which:
            say("  weights 1:2:3:4 ...")
            n = plan.weighted_sessions
            specs = [TenantSpec(f"w{w}", w, "standard", n, plan.shape) for w in (1, 2, 3, 4)]
            title = "weights 1:2:3:4"
            shares.append(await share_scenario(http, url, state_dir, plan, title, specs, keys))
            await wait_idle(http, engines)
        if "rejoin" in which:
            say("  equal weights, a new spell of saturation ...")
            shares.append(await rejoin_scenario(http, url, state_dir, plan, keys, engines))
            await wait_idle(http, engines)
        if "priority" in which:
            say("  priority: interactive vs batch ...")
            priority = await priority_scenario(http, url, state_dir, plan, engines)
    return shares, priority


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="smoke run: small fleet, short windows")
    ap.add_argument("--window-s", type=float, help="window length (default 60; quick 4)")
    ap.add_argument("--windows", type=int, help="windows per scenario (default 2; quick 1)")
    ap.add_argument("--warmup-s", type=float, help="before the first window (default 10)")
    ap.add_argument("--idle-s", type=float, help="idle-fleet TTFT phase (default 45)")
    ap.add_argument("--profile", choices=("a10g", "l4", "h100"), help="sim engine profile")
    ap.add_argument("--replicas", type=int, help="sim engines (default 2)")
    ap.add_argument("--max-concurrency", type=int, help="per replica (default 8)")
    ap.add_argument("--interactive-rps", type=float, help="interactive tenant's rate")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)}")  # fmt: skip
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    ap.add_argument(
        "--gateway-src",
        type=Path,
        help="run the gateway (only) from another checkout's src/, e.g. a `git worktree` of an "
        "older commit, to compare two versions of the fair queue in turn",
    )
    args = ap.parse_args(argv)
    which = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(which) - set(SCENARIOS))
    if unknown or not which:
        ap.error(f"--scenarios: choose from {', '.join(SCENARIOS)}, not {', '.join(unknown)}")
    args.which = which
    if args.gateway_src is not None and not (args.gateway_src / "fleetserve").is_dir():
        ap.error(f"--gateway-src: {args.gateway_src} holds no fleetserve package")
    checks = [("--window-s", args.window_s, 1.0, 600.0), ("--windows", args.windows, 1, 10),
              ("--warmup-s", args.warmup_s, 0.0, 300.0), ("--idle-s", args.idle_s, 1.0, 600.0),
              ("--replicas", args.replicas, 1, 8),
              ("--max-concurrency", args.max_concurrency, 1, 256),
              ("--interactive-rps", args.interactive_rps, 0.1, 100.0)]  # fmt: skip
    for name, value, low, high in checks:
        if value is not None and not low <= value <= high:
            ap.error(f"{name} must be between {low:g} and {high:g}")
    return args


def plan_of(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    overrides = {
        "window_s": args.window_s, "windows": args.windows, "warmup_s": args.warmup_s,
        "idle_s": args.idle_s, "profile": args.profile, "replicas": args.replicas,
        "max_concurrency": args.max_concurrency, "interactive_rps": args.interactive_rps,
    }  # fmt: skip
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    plan = plan_of(args)
    os.sched_setaffinity(0, {1})  # the clients share core 1 with the engines

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    print("tenancy_fairness: the gateway's fair queue under saturation (issue 10, must-show 5)")
    print(time.strftime("date    : %Y-%m-%d %H:%M:%S %Z"))
    print(machine_facts(plan, args.gateway_src), flush=True)
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="tenancy-fairness-") as tmp:
        workdir = Path(tmp)
        with Processes(workdir) as procs:
            say("starting the sim engines and the gateway ...")
            try:
                url, engines = start_stack(
                    procs, plan, workdir, Path(sys.executable), args.gateway_src
                )
                shares, priority = asyncio.run(
                    run_all(url, engines, workdir, plan, args.which, say)
                )
            except (RuntimeError, aiohttp.ClientError, OSError) as exc:
                # StartError is a RuntimeError and carries the process's log: its last lines.
                lines = str(exc).strip().splitlines()
                print(f"tenancy_fairness: {lines[0] if lines else type(exc).__name__}",
                      file=sys.stderr)  # fmt: skip
                for line in lines[1:][-5:]:
                    print(f"  {line}", file=sys.stderr)
                return 2
    number = 0
    for report in shares:
        number += 1
        print(render_share(report, plan, number))
    if priority is not None:
        print(render_priority(priority, plan, number + 1))
    errors = sum(sum(r.errors.values()) for r in shares)
    errors += sum(priority.errors.values()) if priority is not None else 0
    met = all(r.met for r in shares) and (priority is None or priority.met)
    print(f"\nall bounds met: {'yes' if met else 'NO'}; failed requests: {errors}")
    if args.json:
        data = {
            "plan": dataclasses.asdict(plan),
            "shares": [dataclasses.asdict(r) for r in shares],
            "priority": None if priority is None else dataclasses.asdict(priority),
            "met": met,
        }
        args.json.write_text(json.dumps(data, indent=2))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
