"""One summary of a load generator's run, computed the same way for fleetserve bench and GuideLLM.

Each tool's requests come in as (intended, sent, end) times on one clock plus an error kind:
the lag is sent - intended (GuideLLM calls it the dispatch delay: `request_start -
targeted_start`), the achieved rate counts successful requests over the span from the first
intended send to the last answer (a generator that falls behind stretches the span), and the
most in flight is counted from send to end. Lag percentiles are fleetserve's one definition
(`telemetry.quantiles`, linear interpolation as numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fleetserve.telemetry.quantiles import percentile_of

LAG_P99_TARGET_S = 0.005
ACHIEVED_FRACTION = 0.95  # of the asked rate, for a rate to count as sustained


@dataclass(frozen=True, slots=True)
class Timing:
    intended_s: float
    sent_s: float  # nan: never sent
    end_s: float
    error: str | None  # None: a whole, valid answer


@dataclass(frozen=True, slots=True)
class RunStats:
    tool: str
    asked: float  # req/s (open loop) or streams (closed loop)
    expected: int  # requests the schedule held (open loop); 0 for closed loop
    sent: int
    ok: int
    errors: dict[str, int] = field(default_factory=dict)
    achieved_rps: float = 0.0
    lag_p50_s: float = math.nan
    lag_p99_s: float = math.nan
    lag_max_s: float = math.nan
    max_in_flight: int = 0
    cpu_pct: float | None = None  # of one core, over the run (None: not measured)
    note: str = ""  # why the run gave no figures, or what the tool itself warned

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def keeps_rate(self) -> bool:
        """Every scheduled request sent and answered, at >= 95 % of the asked rate (any lag)."""
        return (
            self.sent == self.expected > 0
            and self.ok == self.sent
            and self.achieved_rps >= ACHIEVED_FRACTION * self.asked
        )

    def sustains_rate(self) -> bool:
        """`keeps_rate` with schedule lag p99 under 5 ms."""
        return self.keeps_rate() and self.lag_p99_s < LAG_P99_TARGET_S

    def holds_streams(self) -> bool:
        """Closed loop: no errors and the asked number of streams in flight at once."""
        return self.sent > 0 and self.ok == self.sent and self.max_in_flight >= self.asked


def max_in_flight(timings: Sequence[Timing]) -> int:
    edges = sorted(
        [(t.sent_s, 1) for t in timings if not math.isnan(t.sent_s)]
        + [(t.end_s, -1) for t in timings if not math.isnan(t.sent_s)]
    )
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def summarize(
    tool: str,
    asked: float,
    expected: int,
    timings: Sequence[Timing],
    cpu_pct: float | None = None,
    note: str = "",
) -> RunStats:
    sent = [t for t in timings if not math.isnan(t.sent_s)]
    errors: dict[str, int] = {}
    for t in timings:
        if t.error is not None:
            errors[t.error] = errors.get(t.error, 0) + 1
    ok = [t for t in sent if t.error is None]
    span_s = max(t.end_s for t in ok) - min(t.intended_s for t in timings) if ok else math.nan
    lags = [t.sent_s - t.intended_s for t in sent]
    return RunStats(
        tool=tool,
        asked=asked,
        expected=expected,
        sent=len(sent),
        ok=len(ok),
        errors=errors,
        achieved_rps=len(ok) / span_s if ok and span_s > 0 else 0.0,
        lag_p50_s=_or_nan(percentile_of(lags, 50)),
        lag_p99_s=_or_nan(percentile_of(lags, 99)),
        lag_max_s=max(lags) if lags else math.nan,
        max_in_flight=max_in_flight(timings),
        cpu_pct=cpu_pct,
        note=note,
    )


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def failed_run(tool: str, asked: float, expected: int, why: str) -> RunStats:
    """A run that produced no requests to count (the tool failed to start, crashed, ...)."""
    return RunStats(tool, asked, expected, 0, 0, {"no run": 1}, note=why)
