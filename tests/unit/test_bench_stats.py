"""bench stats on synthetic records with known timings: every figure is worked out by hand."""

from __future__ import annotations

import itertools
import math
import re

import pytest

from fleetserve.bench.records import ErrorKind, FleetSample, RequestRecord
from fleetserve.bench.report.model import Percentiles, RunConfig, SloSpec
from fleetserve.bench.samples import describe
from fleetserve.bench.saturation import SweepPoint, find_saturation
from fleetserve.bench.series import per_second
from fleetserve.bench.slo import parse_slos
from fleetserve.bench.stats import histogram, summarize
from fleetserve.errors import ConfigError
from fleetserve.telemetry.quantiles import percentile, percentile_of

CONFIG = RunConfig(url="http://127.0.0.1:1", model="m", load="test", duration_s=4.0)
EPS = 1e-12


def rec(
    index: int,
    intended_s: float,
    *,
    lag_s: float = 0.0,
    token_times_s: tuple[float, ...] = (),
    end_s: float | None = None,
    output_tokens: int | None = None,
    prompt_tokens: int | None = 10,
    from_usage: bool = True,
    error_kind: ErrorKind | None = None,
    status: int | None = 200,
    error: str | None = None,
    stream: bool = True,
) -> RequestRecord:
    """A request whose first token is its first chunk and that ends at its last chunk."""
    times = list(token_times_s)
    if end_s is None:
        end_s = times[-1] if times else intended_s + lag_s
    return RequestRecord(
        index=index,
        intended_s=intended_s,
        sent_s=intended_s + lag_s,
        end_s=end_s,
        stream=stream,
        first_token_s=times[0] if times else None,
        token_times_s=times,
        prompt_tokens=prompt_tokens if error_kind is None else None,
        output_tokens=(len(times) if output_tokens is None else output_tokens)
        if error_kind is None
        else None,
        tokens_from_usage=from_usage,
        status=status,
        error_kind=error_kind,
        error=error,
    )


# TTFT .1 .3 .2; ITL gaps .02 .03 | .01 | none; TPOT .025 .05 -; e2e .15 .35 .2
KNOWN = [
    rec(0, 0.0, token_times_s=(0.1, 0.12, 0.15)),
    rec(1, 1.0, token_times_s=(1.3, 1.31), end_s=1.35),
    rec(2, 2.0, token_times_s=(2.2,)),
]
FAILED = rec(3, 2.5, end_s=2.9, error_kind="http_5xx", status=503, error="no replica ready")


def close(got: float | None, want: float) -> bool:
    return got is not None and abs(got - want) <= 1e-9


@pytest.mark.parametrize(
    ("values", "p", "want"),
    [
        pytest.param([1.0, 2.0, 3.0, 4.0], 25, 1.75, id="numpy-linear-25"),
        pytest.param([1.0, 2.0, 3.0, 4.0], 50, 2.5, id="median-between"),
        pytest.param([1.0, 2.0, 3.0, 4.0], 0, 1.0, id="p0-is-min"),
        pytest.param([1.0, 2.0, 3.0, 4.0], 100, 4.0, id="p100-is-max"),
        pytest.param([7.0], 99, 7.0, id="single-value"),
        pytest.param([float(i) for i in range(101)], 99, 99.0, id="101-values-p99-exact"),
        pytest.param([0.0, 10.0], 99, 9.9, id="two-values-p99"),
    ],
)
def test_percentile_interpolates_like_numpy(values: list[float], p: float, want: float) -> None:
    assert close(percentile(values, p), want)


