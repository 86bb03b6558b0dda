"""`fleetserve bench`: load tests against any OpenAI-compatible endpoint, with honest timing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from fleetserve.bench.lengths import parse_length
from fleetserve.bench.report.compare import compare_table
from fleetserve.bench.report.console import print_summary, progress_line
from fleetserve.bench.report.json_out import load_report
from fleetserve.bench.runner import Progress, run_with_uvloop
from fleetserve.bench.saturation import Saturation
from fleetserve.bench.schedule import Arrivals, read_trace
from fleetserve.bench.session import (
    BenchPlan,
    FleetSourceName,
    Load,
    SweepStep,
    TraceLoad,
    run_bench,
    run_sweep,
    sweep_rates,
    write_outputs,
)
from fleetserve.bench.slo import parse_slos
from fleetserve.bench.tenant_session import TenantsPlan, run_tenants_bench
from fleetserve.bench.tenants import TenantDefaults, make_load, read_tenants, resolve_tenants
from fleetserve.bench.workload import Api, WorkloadSpec, read_dataset
from fleetserve.cli.common import clear_errors, err_console
from fleetserve.clock import RealClock
from fleetserve.config import IDLE_TIMEOUT_S
from fleetserve.errors import ConfigError

EXAMPLES = """Examples:

fleetserve bench --url http://127.0.0.1:8000 --model llama --rate 10 --duration 60

fleetserve bench --url http://127.0.0.1:8000 --model llama
--users spike:base=2,peak=40,at=30,for=60 --duration 150 --slo ttft_p95=2s --out run1

fleetserve bench --url http://127.0.0.1:8000 --model llama --tenants tenants.yaml
--users 10 --duration 120 --out tenants-run

where tenants.yaml lists each tenant with its key and, optionally, its own load and workload:
tenants: [{name: search, key_env: SEARCH_KEY, users: 20},
{name: batch, key: fs-..., rate_rps: 2, stream: false, output_tokens: 512}]

