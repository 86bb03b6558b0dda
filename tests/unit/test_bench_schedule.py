"""Scenario tables for bench schedules: exact intended send times, bounds, traces, syntax."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from fleetserve.bench.patterns import (
    Burst,
    Pattern,
    Ramp,
    Spike,
    Stages,
    Steady,
    Wave,
    burst,
    parse_pattern,
    ramp,
    spike,
    stages,
    steady,
    value_at,
    wave,
)
from fleetserve.bench.schedule import (
    ClosedLoop,
    TraceEntry,
    TraceFormat,
    active_users,
    bound_trace,
    parse_trace,
    read_trace,
    schedule,
)
from fleetserve.errors import ConfigError

EXACT = 1e-9
R2, R3 = math.sqrt(2), math.sqrt(3)


def assert_times(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want), (got, want)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= EXACT, (index, g, w)


@pytest.mark.parametrize(
    ("pattern", "duration_s", "max_requests", "want"),
    [
        pytest.param(steady(4), 1.0, 100, [0, 0.25, 0.5, 0.75], id="steady-4rps-1s"),
        pytest.param(steady(4), 10.0, 3, [0, 0.25, 0.5], id="steady-cut-by-max-requests"),
        pytest.param(steady(0.5), 5.0, 100, [0, 2, 4], id="steady-slow-cut-by-duration"),
        pytest.param(
            ramp(0, 10, 2), 2.0, 100, [math.sqrt(0.4 * k) for k in range(10)], id="ramp-0-10-sqrt"
        ),
        pytest.param(
            ramp(2, 4, 1), 2.0, 100, [0, R2 - 1, R3 - 1, 1, 1.25, 1.5, 1.75], id="ramp-then-hold"
        ),
        pytest.param(ramp(4, 0, 2), 5.0, 100, [0, 2 - R3, 2 - R2, 1, 2], id="ramp-down-to-zero"),
        pytest.param(
            spike(1, 4, 2, 1), 5.0, 100, [0, 1, 2, 2.25, 2.5, 2.75, 3, 4], id="spike-base-1"
        ),
        pytest.param(spike(0, 2, 1, 1), 3.0, 100, [0, 1.5, 2], id="spike-from-idle"),
        pytest.param(spike(1, 2, 0, 1), 2.0, 100, [0, 0.5, 1], id="spike-at-start"),
        pytest.param(
            burst(1, 5, 2, 0.5),
            4.5,
            100,
            [0, 1, 2, 2.2, 2.4, 3, 4, 4.2, 4.4],
            id="burst-every-2s",
        ),
        pytest.param(
            stages([(1, steady(2)), (2, ramp(0, 4, 2))]),
            10.0,
            100,
            [0, 0.5, 1, 2, 1 + R2, 1 + R3, 3],
            id="stages-steady-then-ramp-then-stop",
        ),
        pytest.param(
            stages([(1, spike(0, 4, 0.5, 0.5)), (1, stages([(0.5, steady(4))]))]),
            10.0,
            100,
            [0, 0.75, 1, 1.25, 1.5],
            id="stages-nested-local-time",
        ),
    ],
)
def test_constant_arrivals_exact_times(
    pattern: Pattern, duration_s: float, max_requests: int, want: list[float]
) -> None:
    assert_times(schedule(pattern, duration_s=duration_s, max_requests=max_requests), want)


def wave_integral(w: Wave, t: float) -> float:
    omega = 2 * math.pi / w.period_s
    return w.mean_rps * t - w.amplitude_rps / omega * (math.cos(omega * t) - 1)


def test_wave_inverts_the_integral_and_counts_a_whole_period() -> None:
    w = wave(4, 2, 10)
    times = schedule(w, duration_s=10)
    assert len(times) == 40  # mean * period over a whole period
    for k, t in enumerate(times):
        assert abs(wave_integral(w, t) - k) <= 6 * EXACT  # rate <= 6 rps, bisection to 1e-9 s
    # Rising half (integral 20 + 20/pi = 26.4) sends more than the falling half.
    assert sum(t < 5 for t in times) == 27
    assert len(schedule(w, duration_s=20)) == 80


def test_wave_with_no_amplitude_is_steady() -> None:
    assert_times(schedule(wave(4, 0, 3), duration_s=2), schedule(steady(4), duration_s=2))


def test_poisson_is_reproducible_with_a_seed() -> None:
    def run(seed: int) -> list[float]:
        return schedule(steady(5), duration_s=20, arrivals="poisson", rng=random.Random(seed))

    assert run(1) == run(1)
    assert run(1) != run(2)
    times = run(1)
    assert times == sorted(times)
    assert times[0] > 0
    assert times[-1] < 20


def test_poisson_mean_rate_within_tolerance() -> None:
    times = schedule(steady(10), duration_s=1000, arrivals="poisson", rng=random.Random(7))
    assert abs(len(times) / 1000 - 10) < 0.3  # 3 sigma is ~0.095 rps


def test_poisson_follows_the_pattern_by_time_rescaling() -> None:
    times = schedule(ramp(0, 20, 100), duration_s=100, arrivals="poisson", rng=random.Random(3))
    first, second = sum(t < 50 for t in times), sum(t >= 50 for t in times)
    assert abs(first - 250) < 60  # the integral of the rate over [0, 50)
    assert abs(second - 750) < 90  # and over [50, 100)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"duration_s": 0.0}, "duration_s", id="zero-duration"),
        pytest.param({"duration_s": math.inf}, "duration_s", id="infinite-duration"),
        pytest.param({"duration_s": 1.0, "max_requests": 0}, "max_requests", id="no-requests"),
        pytest.param({"duration_s": 1.0, "arrivals": "poisson"}, "rng", id="poisson-no-rng"),
        pytest.param({"duration_s": 1.0, "arrivals": "uniform"}, "arrivals", id="bad-arrivals"),
    ],
)
def test_schedule_rejects_bad_bounds(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        schedule(steady(1), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        pytest.param(lambda: Steady(0), "steady rate must be a finite number > 0", id="zero-rate"),
        pytest.param(lambda: Steady(math.nan), "steady rate", id="nan-rate"),
        pytest.param(lambda: Ramp(-1, 2, 1), "ramp from must be", id="negative-from"),
        pytest.param(lambda: Ramp(0, 0, 1), "from or to > 0", id="ramp-all-zero"),
        pytest.param(lambda: Ramp(1, 2, 0), "ramp over", id="ramp-instant"),
        pytest.param(lambda: Spike(1, 0, 1, 1), "spike peak", id="spike-no-peak"),
        pytest.param(lambda: Spike(1, 2, 1, 0), "spike for", id="spike-no-length"),
        pytest.param(lambda: Wave(2, 3, 10), "amplitude .* must be <= mean", id="wave-below-0"),
        pytest.param(lambda: Wave(2, 1, 0), "wave period", id="wave-no-period"),
        pytest.param(
            lambda: Burst(1, 5, 2, 2), r"burst for \(2\) must be < every", id="burst-long"
        ),
        pytest.param(lambda: Stages(()), "at least one", id="stages-empty"),
        pytest.param(lambda: stages([(0, steady(1))]), "stage 1 duration", id="stage-zero"),
    ],
)
def test_patterns_validate(build: object, match: str) -> None:
    assert callable(build)
    with pytest.raises(ConfigError, match=match):
        build()


@pytest.mark.parametrize(
    ("text", "want"),
    [
        pytest.param("steady:rate=4", Steady(4), id="steady"),
        pytest.param("ramp:from=0,to=10,over=60", Ramp(0, 10, 60), id="ramp"),
        pytest.param("spike:base=2,peak=40,at=30,for=60", Spike(2, 40, 30, 60), id="spike"),
        pytest.param(
            " Spike: for=60, at=30, peak=40, base=2 ", Spike(2, 40, 30, 60), id="any-order"
        ),
        pytest.param("wave:mean=5,amplitude=3,period=60", Wave(5, 3, 60), id="wave"),
        pytest.param("burst:base=1,burst=20,every=30,for=5", Burst(1, 20, 30, 5), id="burst"),
        pytest.param(
            "stages:30=steady:rate=2;60=ramp:from=2,to=10,over=60",
            Stages(((30, Steady(2)), (60, Ramp(2, 10, 60)))),
            id="stages",
        ),
    ],
)
def test_parse_pattern(text: str, want: Pattern) -> None:
    assert parse_pattern(text) == want


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("steady", "expected KIND:key=value", id="no-colon"),
        pytest.param("zigzag:rate=1", "unknown kind 'zigzag'", id="unknown-kind"),
        pytest.param("spike:base=2,peak=40", "spike needs at, for", id="missing-keys"),
        pytest.param("steady:rate=fast", "rate 'fast' is not a number", id="not-a-number"),
        pytest.param("steady:rate=1,rate=2", "'rate' given twice", id="duplicate"),
        pytest.param("steady:speed=1", "steady has no 'speed'", id="unknown-key"),
        pytest.param("steady:rate", "'rate' is not key=value", id="no-equals"),
        pytest.param("wave:mean=1,amplitude=2,period=10", "must be <= mean", id="invalid-values"),
        pytest.param("stages:30", "is not DURATION=PATTERN", id="stage-no-pattern"),
        pytest.param("stages:x=steady:rate=1", "stage duration 'x'", id="stage-bad-duration"),
    ],
)
def test_parse_pattern_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_pattern(text)


def test_closed_loop_validates() -> None:
    assert ClosedLoop(users=8, think_time_s=0.5) == ClosedLoop(8, 0.5)
    for users, think in [(0, 0.0), (True, 0.0), (1, -1.0), (1, math.inf)]:
        with pytest.raises(ConfigError, match="closed loop"):
            ClosedLoop(users, think)


CSV_SECONDS = (
    'timestamp,prompt_tokens,output_tokens,prompt\n100.5,10,20,hello\n100,5,,\n102,,7,"a, b"\n'
)
CSV_ISO = "timestamp\n2024-05-01T12:00:00Z\n2024-05-01T12:00:01.500+00:00\n2024-05-01T12:00:03\n"
JSONL = (
    '{"timestamp": 10, "prompt_tokens": 3}\n\n'
    '{"timestamp": "14", "output_tokens": 9, "prompt": "hi"}\n'
    '{"timestamp": 11.0}\n'
)


@pytest.mark.parametrize(
    ("text", "fmt", "speedup", "want"),
    [
        pytest.param(
            CSV_SECONDS,
            "csv",
            1.0,
            [TraceEntry(0, 5), TraceEntry(0.5, 10, 20, "hello"), TraceEntry(2, None, 7, "a, b")],
            id="csv-seconds-sorted",
        ),
        pytest.param(
            CSV_ISO,
            "csv",
            1.0,
            [TraceEntry(0), TraceEntry(1.5), TraceEntry(3)],
            id="csv-iso-naive-as-utc",
        ),
        pytest.param(
            JSONL,
            "jsonl",
            2.0,
            [TraceEntry(0, 3), TraceEntry(0.5), TraceEntry(2, None, 9, "hi")],
            id="jsonl-speedup-2",
        ),
    ],
)
def test_parse_trace(text: str, fmt: TraceFormat, speedup: float, want: list[TraceEntry]) -> None:
    assert parse_trace(text, fmt=fmt, speedup=speedup) == want


@pytest.mark.parametrize(
    ("text", "fmt", "match"),
    [
        pytest.param("time,prompt\n1,a\n", "csv", "line 1: .*no 'timestamp'", id="csv-no-column"),
        pytest.param("timestamp\n1\nsoon\n", "csv", "line 3: timestamp 'soon'", id="csv-bad-ts"),
        pytest.param("timestamp\n\n1,2\n", "csv", "line 3: more fields", id="csv-extra-field"),
        pytest.param(
            "timestamp,prompt_tokens\n1,-2\n", "csv", "line 2: prompt_tokens", id="csv-negative"
        ),
        pytest.param("timestamp\n", "csv", "no requests", id="csv-empty"),
        pytest.param('{"timestamp": 1}\n{oops\n', "jsonl", "line 2: not valid JSON", id="jsonl"),
        pytest.param("[1]\n", "jsonl", "line 1: expected a JSON object", id="jsonl-array"),
        pytest.param(
            '{"prompt": "x"}\n', "jsonl", "line 1: timestamp is missing", id="jsonl-no-ts"
        ),
        pytest.param(
            '{"timestamp": 1, "output_tokens": 2.5}\n', "jsonl", "line 1: output_tokens", id="frac"
        ),
        pytest.param('{"timestamp": 1, "prompt": 3}\n', "jsonl", "line 1: prompt", id="prompt-int"),
    ],
)
def test_parse_trace_errors_name_the_line(text: str, fmt: TraceFormat, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_trace(text, fmt=fmt)


def test_parse_trace_rejects_bad_speedup() -> None:
    with pytest.raises(ConfigError, match="speedup"):
        parse_trace(JSONL, fmt="jsonl", speedup=0)


def test_read_trace_picks_format_by_suffix(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(JSONL, encoding="utf-8")
    (tmp_path / "t.csv").write_text(CSV_SECONDS, encoding="utf-8")
    assert [e.offset_s for e in read_trace(tmp_path / "t.jsonl")] == [0, 1, 4]
    assert [e.offset_s for e in read_trace(tmp_path / "t.csv", speedup=0.5)] == [0, 1, 4]
    with pytest.raises(ConfigError, match="cannot read trace"):
        read_trace(tmp_path / "missing.csv")


def test_bound_trace_applies_duration_and_max_requests() -> None:
    entries = [TraceEntry(float(i)) for i in range(10)]
    assert [e.offset_s for e in bound_trace(entries, duration_s=5)] == [0, 1, 2, 3, 4]
    assert [e.offset_s for e in bound_trace(entries, duration_s=5, max_requests=2)] == [0, 1]


# --- the value of a pattern at a time (closed-loop user counts) --------------------------------


@pytest.mark.parametrize(
    ("pattern", "times", "values"),
    [
        pytest.param(steady(3.0), [0.0, 1e6], [3.0, 3.0], id="steady"),
        pytest.param(ramp(0, 10, 10), [0.0, 2.5, 10.0, 99.0], [0.0, 2.5, 10.0, 10.0], id="ramp"),
        pytest.param(spike(2, 40, 30, 60), [0.0, 29.999, 30.0, 89.999, 90.0],
                     [2.0, 2.0, 40.0, 40.0, 2.0], id="spike-steps-at-its-edges"),
        pytest.param(spike(2, 40, 0, 5), [0.0, 5.0], [40.0, 2.0], id="spike-at-zero"),
        pytest.param(wave(10, 5, 4), [0.0, 1.0, 2.0, 3.0, 4.0], [10.0, 15.0, 10.0, 5.0, 10.0],
                     id="wave"),
        pytest.param(burst(1, 9, 10, 2), [0.0, 10.0, 11.9, 12.0, 20.5], [1.0, 9.0, 9.0, 1.0, 9.0],
                     id="burst"),
        pytest.param(stages([(10.0, steady(2.0)), (5.0, ramp(0, 10, 5))]),
                     [9.99, 10.0, 12.5, 15.0], [2.0, 0.0, 5.0, 0.0], id="stages-then-zero"),
    ],
)  # fmt: skip
def test_value_at(pattern: Pattern, times: list[float], values: list[float]) -> None:
    assert [value_at(pattern, t) for t in times] == pytest.approx(values, abs=EXACT)


@pytest.mark.parametrize(
    ("loop", "t", "users"),
    [
        pytest.param(ClosedLoop(8), 100.0, 8, id="no-pattern"),
        pytest.param(ClosedLoop(40, pattern=spike(2, 40, 30, 60)), 10.0, 2, id="spike-base"),
        pytest.param(ClosedLoop(40, pattern=spike(2, 40, 30, 60)), 30.0, 40, id="spike-peak"),
        pytest.param(ClosedLoop(20, pattern=spike(2, 40, 30, 60)), 30.0, 20, id="capped"),
        pytest.param(ClosedLoop(9, pattern=ramp(0, 9, 9)), 2.4, 2, id="rounded-down"),
        pytest.param(ClosedLoop(9, pattern=ramp(0, 9, 9)), 2.6, 3, id="rounded-up"),
    ],
)
def test_active_users(loop: ClosedLoop, t: float, users: int) -> None:
    assert active_users(loop, t) == users