def test_percentile_of_sorts_and_is_none_when_empty() -> None:
    assert percentile_of([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile_of([], 99) is None


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


@pytest.mark.parametrize(
    ("metric", "want"),
    [
        pytest.param("ttft_s", (3, 0.2, 0.1, 0.2, 0.28, 0.29, 0.298, 0.3), id="ttft"),
        pytest.param("itl_s", (3, 0.02, 0.01, 0.02, 0.028, 0.029, 0.0298, 0.03), id="itl-pooled"),
        pytest.param(
            "tpot_s", (2, 0.0375, 0.025, 0.0375, 0.0475, 0.04875, 0.04975, 0.05), id="tpot"
        ),
        pytest.param("e2e_s", (3, 0.7 / 3, 0.15, 0.2, 0.32, 0.335, 0.347, 0.35), id="e2e"),
    ],
)
def test_latency_percentiles_of_known_streams(metric: str, want: tuple[float, ...]) -> None:
    report = summarize([*KNOWN, FAILED], duration_s=4.0, config=CONFIG)
    got: Percentiles = getattr(report.latency, metric)
    assert got.count == want[0]
    fields = (got.mean, got.min, got.p50, got.p90, got.p95, got.p99, got.max)
    for name, g, w in zip(
        ("mean", "min", "p50", "p90", "p95", "p99", "max"), fields, want[1:], strict=True
    ):
        assert close(g, w), (metric, name, g, w)


def test_latency_counts_from_intended_time_not_send() -> None:
    late = rec(0, 0.0, lag_s=0.05, token_times_s=(0.1, 0.2))
    report = summarize([late], duration_s=1.0, config=CONFIG)
    assert close(report.latency.ttft_s.p50, 0.1)
    assert close(report.latency.e2e_s.p50, 0.2)
    assert close(report.lag.p50_s, 0.05)


def test_totals_rates_over_window_and_errors() -> None:
    report = summarize([*KNOWN, FAILED], duration_s=4.0, config=CONFIG)
    t = report.totals
    assert (t.requests, t.ok, t.errors) == (4, 3, 1)
    assert close(t.error_rate, 0.25)
    assert close(t.window_s, 4.0)
    assert close(t.request_rate_rps, 0.75)
    assert close(t.output_token_rate_tps, 6 / 4)
    assert close(t.total_token_rate_tps, 36 / 4)
    assert (t.output_tokens, t.prompt_tokens, t.tokens_counted) == (6, 30, 0)
    assert report.errors.by_kind == {"http_5xx": 1}
    assert report.errors.by_status == {"503": 1}
    assert report.errors.examples[0].message == "no replica ready"


def test_window_stretches_to_the_last_request_end() -> None:
    report = summarize([rec(0, 0.5, token_times_s=(1.0, 6.0))], duration_s=2.0, config=CONFIG)
    assert close(report.totals.window_s, 6.0)
    assert close(report.totals.request_rate_rps, 1 / 6)
    assert len(report.series) == 6


def test_errors_by_kind_and_status() -> None:
    failures: list[tuple[ErrorKind, int | None, str]] = [
        ("http_5xx", 503, "no replica"),
        ("http_5xx", 503, "no replica"),
        ("timeout", None, "first token"),
        ("http_4xx", 429, "rate limited"),
        ("cancelled", None, "run ended"),
    ]
    records = [
        rec(i, 0.1 * i, end_s=1.0, error_kind=kind, status=status, error=message)
        for i, (kind, status, message) in enumerate(failures)
    ]
    report = summarize([*records, *KNOWN], duration_s=4.0, config=CONFIG)
    assert report.errors.by_kind == {"http_5xx": 2, "timeout": 1, "http_4xx": 1, "cancelled": 1}
    assert report.errors.by_status == {"503": 2, "none": 2, "429": 1}
    assert report.errors.examples[0].count == 2
    assert close(report.totals.error_rate, 5 / 8)
    assert any("1 requests were cancelled" in note for note in report.notes)


def test_error_messages_differing_only_in_numbers_are_one_example() -> None:
    messages = ["engine starting (42.7 s left)", "engine starting (41.2 s left)", "bad model 7"]
    records = [
        rec(i, 0.1 * i, end_s=1.0, error_kind="http_5xx", status=503, error=m)
        for i, m in enumerate(messages)
    ]
    report = summarize(records, duration_s=2.0, config=CONFIG)
    examples = [(e.message, e.count) for e in report.errors.examples]
    assert examples == [("engine starting (42.7 s left)", 2), ("bad model 7", 1)]


def test_tokens_counted_from_chunks_are_flagged() -> None:
    records = [
        rec(0, 0.0, token_times_s=(0.1, 0.2), from_usage=False, prompt_tokens=None),
        rec(1, 0.5, token_times_s=(0.6, 0.7), from_usage=False, prompt_tokens=None),
        rec(2, 1.0, token_times_s=(1.1, 1.2)),
    ]
    report = summarize(records, duration_s=2.0, config=CONFIG)
    assert report.totals.tokens_counted == 2
    assert report.totals.prompt_tokens_unknown == 2
    want = "2 requests' tokens were counted from chunks, not reported by the server"
    assert any(want in note for note in report.notes)
    clean = summarize(KNOWN, duration_s=4.0, config=CONFIG)
    assert not any("counted from chunks" in note for note in clean.notes)


@pytest.mark.parametrize(
    ("lags_s", "kept_up", "words"),
    [
        pytest.param([0.001] * 100, True, "kept to its schedule", id="1ms-kept-up"),
        pytest.param([0.00499] * 100, True, "kept to its schedule", id="just-under-5ms"),
        pytest.param([0.001] * 95 + [0.05] * 5, False, "could NOT keep up", id="tail-lags"),
        pytest.param([0.0] * 10, True, "p99 0.00 ms", id="closed-loop-no-lag"),
    ],
)
def test_lag_verdict(lags_s: list[float], kept_up: bool, words: str) -> None:
    records = [
        rec(i, i * 0.01, lag_s=lag, token_times_s=(i * 0.01 + 0.1,)) for i, lag in enumerate(lags_s)
    ]
    report = summarize(records, duration_s=2.0, config=CONFIG)
    assert report.lag.kept_up is kept_up
    assert words in report.lag.message
    assert (report.lag.message in report.notes) is (not kept_up)
    if not kept_up:
        assert "include this lag" in report.lag.message


def test_lag_threshold_is_a_parameter() -> None:
    records = [rec(0, 0.0, lag_s=0.002, token_times_s=(0.1,))]
    report = summarize(records, duration_s=1.0, config=CONFIG, lag_threshold_s=0.001)
    assert not report.lag.kept_up


@pytest.mark.parametrize(
    ("text", "want"),
    [
        pytest.param(
            "ttft_p95=2s,tpot=100ms,e2e=10s,itl_p99=50ms",
            [("ttft", 2.0, 95.0), ("tpot", 0.1, None), ("e2e", 10.0, None), ("itl", 0.05, 99.0)],
            id="full-example",
        ),
        pytest.param(" ttft = 250ms ", [("ttft", 0.25, None)], id="spaces"),
        pytest.param("ITL_P99.9=80MS", [("itl", 0.08, 99.9)], id="case-and-fractional-pct"),
        pytest.param("e2e=.5s", [("e2e", 0.5, None)], id="leading-dot"),
    ],
)
def test_parse_slos(text: str, want: list[tuple[str, float, float | None]]) -> None:
    got = [(s.metric, s.bound_s, s.percentile) for s in parse_slos(text)]
    assert len(got) == len(want)
    for (gm, gb, gp), (wm, wb, wp) in zip(got, want, strict=True):
        assert (gm, gp) == (wm, wp)
        assert close(gb, wb)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        pytest.param("", "empty", id="empty"),
        pytest.param("ttft", "not metric=bound", id="no-equals"),
        pytest.param("ttfb=1s", "unknown", id="unknown-metric"),
        pytest.param("ttft=2", "unit", id="no-unit"),
        pytest.param("ttft=1h", "unit", id="bad-unit"),
        pytest.param("ttft=-1s", "unit", id="negative"),
        pytest.param("ttft=0ms", "> 0", id="zero"),
        pytest.param("ttft_p0=1s", "(0, 100]", id="p0"),
        pytest.param("ttft_p101=1s", "(0, 100]", id="p101"),
        pytest.param("ttft=1s,ttft=2s", "twice", id="duplicate"),
        pytest.param("ttft=1s,,e2e=2s", "not metric=bound", id="empty-part"),
    ],
)
def test_parse_slos_rejects(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re_escape(words)):
        parse_slos(text)