fleetserve bench compare run1/report.json run2/report.json
"""

bench_app = typer.Typer(
    help="Load-test an OpenAI-compatible endpoint: TTFT, ITL, TPOT, goodput, fleet timeline.",
    epilog=EXAMPLES,
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SOURCES: tuple[FleetSourceName, ...] = ("auto", "fleetserve", "prometheus", "none")


def build_load(
    rate: str | None,
    users: str | None,
    trace: Path | None,
    arrivals: str,
    think_time_s: float,
    duration_s: float,
    trace_speedup: float,
) -> Load:
    chosen = [name for name, value in (("--rate", rate), ("--users", users), ("--trace", trace))
              if value is not None]  # fmt: skip
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --rate (open loop), --users (closed loop), --trace")
    if trace is not None:
        entries = read_trace(trace, speedup=trace_speedup)
        return TraceLoad(tuple(entries), f"trace replay of {trace.name} ({len(entries)} requests)")
    return make_load(
        rate, users, arrivals=_arrivals(arrivals), think_time_s=think_time_s,
        duration_s=duration_s,
    )  # fmt: skip


def _arrivals(text: str) -> Arrivals:
    if text not in ("constant", "poisson"):
        raise ConfigError(f"--arrivals is constant or poisson, not {text!r}")
    return "poisson" if text == "poisson" else "constant"


def _live_progress(console: Console, duration_s: float) -> tuple[Live, Callable[[Progress], None]]:
    live = Live(console=console, refresh_per_second=4, transient=True)

    def update(progress: Progress) -> None:
        live.update(progress_line(progress, duration_s))

    return live, update


@bench_app.callback(invoke_without_command=True)
@clear_errors
def bench_command(
    ctx: typer.Context,
    url: str | None = typer.Option(None, "--url", help="Base URL (with or without /v1)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model name to ask for."),
    api_key: str | None = typer.Option(None, envvar="OPENAI_API_KEY", help="Bearer API key."),
    rate: str | None = typer.Option(
        None,
        help="Open loop: req/s, or a pattern (ramp:from=1,to=50,over=60; "
        "spike:base=2,peak=40,at=30,for=60; wave:mean=10,amplitude=8,period=60; "
        "burst:base=1,burst=50,every=30,for=5; stages:30@steady:5;30@steady:20).",
    ),
    users: str | None = typer.Option(
        None, help="Closed loop: concurrent users, or a pattern of users over time."
    ),
    trace: Path | None = typer.Option(None, help="Replay a timestamped CSV/JSONL request file."),
    tenants: Path | None = typer.Option(
        None,
        help="A YAML file of tenants to drive at once, each with its own key (key: or key_env:), "
        "load (rate_rps: or users:) and workload; what a tenant leaves out is this command's "
        "flag. The report gains a per-tenant section.",
    ),
    trace_speedup: float = typer.Option(1.0, min=0.001, help="Replay the trace this much faster."),
    arrivals: str = typer.Option("poisson", help="Open loop arrivals: poisson or constant."),
    think_time: float = typer.Option(0.0, min=0.0, help="Closed loop: seconds between requests."),
    duration: float = typer.Option(60.0, min=0.1, help="Seconds of load."),
    max_requests: int = typer.Option(100_000, min=1, help="Stop after this many requests."),
    api: str = typer.Option("chat", help="chat (/v1/chat/completions) or completions."),
    stream: bool = typer.Option(True, help="Stream responses (TTFT and ITL need it)."),
    prompt_tokens: str = typer.Option(
        "128",
        help="Prompt length: N, uniform:lo=,hi=, "
        "normal:mean=,sd=, lognormal:mean=,sd=, choice:a,b.",
    ),
    output_tokens: str = typer.Option("128", help="Output length (max_tokens), same syntax."),
    shared_prefix: str | None = typer.Option(
        None, help="GROUPS:TOKENS: requests share one of GROUPS system prompts of TOKENS."
    ),
    dataset: Path | None = typer.Option(None, help="Prompts from a JSONL or CSV file."),
    temperature: float | None = typer.Option(None, help="Sampling temperature to send."),
    slo: str | None = typer.Option(
        None, help="SLOs for goodput, e.g. ttft_p95=2s,tpot=100ms,e2e=30s."
    ),
    out: Path | None = typer.Option(
        None, help="Write report.json, report.csv, requests.csv, report.html here."
    ),
    fleet_source: str = typer.Option(
        "auto", help="Sample the fleet from: auto, fleetserve (admin API), prometheus, none."
    ),
    admin_key: str | None = typer.Option(
        None, envvar="FLEETSERVE_ADMIN_KEY", help="Admin key of a fleetserve gateway."
    ),
    timeout: float = typer.Option(
        600.0,
        min=0.1,
        help="Per-request total timeout (s), from send to the last byte, streamed or not; a "
        f"stream also fails after {IDLE_TIMEOUT_S:g} s without a chunk.",
    ),
    seed: int = typer.Option(0, help="Seed for arrivals and prompts."),
    sweep: str | None = typer.Option(
        None,
        help="START:FACTOR:MAX req/s: open-loop runs of --duration each at rising "
        "rates until throughput stops rising or the SLOs break.",
    ),
) -> None:
    """Run a load test and report it; `bench compare A.json B.json` compares two runs (the
    examples are in the command's epilog, `EXAMPLES`)."""
    if ctx.invoked_subcommand is not None:
        return
    if not url or not (model or tenants):
        raise ConfigError("bench needs --url and --model (see fleetserve bench --help)")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must start with http:// or https://, not {url!r}")
    if fleet_source not in SOURCES:
        raise ConfigError(f"--fleet-source is one of {', '.join(SOURCES)}")
    if api not in ("chat", "completions"):
        raise ConfigError(f"--api is chat or completions, not {api!r}")
    api_name: Api = "chat" if api == "chat" else "completions"
    groups = tokens = 0
    if shared_prefix:
        try:
            groups_text, _, tokens_text = shared_prefix.partition(":")
            groups, tokens = int(groups_text), int(tokens_text)
        except ValueError:
            raise ConfigError("--shared-prefix takes GROUPS:TOKENS, e.g. 8:1024") from None
    workload = WorkloadSpec(
        model=model or "",
        api=api_name,
        stream=stream,
        prompt_tokens=parse_length(prompt_tokens),
        output_tokens=parse_length(output_tokens),
        prefix_groups=groups,
        prefix_tokens=tokens,
        dataset=read_dataset(dataset) if dataset else (),
        extra_body={"temperature": temperature} if temperature is not None else {},
    )
    source: FleetSourceName = next(s for s in SOURCES if s == fleet_source)
    options = {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "api": api,
               "seed": str(seed)}  # fmt: skip
    if shared_prefix:
        options["shared_prefix"] = shared_prefix
    if tenants is not None:
        if trace is not None or sweep:
            raise ConfigError("--tenants gives each tenant a rate or users: it does not combine "
                              "with --trace or --sweep")  # fmt: skip
        if rate is not None or users is not None:  # checked here, worded after the flags
            make_load(rate, users, arrivals=_arrivals(arrivals), think_time_s=think_time,
                      duration_s=duration)  # fmt: skip
        defaults = TenantDefaults(
            workload=workload, duration_s=duration, rate=rate, users=users,
            arrivals=_arrivals(arrivals), think_time_s=think_time, api_key=api_key,
            max_requests=max_requests, seed=seed,
        )  # fmt: skip
        resolved = resolve_tenants(read_tenants(tenants), defaults, source=tenants)
        tenants_plan = TenantsPlan(
            url=url, tenants=tuple(resolved), duration_s=duration, source=tenants.name,
            timeout_s=timeout, slos=tuple(parse_slos(slo)) if slo else (),
            fleet_source=source, admin_key=admin_key,
            options={**options, "tenants": tenants.name},
        )  # fmt: skip
        _tenants(tenants_plan, Console(), out)
        return
    load = build_load(rate, users, trace, arrivals, think_time, duration, trace_speedup)
    plan = BenchPlan(
        url=url,
        workload=workload,
        load=load,
        duration_s=duration,
        max_requests=max_requests,
        seed=seed,
        api_key=api_key,
        timeout_s=timeout,
        slos=tuple(parse_slos(slo)) if slo else (),
        fleet_source=source,
        admin_key=admin_key,
        options=options,
    )
    console = Console()
    if sweep:
        _sweep(plan, sweep, console, out)
        return
    err_console.print(f"[bold]fleetserve bench[/]: {load.description}, {duration:g}s -> {url}")
    live, update = _live_progress(err_console, duration)
    with live:
        result, report = run_with_uvloop(run_bench(plan, RealClock(), update))
    print_summary(report, console)
    if out is not None:
        paths = write_outputs(report, result, out)
        err_console.print("wrote " + ", ".join(str(p) for p in paths))


def _tenants(plan: TenantsPlan, console: Console, out: Path | None) -> None:
    names = ", ".join(t.name for t in plan.tenants[:8])
    more = f" +{len(plan.tenants) - 8} more" if len(plan.tenants) > 8 else ""
    err_console.print(
        f"[bold]fleetserve bench[/]: {len(plan.tenants)} tenants ({names}{more}) from "
        f"{escape(plan.source)}, {plan.duration_s:g}s -> {escape(plan.url)}"
    )
    live, update = _live_progress(err_console, plan.duration_s)
    with live:
        result, report = run_with_uvloop(run_tenants_bench(plan, RealClock(), update))
    print_summary(report, console)
    if out is not None:
        paths = write_outputs(report, result, out)
        err_console.print("wrote " + ", ".join(str(p) for p in paths))


def _sweep(plan: BenchPlan, text: str, console: Console, out: Path | None) -> None:
    try:
        start, factor, top = (float(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError("--sweep takes START:FACTOR:MAX, e.g. 2:1.5:200") from None
    rates = sweep_rates(start, factor, top)
    listed = ", ".join(f"{r:g}" for r in rates)
    err_console.print(
        f"[bold]fleetserve bench sweep[/]: up to {len(rates)} steps of "
        f"{plan.duration_s:g}s at {listed} req/s"
    )

    def on_step(step: SweepStep, saturation: Saturation) -> None:
        t = step.report.totals
        p95 = step.report.latency.ttft_s.p95
        err_console.print(
            f"  {step.rate_rps:8.2f} req/s -> {t.request_rate_rps:8.2f} ok req/s, "
            f"TTFT p95 {'-' if p95 is None else f'{p95 * 1000:.0f} ms'}, "
            f"errors {t.error_rate:.1%}"
        )
        if out is not None:
            write_outputs(step.report, None, out / f"rate-{step.rate_rps:g}")

    steps, saturation = run_with_uvloop(run_sweep(plan, rates, RealClock(), on_step))
    table = Table(title="sweep", title_justify="left")
    for column in ("rate asked", "throughput", "TTFT p95", "TPOT p50", "errors", "SLOs"):
        table.add_column(column, justify="right")
    for step in steps:
        r = step.report
        verdicts = [s.passed for s in r.slo.results if s.passed is not None]
        table.add_row(
            f"{step.rate_rps:g}", f"{r.totals.request_rate_rps:.2f}",
            _ms(r.latency.ttft_s.p95), _ms(r.latency.tpot_s.p50), f"{r.totals.error_rate:.1%}",
            "-" if not verdicts else ("pass" if all(verdicts) else "FAIL"),
        )  # fmt: skip
    console.print(table)
    verdict = "saturated" if saturation.saturated else "not saturated"
    point = "-" if saturation.rate_rps is None else f"{saturation.rate_rps:g} req/s"
    console.print(
        f"{verdict}: saturation point {point}, max throughput "
        f"{saturation.max_throughput_rps:.2f} req/s ({saturation.reason})"
    )


def _ms(value_s: float | None) -> str:
    return "-" if value_s is None else f"{value_s * 1000:.1f} ms"


@bench_app.command("compare")
@clear_errors
def compare_command(
    a: Path = typer.Argument(..., help="report.json of run A (or its directory)."),
    b: Path = typer.Argument(..., help="report.json of run B (or its directory)."),
) -> None:
    """Show two runs side by side, with deltas and ratios (B against A).

    Example: fleetserve bench compare before/report.json after/report.json
    """
    first = load_report(a / "report.json" if a.is_dir() else a)
    second = load_report(b / "report.json" if b.is_dir() else b)
    Console().print(compare_table(first, second, str(a), str(b)))
