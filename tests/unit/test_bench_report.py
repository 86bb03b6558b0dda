"""bench report renderers: JSON round trip, CSV columns, console text, compare, HTML page."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from fleetserve.bench.records import RequestRecord
from fleetserve.bench.report.compare import compare_rows, compare_table
from fleetserve.bench.report.console import print_summary, progress_line, summary
from fleetserve.bench.report.csv_out import REQUEST_COLUMNS, SERIES_COLUMNS, write_csv
from fleetserve.bench.report.html import render_html, write_html
from fleetserve.bench.report.json_out import load_report, to_json, write_json
from fleetserve.bench.report.model import BenchReport, RunConfig
from fleetserve.bench.runner import Progress
from fleetserve.bench.slo import parse_slos
from fleetserve.bench.stats import summarize
from fleetserve.errors import ConfigError
from fleetserve.testing.bench_runs import synthetic_run

CONFIG = RunConfig(
    url="http://127.0.0.1:8000",
    model="llama",
    load="open loop, spike",
    duration_s=60.0,
    started_at="2025-01-01T00:00:00Z",
    options={"seed": "7"},
)
SIM = CONFIG.model_copy(update={"simulated": True, "simulation_note": "profile a10g"})
SLOS = parse_slos("ttft_p95=500ms,tpot=40ms,e2e=6s")


def spike_report(config: RunConfig = CONFIG) -> tuple[BenchReport, list[RequestRecord]]:
    records, fleet = synthetic_run()
    report = summarize(records, duration_s=60.0, config=config, fleet=fleet, slos=SLOS)
    return report, records


def render(renderable: object, width: int = 140) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


def test_json_round_trip(tmp_path: Path) -> None:
    report, _ = spike_report(SIM)
    path = write_json(report, tmp_path / "run")
    assert path == tmp_path / "run" / "report.json"
    loaded = load_report(path)
    assert loaded == report
    assert loaded.series[25].replicas_desired == 5
    assert json.loads(path.read_text())["totals"]["requests"] == report.totals.requests


@pytest.mark.parametrize(
    ("content", "words"),
    [
        pytest.param(None, "cannot read", id="missing"),
        pytest.param(b"{not json", "is not JSON", id="not-json"),
        pytest.param(b"[1, 2]", "not a fleetserve bench report", id="not-a-report"),
        pytest.param(b'{"totals": {}, "schema_version": 99}', "schema version 99", id="version"),
        pytest.param(b'{"totals": {}, "schema_version": 1}', "not a valid bench report", id="bad"),
    ],
)
def test_load_report_errors(tmp_path: Path, content: bytes | None, words: str) -> None:
    path = tmp_path / "report.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=words):
        load_report(path)


def test_csv_files(tmp_path: Path) -> None:
    report, records = spike_report()
    series_path, requests_path = write_csv(report, tmp_path, records)
    with series_path.open(newline="") as handle:
        series = list(csv.DictReader(handle))
    assert tuple(series[0]) == SERIES_COLUMNS
    assert len(series) == len(report.series)
    assert int(series[25]["replicas_desired"]) == 5
    assert series[0]["ttft_p50_s"] == ""  # nothing ends in the first second
    assert float(series[10]["ttft_p50_s"]) == report.series[10].ttft_p50_s
    with requests_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == REQUEST_COLUMNS
    assert len(rows) == len(records)
    first_ok = next(r for r in records if r.ok)
    row = rows[first_ok.index]
    assert first_ok.first_token_s is not None
    assert float(row["ttft_s"]) == first_ok.first_token_s - first_ok.intended_s
    assert int(row["chunks"]) == len(first_ok.token_times_s)
    failed = next(r for r in records if not r.ok)
    assert rows[failed.index]["ttft_s"] == ""
    assert rows[failed.index]["error_kind"] == failed.error_kind
    assert write_csv(report, tmp_path / "only-series") == [tmp_path / "only-series" / "report.csv"]


def test_console_summary_text() -> None:
    report, _ = spike_report(SIM)
    console = Console(file=io.StringIO(), width=140, color_system=None)
    print_summary(report, console)
    assert isinstance(console.file, io.StringIO)
    text = console.file.getvalue()
    for words in ("SIMULATION", "TTFT", "TPOT", "ITL", "e2e", "goodput", "ttft_p95=500ms"):
        assert words in text, words
    assert "FAIL" in text  # the spike breaks TTFT p95 500 ms
    assert "kept to its schedule" in text
    assert "no replica ready (503)" in text


def test_console_summary_of_empty_run() -> None:
    report = summarize([], duration_s=1.0, config=CONFIG)
    text = render(summary(report))
    assert "No request was sent" in text


@pytest.mark.parametrize(
    ("lag_p99_s", "duration_s", "want", "red"),
    [
        pytest.param(0.001, 60.0, "12.0s/60s  20%  sent 100  done 90", False, id="on-time"),
        pytest.param(0.02, None, "lag p99 20.0 ms", True, id="late"),
        pytest.param(None, None, "lag p99 -", False, id="no-lag-yet"),
    ],
)
def test_progress_line(
    lag_p99_s: float | None, duration_s: float | None, want: str, red: bool
) -> None:
    progress = Progress(12.0, 100, 90, 85, 5, 10, 8.5, lag_p99_s)
    line = progress_line(progress, duration_s)
    assert want in line.plain
    assert "errors 5" in line.plain
    assert "8.5 req/s" in line.plain
    lag_spans = [s for s in line.spans if line.plain[s.start : s.end].endswith(" ms")]
    assert any("red" in str(span.style) for span in lag_spans) is red


def test_compare_rows_and_table() -> None:
    a, _ = spike_report()
    records, fleet = synthetic_run(seed=8)
    faster = [r for r in records if r.ok][:200]
    b = summarize(faster, duration_s=60.0, config=SIM, fleet=fleet, slos=SLOS)
    rows = {row.name: row for row in compare_rows(a, b)}
    assert rows["requests"].a == a.totals.requests
    assert rows["requests"].b == 200
    throughput = rows["throughput"]
    assert throughput.ratio == b.totals.request_rate_rps / a.totals.request_rate_rps
    assert throughput.delta == b.totals.request_rate_rps - a.totals.request_rate_rps
    assert throughput.better is False  # fewer requests per second
    assert rows["error rate"].b == 0.0
    assert rows["error rate"].better is True  # lower error rate is better
    ttft = rows["TTFT p50"]
    assert ttft.a == pytest.approx((a.latency.ttft_s.p50 or 0) * 1e3)
    text = render(compare_table(a, b, "before", "after"))
    for words in ("before", "after", "TTFT p99", "goodput", "(SIMULATION)", "ratio"):
        assert words in text, words


def test_compare_handles_unknown_figures() -> None:
    empty = summarize([], duration_s=1.0, config=CONFIG)
    report, _ = spike_report()
    rows = {row.name: row for row in compare_rows(empty, report)}
    assert rows["TTFT p50"].a is None
    assert rows["TTFT p50"].delta is None
    assert rows["TTFT p50"].ratio is None
    assert rows["throughput"].ratio is None  # A is 0
    assert "-" in render(compare_table(empty, report))


def test_html_page_has_plots_and_tables(tmp_path: Path) -> None:
    report, _ = spike_report()
    page = write_html(report, tmp_path).read_text()
    for div in (
        "plot-latency",
        "plot-throughput",
        "plot-tokens",
        "plot-fleet",
        "plot-distributions",
    ):
        assert f'id="{div}"' in page, div
    assert page.count("* plotly.js v") == 1  # inlined once, no CDN script tag
    assert '<script src="http' not in page
    assert page.count("Plotly.newPlot") == 5
    assert "replicas ready" in page
    assert "Schedule lag" in page
    assert "ttft_p95=500ms" in page
    assert "no replica ready (503)" in page
    assert "SIMULATION" not in page


def test_html_labels_a_simulation_and_escapes_text() -> None:
    config = SIM.model_copy(update={"model": "<script>alert(1)</script>"})
    report, _ = spike_report(config)
    page = render_html(report)
    assert "(SIMULATION)" in page
    assert 'class="banner"' in page
    assert "profile a10g" in page
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_html_of_empty_run_renders() -> None:
    page = render_html(summarize([], duration_s=2.0, config=CONFIG))
    assert page.count("Plotly.newPlot") == 5
    assert "No request was sent" in page
    assert "no fleet samples" in page


def test_report_json_is_stable_text() -> None:
    report, _ = spike_report()
    assert to_json(report) == to_json(BenchReport.model_validate_json(to_json(report)))


def test_records_with_unsettled_times_are_refused() -> None:
    broken = RequestRecord(0, 0.0, float("nan"), 1.0, stream=True)
    with pytest.raises(ValueError, match="request 0"):
        summarize([broken], duration_s=1.0, config=CONFIG)