def re_escape(text: str) -> str:
    return re.escape(text)


def test_goodput_and_slo_results() -> None:
    slos = parse_slos("ttft=250ms,tpot=40ms,ttft_p50=250ms,ttft_p99=250ms,e2e_p99=1s")
    report = summarize([*KNOWN, FAILED], duration_s=4.0, config=CONFIG, slos=slos)
    goodput = report.slo.goodput
    assert goodput is not None
    # r0 (ttft .1, tpot .025) and r2 (ttft .2, one token) are good; r1 misses ttft; r3 failed.
    assert goodput.good == 2
    assert close(goodput.rate_rps, 0.5)
    assert close(goodput.attainment, 0.5)
    by_text = {r.spec.text: r for r in report.slo.results}
    assert by_text["ttft=250ms"].met == 2
    assert by_text["ttft=250ms"].passed is False  # 2 of 4 < 90 %
    assert by_text["tpot=40ms"].met == 2  # r1's TPOT .05 misses; r2 has no TPOT
    assert close(by_text["ttft_p50=250ms"].observed_s, 0.2)
    assert by_text["ttft_p50=250ms"].passed is True
    assert close(by_text["ttft_p99=250ms"].observed_s, 0.298)
    assert by_text["ttft_p99=250ms"].passed is False
    assert by_text["e2e_p99=1s"].passed is True


