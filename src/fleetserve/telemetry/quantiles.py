"""The one definition of a percentile of a sample that fleetserve reports (bench, benchmarks).

Linear interpolation between the closest ranks: the p-th percentile of ascending x[0..n-1]
is read at rank h = (n - 1) * p / 100, between x[floor(h)] and x[floor(h) + 1]. That is
numpy's default method ("linear", Hyndman and Fan's type 7), the one vLLM's serving
benchmark reports through `np.percentile`, so figures compare with it. It lives in layer 0 so
that bench, the simulator and the benchmarks share it.

The gateway's load window reports a different thing, a quantile of a histogram of bins
(`telemetry.window`), read without the samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) of an ascending, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of an empty sample")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p!r}")
    rank = (len(sorted_values) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    frac = rank - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * frac


def percentile_of(values: Iterable[float], p: float) -> float | None:
    """`percentile` of values in any order; None when there are none."""
    ordered = sorted(values)
    return percentile(ordered, p) if ordered else None
