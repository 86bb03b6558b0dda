"""`fleetserve bench compare A.json B.json`: two runs' key figures side by side."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.table import Table

from fleetserve.bench.report.fmt import num
from fleetserve.bench.report.model import BenchReport


@dataclass(frozen=True, slots=True)
class CompareRow:
    name: str
    unit: str
    a: float | None
    b: float | None
    higher_is_better: bool

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def ratio(self) -> float | None:
        """b / a; None when either is unknown or a is 0."""
        return None if self.a is None or self.b is None or self.a == 0 else self.b / self.a

    @property
    def better(self) -> bool | None:
        """Whether B is better than A on this figure (None: same or unknown)."""
        delta = self.delta
        if delta is None or delta == 0:
            return None
        return (delta > 0) is self.higher_is_better


_Get = Callable[[BenchReport], float | None]


def _ms(get: Callable[[BenchReport], float | None]) -> _Get:
    def read(report: BenchReport) -> float | None:
        value = get(report)
        return None if value is None else value * 1e3

    return read


def _goodput(report: BenchReport) -> float | None:
    goodput = report.slo.goodput
    return None if goodput is None else goodput.rate_rps


# Each figure: its name, unit, how to read it from a report, and whether higher is better.
FIGURES: tuple[tuple[str, str, _Get, bool], ...] = (
    ("requests", "", lambda r: r.totals.requests, True),
    ("throughput", "req/s", lambda r: r.totals.request_rate_rps, True),
    ("goodput", "req/s", _goodput, True),
    ("output tokens", "tok/s", lambda r: r.totals.output_token_rate_tps, True),
    ("error rate", "%", lambda r: r.totals.error_rate * 100, False),
    ("TTFT p50", "ms", _ms(lambda r: r.latency.ttft_s.p50), False),
    ("TTFT p95", "ms", _ms(lambda r: r.latency.ttft_s.p95), False),
    ("TTFT p99", "ms", _ms(lambda r: r.latency.ttft_s.p99), False),
    ("TPOT p50", "ms", _ms(lambda r: r.latency.tpot_s.p50), False),
    ("TPOT p99", "ms", _ms(lambda r: r.latency.tpot_s.p99), False),
    ("ITL p50", "ms", _ms(lambda r: r.latency.itl_s.p50), False),
    ("ITL p99", "ms", _ms(lambda r: r.latency.itl_s.p99), False),
    ("e2e p50", "ms", _ms(lambda r: r.latency.e2e_s.p50), False),
    ("e2e p99", "ms", _ms(lambda r: r.latency.e2e_s.p99), False),
    ("send lag p99", "ms", _ms(lambda r: r.lag.p99_s), False),
)


def compare_rows(a: BenchReport, b: BenchReport) -> list[CompareRow]:
    return [
        CompareRow(name=name, unit=unit, a=read(a), b=read(b), higher_is_better=higher)
        for name, unit, read, higher in FIGURES
    ]


def compare_table(a: BenchReport, b: BenchReport, a_label: str = "A", b_label: str = "B") -> Table:
    """A rich table: figure, A, B, B - A and B / A, the delta green when B is better."""
    table = Table(title=f"{a_label} vs {b_label}", title_justify="left")
    table.add_column("figure")
    table.add_column("unit")
    for name in (a_label, b_label, "delta", "ratio"):
        table.add_column(name, justify="right")
    for row in compare_rows(a, b):
        style = {True: "green", False: "red", None: ""}[row.better]
        delta = "-" if row.delta is None else f"[{style}]{row.delta:+,.2f}[/]" if style else "0"
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        table.add_row(row.name, row.unit, num(row.a), num(row.b), delta, ratio)
    captions = [
        f"{label}: {r.config.url} {r.config.model}, {r.config.load}"
        + (" [bold yellow](SIMULATION)[/]" if r.config.simulated else "")
        for label, r in ((a_label, a), (b_label, b))
    ]
    if not (a.lag.kept_up and b.lag.kept_up):
        captions.append(
            "[bold red]a run's load generator fell behind: its latencies include lag[/]"
        )
    table.caption = "\n".join(captions)
    table.caption_justify = "left"
    return table