def test_itl_per_request_bound_and_no_data() -> None:
    slos = parse_slos("itl=25ms,ttft_p99=1s")
    report = summarize(KNOWN, duration_s=4.0, config=CONFIG, slos=slos)
    itl = report.slo.results[0]
    assert itl.met == 2  # r0 has a 30 ms gap; r1 (10 ms) and r2 (no gap) meet it
    empty = summarize([FAILED], duration_s=4.0, config=CONFIG, slos=slos)
    assert empty.slo.results[1].passed is None  # no TTFT to judge
    assert empty.slo.goodput is not None
    assert empty.slo.goodput.good == 0


def test_no_per_request_slo_means_no_goodput() -> None:
    spec = SloSpec(metric="ttft", bound_s=1.0, percentile=95.0, text="ttft_p95=1s")
    report = summarize(KNOWN, duration_s=4.0, config=CONFIG, slos=[spec])
    assert report.slo.goodput is None


def test_per_second_buckets_and_fleet_alignment() -> None:
    spread = rec(4, 0.4, token_times_s=(0.5, 1.5), output_tokens=4)
    fleet = [
        FleetSample(t_s=0.5, replicas_ready=1, replicas_desired=2),
        FleetSample(t_s=1.5, replicas_ready=None, replicas_desired=3, queue_depth=4),
        FleetSample(t_s=3.0, replicas_ready=2),  # at the start of second 3: not second 2
    ]
    buckets = per_second([*KNOWN, FAILED, spread], 4.0, fleet)
    assert [b.t_s for b in buckets] == [0, 1, 2, 3]
    assert [b.sent for b in buckets] == [2, 1, 2, 0]
    assert [b.completed for b in buckets] == [1, 2, 1, 0]
    assert [b.errors for b in buckets] == [0, 0, 1, 0]
    assert [b.output_tps for b in buckets] == [5.0, 4.0, 1.0, 0.0]
    assert close(buckets[0].ttft_p50_s, 0.1)
    assert close(buckets[1].ttft_p50_s, 0.2)  # r1 .3 and the spread one .1
    assert close(buckets[1].e2e_p95_s, 1.1 - 0.75 * 0.05)  # of .35 and 1.1
    assert close(buckets[0].itl_p95_s, 0.03 - 0.05 * 0.01)
    assert close(buckets[1].itl_p95_s, 1.0 - 0.05 * 0.99)  # gaps .01 and 1.0
    assert buckets[3].ttft_p50_s is None
    want_in_flight = [0.15 + 0.6, 0.35 + 0.5, 0.2 + 0.4, 0.0]
    for got, want in zip((b.in_flight_mean for b in buckets), want_in_flight, strict=True):
        assert close(got, want)
    assert [(b.replicas_ready, b.replicas_desired, b.queue_depth) for b in buckets] == [
        (1, 2, None),
        (1, 3, 4),
        (1, 3, 4),
        (2, 3, 4),
    ]
    assert per_second(KNOWN, 3.0)[0].replicas_ready is None


def test_empty_run() -> None:
    report = summarize([], duration_s=3.0, config=CONFIG)
    assert report.totals.requests == 0
    assert report.totals.error_rate == 0.0
    assert report.latency.ttft_s == Percentiles()
    assert report.lag.kept_up
    assert report.notes == ["No request was sent: every figure is empty."]
    assert [b.sent for b in report.series] == [0, 0, 0]


def test_all_failed_run() -> None:
    records = [
        rec(i, i * 0.5, end_s=i * 0.5 + 0.01, error_kind="connect", status=None, error="refused")
        for i in range(4)
    ]
    report = summarize(records, duration_s=2.0, config=CONFIG)
    assert report.totals.ok == 0
    assert report.totals.error_rate == 1.0
    assert report.latency.e2e_s.count == 0
    assert report.histograms.ttft_s.counts == []
    assert report.errors.by_kind == {"connect": 4}
    assert any("No request succeeded" in note for note in report.notes)


