"""Service-level objectives for `fleetserve bench --slo` and goodput against them.

`--slo ttft_p95=2s,tpot=100ms,e2e=10s,itl_p99=50ms`: a bare metric (`tpot=100ms`) bounds every
request; a `_pXX` suffix (`ttft_p95=2s`, `itl_p99.9=80ms`) is a target for the run's
percentile. Goodput is DistServe's (Zhong et al., OSDI 2024): the rate of requests that
succeeded and met every per-request SLO. Per request:

- ttft: the request's TTFT is within the bound (a request with no token chunk misses it);
- tpot: its TPOT is within the bound (fewer than 2 output tokens: met, as vLLM counts it);
- e2e: its end-to-end latency is within the bound;
- itl: every gap between its chunks is within the bound.

A per-request SLO passes when at least `min_attainment` of all requests met it (DistServe's
90 % attainment).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import get_args

from fleetserve.bench.report.model import Goodput, SloMetric, SloReport, SloResult, SloSpec
from fleetserve.bench.samples import RequestTimes, Samples
from fleetserve.errors import ConfigError
from fleetserve.telemetry.quantiles import percentile

MIN_ATTAINMENT = 0.9

_METRICS: tuple[str, ...] = get_args(SloMetric)
_NAME = re.compile(r"^(?P<metric>[a-z0-9]+?)(?:_p(?P<pct>\d+(?:\.\d+)?))?$")
_VALUE = re.compile(r"^(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>ms|s)$")
_EXAMPLE = "e.g. ttft_p95=2s,tpot=100ms,e2e=10s,itl_p99=50ms"


def parse_slos(text: str) -> list[SloSpec]:
    """Parse `--slo` text; raise ConfigError naming the bad part."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise ConfigError(f"--slo is empty; give metric=bound pairs, {_EXAMPLE}")
    specs: list[SloSpec] = []
    seen: set[tuple[str, float | None]] = set()
    for part in parts:
        spec = _parse_one(part)
        key = (spec.metric, spec.percentile)
        if key in seen:
            raise ConfigError(f"--slo names {part.split('=')[0].strip()!r} twice")
        seen.add(key)
        specs.append(spec)
    return specs


def _parse_one(part: str) -> SloSpec:
    if "=" not in part:
        raise ConfigError(f"--slo part {part!r} is not metric=bound ({_EXAMPLE})")
    name, _, value = (piece.strip() for piece in part.partition("="))
    named = _NAME.match(name.lower())
    if named is None or named["metric"] not in _METRICS:
        raise ConfigError(
            f"--slo metric {name!r} is unknown: use one of {', '.join(_METRICS)}, "
            "optionally with a percentile suffix such as _p95"
        )
    pct = None if named["pct"] is None else float(named["pct"])
    if pct is not None and not 0 < pct <= 100:
        raise ConfigError(f"--slo percentile in {name!r} must be in (0, 100]")
    bound = _VALUE.match(value.lower())
    if bound is None:
        raise ConfigError(f"--slo bound {value!r} of {name!r} needs a number and a unit, s or ms")
    bound_s = float(bound["num"]) / (1000 if bound["unit"] == "ms" else 1)
    if not math.isfinite(bound_s) or bound_s <= 0:
        raise ConfigError(f"--slo bound of {name!r} must be > 0, got {value!r}")
    metric: SloMetric = named["metric"]  # type: ignore[assignment]  # checked against _METRICS
    return SloSpec(metric=metric, bound_s=bound_s, percentile=pct, text=f"{name}={value}")


def meets(spec: SloSpec, times: RequestTimes) -> bool:
    """Whether one successful request met a per-request SLO."""
    bound = spec.bound_s
    if spec.metric == "ttft":
        return times.ttft_s is not None and times.ttft_s <= bound
    if spec.metric == "tpot":
        return times.tpot_s is None or times.tpot_s <= bound
    if spec.metric == "e2e":
        return times.e2e_s <= bound
    return all(gap <= bound for gap in times.itl_s)


def evaluate_slos(
    specs: Sequence[SloSpec],
    ok_times: Sequence[RequestTimes],
    samples: Samples,
    *,
    requests: int,
    window_s: float,
    min_attainment: float = MIN_ATTAINMENT,
) -> SloReport:
    """Judge each SLO over a run: `ok_times` are the successful requests' latencies,
    `samples` their pooled sorted latencies, `requests` every request sent."""
    results: list[SloResult] = []
    per_request = [spec for spec in specs if spec.percentile is None]
    for spec in specs:
        if spec.percentile is not None:
            values = samples.of(spec.metric)
            observed = percentile(values, spec.percentile) if values else None
            passed = None if observed is None else observed <= spec.bound_s
            results.append(SloResult(spec=spec, observed_s=observed, passed=passed))
            continue
        met = sum(1 for times in ok_times if meets(spec, times))
        passed = None if requests == 0 else met / requests >= min_attainment
        results.append(SloResult(spec=spec, observed_s=None, met=met, passed=passed))
    goodput = None
    if per_request:
        good = sum(1 for times in ok_times if all(meets(spec, times) for spec in per_request))
        goodput = Goodput(
            good=good,
            rate_rps=good / window_s if window_s > 0 else 0.0,
            attainment=good / requests if requests else 0.0,
        )
    return SloReport(results=results, goodput=goodput)
