"""The console: a live progress line while bench runs, then the summary tables (rich)."""

from __future__ import annotations

from typing import Protocol

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fleetserve.bench.report.fmt import count, frac, ms, num
from fleetserve.bench.report.model import BenchReport, Percentiles, TenantSummary
from fleetserve.bench.stats import LAG_THRESHOLD_S

SIMULATION = "SIMULATION - figures from a simulated engine's latency model, not from hardware"


class ProgressCounters(Protocol):
    """What the live line reads: `fleetserve.bench.runner.Progress` has these fields."""

    @property
    def t_s(self) -> float: ...  # seconds since the run's start
    @property
    def sent(self) -> int: ...
    @property
    def done(self) -> int: ...  # finished, ok or not
    @property
    def ok(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def rate_rps(self) -> float: ...  # completions per second, recently
    @property
    def lag_p99_s(self) -> float | None: ...  # None: nothing sent yet


def progress_line(
    progress: ProgressCounters,
    duration_s: float | None = None,
    lag_threshold_s: float = LAG_THRESHOLD_S,
) -> Text:
    """One line: elapsed (and share of `duration_s`), counts, rate, and the schedule lag,
    red once it passes the threshold the final verdict uses."""
    p = progress
    line = Text()
    line.append(f"{p.t_s:7.1f}s", style="bold")
    if duration_s:
        line.append(f"/{duration_s:g}s {min(p.t_s / duration_s, 1):4.0%}")
    line.append(f"  sent {p.sent:,}  done {p.done:,}  ")
    line.append(f"ok {p.ok:,}", style="green")
    line.append("  ")
    line.append(f"errors {p.errors:,}", style="red" if p.errors else "")
    line.append(f"  in flight {p.in_flight:,}  {p.rate_rps:,.1f} req/s  lag p99 ")
    if p.lag_p99_s is None:
        line.append("-")
    else:
        late = p.lag_p99_s > lag_threshold_s
        line.append(f"{ms(p.lag_p99_s)} ms", style="bold red" if late else "")
    return line


def _latency_table(report: BenchReport) -> Table:
    table = Table(title="Latency (ms), successful requests", title_justify="left")
    table.add_column("metric")
    for name in ("count", "mean", "min", "p50", "p90", "p95", "p99", "max"):
        table.add_column(name, justify="right")
    lat = report.latency
    rows: list[tuple[str, Percentiles]] = [
        ("TTFT", lat.ttft_s),
        ("TPOT", lat.tpot_s),
        ("ITL", lat.itl_s),
        ("e2e", lat.e2e_s),
    ]
    for name, p in rows:
        values = (p.mean, p.min, p.p50, p.p90, p.p95, p.p99, p.max)
        table.add_row(name, count(p.count), *(ms(v) for v in values))
    return table


def _totals_table(report: BenchReport) -> Table:
    t = report.totals
    table = Table(title="Totals", title_justify="left", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("requests (ok / errors)", f"{t.requests:,} ({t.ok:,} / {t.errors:,})")
    table.add_row("error rate", frac(t.error_rate))
    table.add_row("measured window", f"{t.window_s:.2f} s")
    table.add_row("throughput", f"{num(t.request_rate_rps)} req/s")
    table.add_row("sent", f"{num(t.sent_rate_rps)} req/s")
    table.add_row("output tokens", f"{num(t.output_token_rate_tps)} tok/s")
    table.add_row("total tokens", f"{num(t.total_token_rate_tps)} tok/s")
    goodput = report.slo.goodput
    if goodput is not None:
        table.add_row("goodput", f"{num(goodput.rate_rps)} req/s ({frac(goodput.attainment)})")
    return table


def _slo_table(report: BenchReport) -> Table | None:
    if not report.slo.results:
        return None
    table = Table(title="SLOs", title_justify="left")
    for name in ("objective", "observed", "met", "verdict"):
        table.add_column(name, justify="left" if name == "objective" else "right")
    for result in report.slo.results:
        observed = "-" if result.observed_s is None else f"{ms(result.observed_s)} ms"
        met = "-" if result.met is None else f"{result.met:,}/{report.totals.requests:,}"
        verdict = {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "no data"}
        table.add_row(result.spec.text, observed, met, verdict[result.passed])
    return table


def _errors_table(report: BenchReport) -> Table | None:
    if not report.errors.examples:
        return None
    table = Table(title="Errors (most frequent first)", title_justify="left")
    for name in ("kind", "status", "count", "message"):
        table.add_column(name, justify="right" if name == "count" else "left")
    for example in report.errors.examples:
        status = "-" if example.status is None else str(example.status)
        table.add_row(example.kind, status, f"{example.count:,}", example.message)
    return table


def tenant_key(tenant: TenantSummary) -> str:
    """How a tenant's key is named: its public prefix and where it came from, never itself."""
    source = {"key": "file", "none": "no key"}.get(tenant.key_source, tenant.key_source)
    if tenant.key_prefix is None:
        return source
    return f"{tenant.key_prefix} ({source})"


def rejected_text(tenant: TenantSummary) -> str:
    """`rate_limit_exceeded 10, insufficient_quota 2`, or `-`."""
    reasons = tenant.rejected_by_reason
    return ", ".join(f"{code} {n:,}" for code, n in reasons.items()) if reasons else "-"


def remaining_text(tenant: TenantSummary) -> str:
    """The last x-ratelimit-remaining requests / tokens, `-` where none came."""
    requests, tokens = tenant.ratelimit_remaining_requests, tenant.ratelimit_remaining_tokens
    if requests is None and tokens is None:
        return "-"
    return f"{count(requests)} / {count(tokens)}"


TENANT_COLUMNS = (
    "tenant", "key", "model", "load", "sent", "ok", "rejected", "errors", "rejected by reason",
    "remaining req / tok", "tokens in", "tokens out", "output share", "TTFT p50", "TTFT p95",
    "e2e p95", "req/s", "tok/s",
)  # fmt: skip
TENANT_TEXT_COLUMNS = frozenset(("tenant", "key", "model", "load", "rejected by reason"))
# The console splits the section into narrower tables; HTML shows it whole.
_CONSOLE_TABLES = (
    ("Tenants", ("tenant", "key", "model", "load")),
    ("Tenants: requests (rejected: refused by the target's admission, by error code; "
     "remaining: the last x-ratelimit-remaining-* seen)",
     ("tenant", "sent", "ok", "rejected", "errors", "rejected by reason", "remaining req / tok")),
    ("Tenants: tokens and latency (ms, of ok requests)",
     ("tenant", "tokens in", "tokens out", "output share", "TTFT p50", "TTFT p95", "e2e p95",
      "req/s", "tok/s")),
)  # fmt: skip


def tenant_rows(report: BenchReport) -> list[dict[str, str]]:
    """The per-tenant section as text cells by TENANT_COLUMNS, for the console and HTML."""
    return [
        {
            "tenant": t.name, "key": tenant_key(t), "model": t.model, "load": t.load,
            "sent": f"{t.requests:,}", "ok": f"{t.ok:,}", "rejected": f"{t.rejected:,}",
            "errors": f"{t.errors:,}", "rejected by reason": rejected_text(t),
            "remaining req / tok": remaining_text(t), "tokens in": f"{t.prompt_tokens:,}",
            "tokens out": f"{t.output_tokens:,}", "output share": frac(t.output_share_frac),
            "TTFT p50": ms(t.ttft_p50_s), "TTFT p95": ms(t.ttft_p95_s),
            "e2e p95": ms(t.e2e_p95_s), "req/s": num(t.request_rate_rps),
            "tok/s": num(t.output_token_rate_tps),
        }
        for t in report.tenants
    ]  # fmt: skip


def _tenant_tables(report: BenchReport) -> list[Table]:
    if not report.tenants:
        return []
    rows = tenant_rows(report)
    tables = []
    for title, columns in _CONSOLE_TABLES:
        table = Table(title=title, title_justify="left")
        for name in columns:
            table.add_column(name, justify="left" if name in TENANT_TEXT_COLUMNS else "right")
        for row in rows:
            table.add_row(*(row[name] for name in columns))
        tables.append(table)
    return tables


def summary(report: BenchReport) -> Group:
    """The end-of-run summary as rich renderables."""
    config = report.config
    parts: list[RenderableType] = []
    if config.simulated:
        parts.append(Panel(Text(SIMULATION, style="bold black on yellow")))
    parts.append(Text(f"{config.url}  model {config.model}  {config.load}", style="bold"))
    parts.extend([_totals_table(report), _latency_table(report)])
    parts.extend(_tenant_tables(report))
    parts.extend(table for table in (_slo_table(report), _errors_table(report)) if table)
    lag_style = "green" if report.lag.kept_up else "bold red"
    parts.append(Text(report.lag.message, style=lag_style))
    for note in report.notes:
        if note != report.lag.message:
            parts.append(Text(f"note: {note}", style="yellow"))
    return Group(*parts)


def print_summary(report: BenchReport, console: Console) -> None:
    console.print(summary(report))
