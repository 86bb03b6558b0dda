"""bench_capacity's verdicts: one summary for fleetserve bench and GuideLLM, and GuideLLM's JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from benchmarks._capacity_stats import RunStats, Timing, failed_run, max_in_flight, summarize
from benchmarks._guidellm import _own_report, _timings, write_dataset

from fleetserve.bench.lengths import Fixed
from fleetserve.bench.workload import Workload, WorkloadSpec


def _steady(rate: float, count: int, lag_s: float, latency_s: float) -> list[Timing]:
    return [
        Timing(k / rate, k / rate + lag_s, k / rate + lag_s + latency_s, None) for k in range(count)
    ]


@pytest.mark.parametrize(
    ("timings", "expected", "keeps", "sustains"),
    [
        pytest.param(_steady(100, 500, 0.001, 0.002), 500, True, True, id="on-time"),
        pytest.param(_steady(100, 500, 0.006, 0.002), 500, True, False, id="late-by-6ms"),
        pytest.param(_steady(80, 500, 0.0, 0.002), 500, False, False, id="fell-behind-80pct"),
        pytest.param(_steady(100, 499, 0.0, 0.002), 500, False, False, id="one-not-sent"),
        pytest.param(
            [*_steady(100, 499, 0.0, 0.002), Timing(4.99, 4.99, 5.0, "http_5xx")],
            500, False, False, id="one-error",
        ),
        pytest.param([], 500, False, False, id="nothing"),
    ],
)  # fmt: skip
def test_rate_verdicts(timings: list[Timing], expected: int, keeps: bool, sustains: bool) -> None:
    stats = summarize("t", 100, expected, timings)
    assert stats.keeps_rate() is keeps
    assert stats.sustains_rate() is sustains


def test_summary_figures() -> None:
    timings = [*_steady(100, 100, 0.001, 0.005), Timing(1.0, math.nan, math.nan, "incomplete")]
    stats = summarize("t", 100, 101, timings, cpu_pct=12.0)
    assert (stats.sent, stats.ok, stats.errors, stats.cpu_pct) == (
        100,
        100,
        {"incomplete": 1},
        12.0,
    )
    assert stats.lag_p50_s == pytest.approx(0.001)
    assert stats.lag_p99_s == pytest.approx(0.001)
    # 100 answers from t=0 (first intended) to t=0.99+0.006 (last end)
    assert stats.achieved_rps == pytest.approx(100 / 0.996)
    assert stats.max_in_flight == 1


@pytest.mark.parametrize(
    ("spans", "most"),
    [
        pytest.param([(0, 1), (0.5, 1.5), (1.2, 2)], 2, id="overlap-two"),
        pytest.param([(0, 1), (1, 2)], 1, id="end-before-start-at-same-time"),
        pytest.param([(0, 3)] * 5, 5, id="all-at-once"),
    ],
)
def test_max_in_flight(spans: list[tuple[float, float]], most: int) -> None:
    assert max_in_flight([Timing(a, a, b, None) for a, b in spans]) == most


def test_streams_verdict_and_failed_run() -> None:
    held = summarize("t", 3, 0, [Timing(0, 0, 1, None)] * 3)
    assert held.holds_streams()
    assert not summarize("t", 4, 0, [Timing(0, 0, 1, None)] * 3).holds_streams()
    failed = failed_run("guidellm", 100, 500, "exited with 1")
    assert not failed.keeps_rate()
    assert failed.note == "exited with 1"


def _request(targeted: float, start: float | None, end: float | None) -> dict[str, Any]:
    timings = {"targeted_start": targeted, "request_start": start, "request_end": end}
    return {"info": {"timings": timings}}


REPORT: dict[str, Any] = {
    "duration": 2.0,
    "requests": {
        "successful": [_request(10.0, 10.001, 10.01), _request(10.5, 10.502, 10.51)],
        "errored": [_request(11.0, 11.004, 11.02)],
        "incomplete": [_request(11.5, None, None)],
    },
    "metrics": {
        "request_totals": {"successful": 2},
        "request_dispatch_delay": {"successful": {"percentiles": {"p99": 0.002}}},
    },
}


@pytest.mark.parametrize(
    ("closed_loop", "errors", "sent"),
    [
        pytest.param(False, {"error": 1, "incomplete": 1}, 3, id="open-loop-cut-is-failed"),
        pytest.param(True, {"error": 1}, 3, id="closed-loop-cut-left-out"),
    ],
)
def test_guidellm_report_read(closed_loop: bool, errors: dict[str, int], sent: int) -> None:
    timings, cut = _timings(REPORT, closed_loop)
    stats = summarize("guidellm", 2, 4, timings)
    assert cut == 1
    assert stats.errors == errors
    assert (stats.sent, stats.ok) == (sent, 2)
    assert stats.lag_max_s == pytest.approx(0.004)
    assert "dispatch delay p99 2.00 ms, 1 ok req/s" in _own_report(REPORT)


def test_dataset_rows_are_the_bench_prompts(tmp_path: Path) -> None:
    spec = WorkloadSpec(model="m", prompt_tokens=Fixed(32), output_tokens=Fixed(16))
    path = write_dataset(tmp_path / "d.jsonl", Workload(spec, seed=1), 3)
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    bodies = [orjson.loads(Workload(spec, seed=1).next().body)]
    assert len(rows) == 3
    assert rows[0]["prompt"] == bodies[0]["messages"][0]["content"]
    assert all(len(r["prompt"].split()) == 32 and r["output_tokens_count"] == 16 for r in rows)


def test_run_stats_failed_counts_errors() -> None:
    assert RunStats("t", 1, 1, 1, 0, {"a": 2, "b": 1}).failed == 3