@pytest.mark.parametrize("duration_s", [0.0, -1.0, math.inf, math.nan])
def test_bad_duration_is_a_config_error(duration_s: float) -> None:
    with pytest.raises(ConfigError, match="duration_s"):
        summarize(KNOWN, duration_s=duration_s, config=CONFIG)


def test_simulated_run_says_so() -> None:
    config = CONFIG.model_copy(update={"simulated": True, "simulation_note": "profile a10g"})
    report = summarize(KNOWN, duration_s=4.0, config=config)
    assert report.notes[0].startswith("SIMULATION")
    assert "profile a10g" in report.notes[0]


@pytest.mark.parametrize(
    ("values", "edges", "counts", "overflow"),
    [
        pytest.param([0.0, 1.0, 2.0, 3.0, 4.0], [0, 1, 2, 3, 4], [1, 1, 1, 2], 0, id="even"),
        pytest.param([2.0, 2.0], [2.0, 2.02], [2], 0, id="one-value"),
        pytest.param(
            [float(i) for i in range(100)] + [1000.0],
            [i * 99 / 4 for i in range(5)],
            [25, 25, 25, 25],
            1,
            id="long-tail-overflow",
        ),
    ],
)
def test_histogram(
    values: list[float], edges: list[float], counts: list[int], overflow: int
) -> None:
    got = histogram(values, bins=4 if len(edges) == 5 else 1)
    assert len(got.edges_s) == len(edges)
    assert all(close(g, w) for g, w in zip(got.edges_s, edges, strict=True))
    assert got.counts == counts
    assert got.overflow == overflow


@pytest.mark.parametrize(
    ("points", "saturated", "rate", "words"),
    [
        pytest.param([(10, 10), (20, 19.8), (40, 39)], False, 40, "still rising", id="rising"),
        pytest.param([(10, 10), (20, 19.8), (40, 20.5)], True, 20, "+3.5%", id="flat"),
        pytest.param([(10, 10), (20, 19), (30, 15)], True, 20, "-21.1%", id="falls"),
        pytest.param([(10, 10, True), (20, 20, False)], True, 10, "SLOs broken", id="slo"),
        pytest.param([(10, 10, False)], True, None, "SLOs broken at 10", id="slo-first"),
        pytest.param([(10, 0), (20, 5)], False, 20, "still rising", id="from-zero"),
        pytest.param([(10, 0), (20, 0)], True, 10, "+0.0%", id="stuck-at-zero"),
    ],
)
def test_find_saturation(
    points: list[tuple[float, ...]], saturated: bool, rate: float | None, words: str
) -> None:
    sweep = [
        SweepPoint(
            rate_rps=p[0], throughput_rps=p[1], slo_passed=bool(p[2]) if len(p) > 2 else None
        )
        for p in points
    ]
    got = find_saturation(sweep)
    assert got.saturated is saturated
    assert got.rate_rps == rate
    assert words in got.reason
    assert got.max_throughput_rps == max(p[1] for p in points)


def test_find_saturation_rejects_bad_sweeps() -> None:
    with pytest.raises(ValueError, match="at least one"):
        find_saturation([])
    with pytest.raises(ValueError, match="increase"):
        find_saturation([SweepPoint(20, 5), SweepPoint(10, 6)])


def test_sweep_point_from_report() -> None:
    slos = parse_slos("ttft_p99=250ms")
    report = summarize(KNOWN, duration_s=4.0, config=CONFIG, slos=slos)
    point = SweepPoint.from_report(5.0, report)
    assert point.slo_passed is False
    assert close(point.throughput_rps, 0.75)
    assert (
        SweepPoint.from_report(5.0, summarize(KNOWN, duration_s=4.0, config=CONFIG)).slo_passed
        is None
    )


def test_describe_of_many_values_matches_sorted_ranks() -> None:
    values = [float(v) for v in itertools.islice(itertools.cycle([3, 1, 2]), 300)]
    got = describe(values)
    assert (got.count, got.min, got.p50, got.max) == (300, 1.0, 2.0, 3.0)
    assert abs((got.mean or 0) - 2.0) <= EPS
