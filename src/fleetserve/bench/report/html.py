"""report.html: one self-contained page (plotly.js inlined once, no network) of a bench run."""

from __future__ import annotations

from html import escape
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from fleetserve.bench.report import plots
from fleetserve.bench.report.console import (
    SIMULATION,
    TENANT_COLUMNS,
    TENANT_TEXT_COLUMNS,
    tenant_rows,
)
from fleetserve.bench.report.fmt import count, frac, ms, num
from fleetserve.bench.report.model import BenchReport

FILENAME = "report.html"
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       background: #f1f3f5; color: #212529; }
main { max-width: 1320px; margin: 0 auto; padding: 20px 28px 40px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 0 0 10px; }
.sub { color: #495057; font-size: 14px; margin-bottom: 14px; }
.banner { background: #ffe066; border: 2px solid #f08c00; padding: 10px 14px;
          font-weight: 700; border-radius: 6px; margin-bottom: 14px; }
.cards { display: grid; grid-template-columns: repeat(6, 1fr); gap: 10px; margin: 12px 0; }
.card { background: #fff; border-radius: 8px; padding: 10px 14px; box-shadow: 0 1px 2px #0001; }
.card .v { font-size: 22px; font-weight: 700; } .card .k { font-size: 12px; color: #495057; }
.box { background: #fff; border-radius: 8px; padding: 14px 16px; margin: 12px 0;
       box-shadow: 0 1px 2px #0001; }
.ok { border-left: 6px solid #2b8a3e; } .bad { border-left: 6px solid #e03131; }
.warn { border-left: 6px solid #f08c00; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e9ecef; text-align: right; }
th.t, td.t { text-align: left; } th { background: #f8f9fa; }
.pass { color: #2b8a3e; font-weight: 700; } .fail { color: #e03131; font-weight: 700; }
.scroll { overflow-x: auto; }
ul { margin: 4px 0; padding-left: 20px; } li { margin: 3px 0; }
"""


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """An HTML table; the first `text_columns` columns align left, the rest (figures) right."""

    def cell(tag: str, i: int, content: str) -> str:
        align = ' class="t"' if i < text_columns else ""
        return f"<{tag}{align}>{content}</{tag}>"

    head = "".join(cell("th", i, escape(h)) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cards(report: BenchReport) -> str:
    t, lat = report.totals, report.latency
    goodput = report.slo.goodput
    cards = [
        ("requests ok / sent", f"{t.ok:,} / {t.requests:,}"),
        ("throughput", f"{num(t.request_rate_rps)} req/s"),
        ("output tokens", f"{num(t.output_token_rate_tps, 0)} tok/s"),
        ("error rate", frac(t.error_rate)),
        ("TTFT p50 / p99", f"{ms(lat.ttft_s.p50)} / {ms(lat.ttft_s.p99)} ms"),
        (
            "goodput" if goodput else "TPOT p50",
            f"{num(goodput.rate_rps)} req/s" if goodput else f"{ms(lat.tpot_s.p50)} ms",
        ),
    ]
    inner = "".join(
        f'<div class="card"><div class="k">{escape(k)}</div><div class="v">{escape(v)}</div></div>'
        for k, v in cards
    )
    return f'<div class="cards">{inner}</div>'


def _latency_table(report: BenchReport) -> str:
    lat = report.latency
    rows = []
    for name, p in (
        ("TTFT", lat.ttft_s),
        ("TPOT", lat.tpot_s),
        ("ITL", lat.itl_s),
        ("e2e", lat.e2e_s),
    ):
        values = (p.mean, p.min, p.p50, p.p90, p.p95, p.p99, p.max)
        rows.append([name, count(p.count), *(ms(v) for v in values)])
    header = ["latency (ms)", "count", "mean", "min", "p50", "p90", "p95", "p99", "max"]
    return f'<div class="box"><h2>Latency, successful requests</h2>{_table(header, rows)}</div>'


def _totals_table(report: BenchReport) -> str:
    t = report.totals
    rows = [
        ["requests sent / ok / errors", f"{t.requests:,} / {t.ok:,} / {t.errors:,}"],
        ["measured window", f"{t.window_s:.2f} s"],
        ["throughput (ok)", f"{num(t.request_rate_rps)} req/s"],
        ["sent", f"{num(t.sent_rate_rps)} req/s"],
        ["output tokens", f"{t.output_tokens:,} ({num(t.output_token_rate_tps)} tok/s)"],
        ["prompt tokens", f"{t.prompt_tokens:,}"],
        ["total tokens", f"{num(t.total_token_rate_tps)} tok/s"],
    ]
    return f'<div class="box"><h2>Totals</h2>{_table(["figure", "value"], rows)}</div>'


def _slo_box(report: BenchReport) -> str:
    if not report.slo.results:
        return '<div class="box"><h2>SLOs</h2>No SLO given (<code>--slo</code>).</div>'
    verdicts = {True: '<span class="pass">pass</span>', False: '<span class="fail">FAIL</span>'}
    rows = [
        [
            escape(r.spec.text),
            "-" if r.observed_s is None else f"{ms(r.observed_s)} ms",
            "-" if r.met is None else f"{r.met:,} / {report.totals.requests:,}",
            verdicts.get(r.passed, "no data") if r.passed is not None else "no data",
        ]
        for r in report.slo.results
    ]
    goodput = report.slo.goodput
    extra = ""
    if goodput is not None:
        extra = (
            f"<p>Goodput: <b>{num(goodput.rate_rps)} req/s</b> ({goodput.good:,} requests met "
            f"every per-request SLO, {frac(goodput.attainment)} of all sent).</p>"
        )
    table = _table(["objective", "observed", "met", "verdict"], rows)
    return f'<div class="box"><h2>SLOs</h2>{table}{extra}</div>'


def _errors_box(report: BenchReport) -> str:
    errors = report.errors
    if not errors.examples:
        return '<div class="box ok"><h2>Errors</h2>None.</div>'
    by = ", ".join(f"{escape(k)} {v:,}" for k, v in errors.by_kind.items())
    status = ", ".join(f"{escape(k)} {v:,}" for k, v in errors.by_status.items())
    rows = [
        [
            escape(e.kind),
            "-" if e.status is None else str(e.status),
            f"{e.count:,}",
            escape(e.message),
        ]
        for e in errors.examples
    ]
    table = _table(["message", "kind", "status", "count"], rows, text_columns=3)
    return (
        f'<div class="box bad"><h2>Errors</h2><p>By kind: {by}. By HTTP status: {status}.</p>'
        f"{table}</div>"
    )


def _tenants_box(report: BenchReport) -> str:
    if not report.tenants:
        return ""
    # Text columns first, so that they align left and the figures right.
    columns = sorted(TENANT_COLUMNS, key=lambda name: name not in TENANT_TEXT_COLUMNS)
    rows = [[escape(row[name]) for name in columns] for row in tenant_rows(report)]
    table = _table(columns, rows, text_columns=len(TENANT_TEXT_COLUMNS))
    return (
        '<div class="box"><h2>Tenants</h2><p>Latencies in ms, of ok requests; rejected: '
        "refused by the target's admission (401, 403, 429), by error code; remaining: the "
        "last x-ratelimit-remaining-requests / -tokens seen.</p>"
        f'<div class="scroll">{table}</div></div>'
    )


def _notes_box(report: BenchReport) -> str:
    lag = report.lag
    lag_class = "ok" if lag.kept_up else "bad"
    notes = [n for n in report.notes if n != lag.message and not n.startswith("SIMULATION")]
    items = "".join(f"<li>{escape(n)}</li>" for n in notes)
    notes_html = f'<div class="box warn"><h2>Notes</h2><ul>{items}</ul></div>' if notes else ""
    return (
        f'<div class="box {lag_class}"><h2>Schedule lag</h2>{escape(lag.message)}</div>{notes_html}'
    )


def _config_box(report: BenchReport) -> str:
    c = report.config
    rows = [["url", escape(c.url)], ["model", escape(c.model)], ["load", escape(c.load)]]
    rows += [["duration asked", f"{c.duration_s:g} s"], ["stream", str(c.stream)]]
    rows += [[escape(k), escape(v)] for k, v in c.options.items()]
    return (
        f'<div class="box"><h2>Run</h2>{_table(["setting", "value"], rows, text_columns=2)}</div>'
    )


def _plot(fig: go.Figure, div_id: str, first: bool) -> str:
    return str(
        pio.to_html(fig, full_html=False, include_plotlyjs=first, div_id=div_id, config=PLOT_CONFIG)
    )


def render_html(report: BenchReport) -> str:
    """The whole page as one string."""
    c = report.config
    figures = [
        ("plot-latency", plots.latency_over_time(report)),
        ("plot-throughput", plots.throughput_over_time(report)),
        ("plot-tokens", plots.tokens_over_time(report)),
        ("plot-fleet", plots.fleet_timeline(report)),
        ("plot-distributions", plots.distributions(report)),
    ]
    plot_html = "".join(
        f'<div class="box">{_plot(fig, div_id, first=i == 0)}</div>'
        for i, (div_id, fig) in enumerate(figures)
    )
    banner = f'<div class="banner">{escape(SIMULATION)}. {escape(c.simulation_note or "")}</div>'
    title = f"fleetserve bench: {c.model}" + (" (SIMULATION)" if c.simulated else "")
    started = f" · started {escape(c.started_at)}" if c.started_at else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style></head><body><main>
<h1>{escape(title)}</h1>
<div class="sub">{escape(c.url)} · {escape(c.load)}{started}</div>
{banner if c.simulated else ""}
{_cards(report)}
{_notes_box(report)}
{_tenants_box(report)}
{plot_html}
<div class="grid2">{_latency_table(report)}{_totals_table(report)}</div>
<div class="grid2">{_slo_box(report)}{_config_box(report)}</div>
{_errors_box(report)}
</main></body></html>
"""


def write_html(report: BenchReport, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILENAME
    path.write_text(render_html(report), encoding="utf-8")
    return path
