"""Per-request latencies and exact percentiles: the arithmetic under bench's stats.

Definitions follow vLLM's serving benchmark (`vllm bench serve`), with latency counted from
the schedule's intended send time (see `records.py`):

- TTFT = first_token_s - intended_s
- ITL  = the gaps between consecutive token chunks of one request (pooled over requests)
- TPOT = (end_s - first_token_s) / (output_tokens - 1), per request with > 1 output token
- e2e  = end_s - intended_s

Percentiles are `fleetserve.telemetry.quantiles.percentile`: linear interpolation between
order statistics, numpy's default, as vLLM's benchmark reports them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from fleetserve.bench.records import RequestRecord
from fleetserve.bench.report.model import Percentiles
from fleetserve.telemetry.quantiles import percentile


def describe(values: Iterable[float]) -> Percentiles:
    """Count, mean, min, p50/p90/p95/p99 and max of a sample (all None when empty)."""
    ordered = sorted(values)
    if not ordered:
        return Percentiles()
    return Percentiles(
        count=len(ordered),
        mean=math.fsum(ordered) / len(ordered),
        min=ordered[0],
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p95=percentile(ordered, 95),
        p99=percentile(ordered, 99),
        max=ordered[-1],
    )


@dataclass(frozen=True, slots=True)
class RequestTimes:
    """One request's latencies in seconds; None where the request has no such figure."""

    ttft_s: float | None  # None: no token chunk came (failed, or not streamed)
    tpot_s: float | None  # None: fewer than 2 output tokens, or no first token
    e2e_s: float
    itl_s: tuple[float, ...]


def request_times(record: RequestRecord) -> RequestTimes:
    first = record.first_token_s
    ttft = None if first is None else first - record.intended_s
    tokens = record.output_tokens
    tpot = None
    if first is not None and tokens is not None and tokens > 1:
        tpot = (record.end_s - first) / (tokens - 1)
    times = record.token_times_s
    gaps = tuple(later - earlier for earlier, later in itertools.pairwise(times))
    return RequestTimes(
        ttft_s=ttft, tpot_s=tpot, e2e_s=record.end_s - record.intended_s, itl_s=gaps
    )


@dataclass(slots=True)
class Samples:
    """Every latency of the run's successful requests, by metric, ascending after `sort`."""

    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)

    def of(self, metric: str) -> list[float]:
        values: list[float] = getattr(self, f"{metric}_s")
        return values


def collect_samples(times: Iterable[RequestTimes]) -> Samples:
    """Pool the latencies of successful requests (pass only those) into sorted samples."""
    samples = Samples()
    for t in times:
        if t.ttft_s is not None:
            samples.ttft_s.append(t.ttft_s)
        if t.tpot_s is not None:
            samples.tpot_s.append(t.tpot_s)
        samples.itl_s.extend(t.itl_s)
        samples.e2e_s.append(t.e2e_s)
    for values in (samples.ttft_s, samples.tpot_s, samples.itl_s, samples.e2e_s):
        values.sort()
    return samples
