"""The saturation point of a rate sweep: where raising the rate stops raising throughput.

`bench --sweep` runs the same load at increasing rates and calls `find_saturation` after
each run; it stops once `saturated` is true. Pure: the caller runs the load.

A sweep saturates at the first run that either broke an SLO, or raised throughput (successful
requests per second) by less than `min_gain_frac` of the previous run's while the rate rose.
The saturation point is the run before it: the highest rate that still paid off.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from fleetserve.bench.report.model import BenchReport

MIN_GAIN_FRAC = 0.05


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One run of a sweep: the rate asked for and what came of it."""

    rate_rps: float
    throughput_rps: float  # successful requests per second
    slo_passed: bool | None = None  # None: no SLO was given or none could be judged

    @classmethod
    def from_report(cls, rate_rps: float, report: BenchReport) -> SweepPoint:
        verdicts = [r.passed for r in report.slo.results if r.passed is not None]
        return cls(
            rate_rps=rate_rps,
            throughput_rps=report.totals.request_rate_rps,
            slo_passed=all(verdicts) if verdicts else None,
        )


@dataclass(frozen=True, slots=True)
class Saturation:
    saturated: bool
    rate_rps: float | None  # the saturation point; None when even the first rate failed
    max_throughput_rps: float
    reason: str


def find_saturation(
    points: Sequence[SweepPoint], *, min_gain_frac: float = MIN_GAIN_FRAC
) -> Saturation:
    """Judge a sweep so far; `points` in the order run, at strictly increasing rates."""
    if not points:
        raise ValueError("find_saturation needs at least one sweep point")
    for earlier, later in itertools.pairwise(points):
        if not later.rate_rps > earlier.rate_rps:
            raise ValueError(
                f"sweep rates must increase: {later.rate_rps:g} after {earlier.rate_rps:g}"
            )
    best = max(point.throughput_rps for point in points)
    for i, point in enumerate(points):
        previous = points[i - 1] if i else None
        if point.slo_passed is False:
            return Saturation(
                saturated=True,
                rate_rps=previous.rate_rps if previous else None,
                max_throughput_rps=best,
                reason=f"SLOs broken at {point.rate_rps:g} rps",
            )
        if previous is None:
            continue
        gain = _gain(previous.throughput_rps, point.throughput_rps)
        if gain < min_gain_frac:
            return Saturation(
                saturated=True,
                rate_rps=previous.rate_rps,
                max_throughput_rps=best,
                reason=(
                    f"throughput rose {gain:+.1%} ({previous.throughput_rps:.3g} -> "
                    f"{point.throughput_rps:.3g} req/s) when the rate rose from "
                    f"{previous.rate_rps:g} to {point.rate_rps:g} rps, "
                    f"less than {min_gain_frac:.0%}"
                ),
            )
    last = points[-1]
    return Saturation(
        saturated=False,
        rate_rps=last.rate_rps,
        max_throughput_rps=best,
        reason=f"throughput still rising at {last.rate_rps:g} rps, the highest rate tried",
    )


def _gain(before: float, after: float) -> float:
    if before > 0:
        return (after - before) / before
    return math.inf if after > 0 else 0.0
