"""The HTML report's plotly figures, each read from the report model alone.

Per-second figures put each bucket at its middle (t + 0.5 s) so they line up with the fleet's
samples, which are drawn at their own times as steps on a secondary axis.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from fleetserve.bench.report.model import BenchReport, FleetPoint, Histogram

HEIGHT_PX = 360
READY = "#2b8a3e"
DESIRED = "#868e96"
LAYOUT: dict[str, Any] = {
    "template": "plotly_white",
    "height": HEIGHT_PX,
    "margin": {"l": 60, "r": 60, "t": 78, "b": 45},
    "legend": {
        "orientation": "h",
        "y": 1.03,
        "yanchor": "bottom",
        "x": 0,
        "font": {"size": 11},
        "traceorder": "normal",
    },
    "hovermode": "x unified",
    "font": {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
}


def _ms(values: Sequence[float | None]) -> list[float | None]:
    return [None if v is None else v * 1e3 for v in values]


def _with_replicas(fig: go.Figure, fleet: Sequence[FleetPoint], end_s: float) -> None:
    """Overlay replicas ready (and desired, when known) as steps on the right axis."""
    ready = [(p.t_s, p.replicas_ready) for p in fleet if p.replicas_ready is not None]
    desired = [(p.t_s, p.replicas_desired) for p in fleet if p.replicas_desired is not None]
    for name, points, color, dash in (
        ("replicas ready", ready, READY, "solid"),
        ("replicas desired", desired, DESIRED, "dash"),
    ):
        if not points:
            continue
        xs = [t for t, _ in points] + [end_s]
        ys = [n for _, n in points] + [points[-1][1]]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                name=name,
                mode="lines",
                line={"shape": "hv", "color": color, "dash": dash, "width": 2.5},
                opacity=0.8,
            ),
            secondary_y=True,
        )
    if ready or desired:
        top = max(n for _, n in ready + desired)
        fig.update_yaxes(
            title_text="replicas",
            secondary_y=True,
            rangemode="tozero",
            range=[0, top * 1.25 + 0.5],
            showgrid=False,
            dtick=max(1, round(top / 5)),
        )


def _time_figure(title: str, y_title: str) -> go.Figure:
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.update_layout(LAYOUT)
    fig.update_layout(title={"text": title, "x": 0.01, "y": 0.97, "yanchor": "top"})
    fig.update_xaxes(title_text="seconds from start")
    fig.update_yaxes(title_text=y_title, secondary_y=False, rangemode="tozero")
    return fig


def latency_over_time(report: BenchReport) -> go.Figure:
    fig = _time_figure("Latency over time (by completion second)", "ms")
    xs = [b.t_s + 0.5 for b in report.series]
    lines = (
        ("TTFT p50", [b.ttft_p50_s for b in report.series], "#1c7ed6", "solid"),
        ("TTFT p95", [b.ttft_p95_s for b in report.series], "#1c7ed6", "dot"),
        ("e2e p50", [b.e2e_p50_s for b in report.series], "#e8590c", "solid"),
        ("e2e p95", [b.e2e_p95_s for b in report.series], "#e8590c", "dot"),
        ("ITL p95", [b.itl_p95_s for b in report.series], "#7048e8", "solid"),
    )
    for name, values, color, dash in lines:
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=_ms(values),
                name=name,
                mode="lines+markers",
                line={"color": color, "dash": dash},
                marker={"size": 4},
            ),
            secondary_y=False,
        )
    _with_replicas(fig, report.fleet, report.totals.window_s)
    return fig


def throughput_over_time(report: BenchReport) -> go.Figure:
    fig = _time_figure("Throughput over time", "requests / s")
    xs = [b.t_s + 0.5 for b in report.series]
    fig.add_trace(
        go.Bar(
            x=xs,
            y=[b.completed for b in report.series],
            name="completed ok",
            marker_color="#74c0fc",
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Bar(x=xs, y=[b.errors for b in report.series], name="errors", marker_color="#fa5252"),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=[b.sent for b in report.series],
            name="sent (schedule)",
            mode="lines",
            line={"color": "#343a40", "width": 1.5, "dash": "dot"},
        ),
        secondary_y=False,
    )
    fig.update_layout(barmode="stack", bargap=0.1)
    _with_replicas(fig, report.fleet, report.totals.window_s)
    return fig


def tokens_over_time(report: BenchReport) -> go.Figure:
    fig = _time_figure("Output tokens per second", "tokens / s")
    xs = [b.t_s + 0.5 for b in report.series]
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=[b.output_tps for b in report.series],
            name="output tokens/s",
            mode="lines",
            fill="tozeroy",
            line={"color": "#0ca678"},
        ),
        secondary_y=False,
    )
    _with_replicas(fig, report.fleet, report.totals.window_s)
    return fig


def fleet_timeline(report: BenchReport) -> go.Figure:
    """Replicas by state (every fleet sample, when any), with requests in flight and queued:
    bench's own in-flight mean per second, and the fleet's figures when it reports them."""
    fleet = report.fleet
    title = "Fleet and concurrency" + ("" if fleet else " (no fleet samples from the target)")
    fig = _time_figure(title, "replicas")
    xs = [p.t_s for p in fleet]
    states = (
        ("ready", [p.replicas_ready for p in fleet], READY, "solid"),
        ("desired", [p.replicas_desired for p in fleet], DESIRED, "dash"),
        ("starting", [p.replicas_starting for p in fleet], "#1c7ed6", "solid"),
        ("draining", [p.replicas_draining for p in fleet], "#e8590c", "solid"),
    )
    for name, values, color, dash in states:
        if any(v is not None for v in values):
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=values,
                    name=f"replicas {name}",
                    mode="lines",
                    line={"shape": "hv", "color": color, "dash": dash, "width": 2.5},
                ),
                secondary_y=False,
            )
    fig.add_trace(
        go.Scatter(
            x=[b.t_s + 0.5 for b in report.series],
            y=[b.in_flight_mean for b in report.series],
            name="in flight (bench, mean)",
            mode="lines",
            line={"color": "#f59f00", "width": 2},
        ),
        secondary_y=True,
    )
    for name, values, color in (
        ("queue depth (fleet)", [p.queue_depth for p in fleet], "#c92a2a"),
        ("in flight (fleet)", [p.in_flight for p in fleet], "#ae3ec9"),
    ):
        if any(v is not None for v in values):
            fig.add_trace(
                go.Scatter(
                    x=xs, y=values, name=name, mode="lines", line={"color": color, "width": 1.5}
                ),
                secondary_y=True,
            )
    fig.update_yaxes(secondary_y=False, dtick=1)
    fig.update_yaxes(
        title_text="requests", secondary_y=True, rangemode="tozero", showgrid=False, tickmode="auto"
    )
    return fig


def distributions(report: BenchReport) -> go.Figure:
    """Histograms of TTFT, ITL, TPOT and e2e (ms); overflow counts appear in the titles."""
    hists: list[tuple[str, Histogram]] = [
        ("TTFT", report.histograms.ttft_s),
        ("ITL", report.histograms.itl_s),
        ("TPOT", report.histograms.tpot_s),
        ("e2e", report.histograms.e2e_s),
    ]
    titles = [
        f"{name} (ms)"
        + (f", {h.overflow:,} above {h.edges_s[-1] * 1e3:.3g} ms" if h.overflow else "")
        for name, h in hists
    ]
    fig = make_subplots(rows=2, cols=2, subplot_titles=titles, vertical_spacing=0.14)
    colors = ("#1c7ed6", "#7048e8", "#0ca678", "#e8590c")
    for i, ((name, h), color) in enumerate(zip(hists, colors, strict=True)):
        edges = [e * 1e3 for e in h.edges_s]
        centers = [(lo + hi) / 2 for lo, hi in itertools.pairwise(edges)]
        widths = [hi - lo for lo, hi in itertools.pairwise(edges)]
        fig.add_trace(
            go.Bar(
                x=centers, y=h.counts, width=widths, name=name, marker_color=color, showlegend=False
            ),
            row=i // 2 + 1,
            col=i % 2 + 1,
        )
    fig.update_layout(LAYOUT)
    fig.update_layout(
        title={"text": "Latency distributions (count per bin)", "x": 0.01, "y": 0.98},
        height=HEIGHT_PX * 1.6,
        hovermode="closest",
    )
    return fig
