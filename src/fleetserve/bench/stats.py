"""A bench run's statistics: from its records to the report model. Pure: no I/O, no clock.

`summarize` is the entry point. Latency definitions and the percentile method are in
`samples.py`, SLOs and goodput in `slo.py`, results over time in `series.py`.

Honest by construction:
- latency is counted from the intended send time, so generator lag is in it, and the report
  says when that lag is large (`LAG_THRESHOLD_S`);
- rates are over the measured window, max(duration asked, last request's end), so requests
  that drained after the duration do not inflate them;
- token counts bench counted itself (no `usage` from the server) are flagged.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from fleetserve.bench.records import FleetSample, RequestRecord
from fleetserve.bench.report.model import (
    BenchReport,
    ErrorExample,
    ErrorSummary,
    FleetPoint,
    Histogram,
    Histograms,
    LagVerdict,
    Latency,
    Percentiles,
    RunConfig,
    SloSpec,
    Totals,
)
from fleetserve.bench.samples import collect_samples, describe, request_times
from fleetserve.bench.series import per_second
from fleetserve.bench.slo import MIN_ATTAINMENT, evaluate_slos
from fleetserve.errors import ConfigError
from fleetserve.telemetry.quantiles import percentile

# Schedule lag p99 above this means the generator fell behind. 5 ms is the capacity bar of
# issue 4 and a few times asyncio's timer jitter; it is fixed rather than relative to TTFT
# so that a fast target (TTFT of a few ms) is not judged more leniently than a slow one.
LAG_THRESHOLD_S = 0.005
HISTOGRAM_BINS = 40
ERROR_EXAMPLES = 10


def summarize(
    records: Sequence[RequestRecord],
    *,
    duration_s: float,
    config: RunConfig,
    fleet: Sequence[FleetSample] = (),
    slos: Sequence[SloSpec] = (),
    lag_threshold_s: float = LAG_THRESHOLD_S,
    min_attainment: float = MIN_ATTAINMENT,
) -> BenchReport:
    """Build the report of one run. `duration_s` is the run's measured duration (> 0)."""
    if not math.isfinite(duration_s) or duration_s <= 0:
        raise ConfigError(f"duration_s must be a finite number > 0, got {duration_s!r}")
    for record in records:
        if not all(map(math.isfinite, (record.intended_s, record.sent_s, record.end_s))):
            raise ValueError(f"request {record.index} has a time that is not a finite number")
    window_s = max([duration_s, *(r.end_s for r in records)])
    ok = [r for r in records if r.ok]
    ok_times = [request_times(r) for r in ok]
    samples = collect_samples(ok_times)
    latency = Latency(
        ttft_s=describe(samples.ttft_s),
        tpot_s=describe(samples.tpot_s),
        itl_s=describe(samples.itl_s),
        e2e_s=describe(samples.e2e_s),
    )
    totals = _totals(records, ok, window_s)
    lag = lag_verdict([r.lag_s for r in records], latency.ttft_s, lag_threshold_s)
    slo = evaluate_slos(
        slos,
        ok_times,
        samples,
        requests=len(records),
        window_s=window_s,
        min_attainment=min_attainment,
    )
    return BenchReport(
        config=config,
        totals=totals,
        latency=latency,
        histograms=Histograms(
            ttft_s=histogram(samples.ttft_s),
            itl_s=histogram(samples.itl_s),
            tpot_s=histogram(samples.tpot_s),
            e2e_s=histogram(samples.e2e_s),
        ),
        lag=lag,
        errors=_errors(records),
        slo=slo,
        series=per_second(records, window_s, fleet),
        fleet=[_fleet_point(sample) for sample in sorted(fleet, key=lambda s: s.t_s)],
        notes=_notes(records, totals, lag, config),
    )


def _totals(records: Sequence[RequestRecord], ok: list[RequestRecord], window_s: float) -> Totals:
    output = sum(r.output_tokens or 0 for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    errors = len(records) - len(ok)
    return Totals(
        requests=len(records),
        ok=len(ok),
        errors=errors,
        error_rate=errors / len(records) if records else 0.0,
        window_s=window_s,
        request_rate_rps=len(ok) / window_s,
        sent_rate_rps=len(records) / window_s,
        output_token_rate_tps=output / window_s,
        total_token_rate_tps=(prompt + output) / window_s,
        prompt_tokens=prompt,
        output_tokens=output,
        tokens_counted=sum(
            1 for r in ok if r.output_tokens is not None and not r.tokens_from_usage
        ),
        prompt_tokens_unknown=sum(1 for r in ok if r.prompt_tokens is None),
    )


def lag_verdict(lags_s: Sequence[float], ttft_s: Percentiles, threshold_s: float) -> LagVerdict:
    """Whether the generator kept to its schedule, in words a reader cannot misread."""
    if not lags_s:
        return LagVerdict(
            p50_s=None, p99_s=None, max_s=None, threshold_s=threshold_s, kept_up=True,
            message="No request was sent, so there is no schedule lag to judge.",
        )  # fmt: skip
    ordered = sorted(lags_s)
    p50, p99, worst = percentile(ordered, 50), percentile(ordered, 99), ordered[-1]
    kept_up = p99 <= threshold_s
    figures = f"send lag p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, max {worst * 1e3:.2f} ms"
    if ttft_s.p50:
        figures += f"; lag p99 is {p99 / ttft_s.p50:.1%} of TTFT p50"
    if kept_up:
        message = f"The load generator kept to its schedule ({figures})."
    else:
        message = (
            f"The load generator could NOT keep up with its schedule ({figures}, over the "
            f"{threshold_s * 1e3:g} ms limit). Latencies are counted from the intended send "
            "times and include this lag: lower the rate or split the load over more bench "
            "processes to see the target's own latency."
        )
    return LagVerdict(
        p50_s=p50, p99_s=p99, max_s=worst, threshold_s=threshold_s, kept_up=kept_up,
        message=message,
    )  # fmt: skip


def histogram(sorted_values: Sequence[float], bins: int = HISTOGRAM_BINS) -> Histogram:
    """Equal-width bins from the minimum to the maximum, or to p99 when the tail is long
    (max above twice p99): values above the last edge go to `overflow`."""
    if not sorted_values:
        return Histogram()
    low, high = sorted_values[0], sorted_values[-1]
    p99 = percentile(sorted_values, 99)
    if high > 2 * p99 > 0 and p99 > low:
        high = p99
    width = (high - low) / bins if high > low else max(abs(low) * 0.01, 1e-6)
    edges = [low + i * width for i in range(bins + 1)] if high > low else [low, low + width]
    counts = [0] * (len(edges) - 1)
    overflow = 0
    for value in sorted_values:
        if value > edges[-1]:
            overflow += 1
            continue
        counts[min(int((value - low) / width), len(counts) - 1)] += 1
    return Histogram(edges_s=edges, counts=counts, overflow=overflow)


_NUMBERS = re.compile(r"\d+(?:\.\d+)?")


def _errors(records: Sequence[RequestRecord]) -> ErrorSummary:
    failed = [r for r in records if not r.ok]
    by_kind = Counter(str(r.error_kind) for r in failed)
    by_status = Counter("none" if r.status is None else str(r.status) for r in failed)
    # Messages that differ only in numbers ("cold start, 42.7 s left") are one kind of error:
    # they are counted together and shown by their first example.
    groups: Counter[tuple[str, int | None, str]] = Counter()
    first: dict[tuple[str, int | None, str], str] = {}
    for r in failed:
        key = (str(r.error_kind), r.status, _NUMBERS.sub("#", r.error or ""))
        groups[key] += 1
        first.setdefault(key, r.error or "")
    return ErrorSummary(
        by_kind=dict(by_kind.most_common()),
        by_status=dict(by_status.most_common()),
        examples=[
            ErrorExample(kind=kind, status=status, message=first[key], count=count)
            for key, count in groups.most_common(ERROR_EXAMPLES)
            for kind, status, _ in (key,)
        ],
    )


def _fleet_point(sample: FleetSample) -> FleetPoint:
    return FleetPoint(
        t_s=sample.t_s,
        replicas_ready=sample.replicas_ready,
        replicas_desired=sample.replicas_desired,
        replicas_starting=sample.replicas_starting,
        replicas_draining=sample.replicas_draining,
        in_flight=sample.in_flight,
        queue_depth=sample.queue_depth,
    )


def _notes(
    records: Sequence[RequestRecord], totals: Totals, lag: LagVerdict, config: RunConfig
) -> list[str]:
    notes: list[str] = []
    if config.simulated:
        notes.append(
            "SIMULATION: the target is a simulated engine; these figures come from its "
            f"latency model, not from hardware. {config.simulation_note or ''}".strip()
        )
    if not records:
        notes.append("No request was sent: every figure is empty.")
    elif totals.ok == 0:
        notes.append("No request succeeded: latency figures are empty; see the errors.")
    if not lag.kept_up:
        notes.append(lag.message)
    if totals.tokens_counted:
        notes.append(
            f"{totals.tokens_counted} requests' tokens were counted from chunks, not reported "
            "by the server (one chunk may carry several tokens: token rates and TPOT may be off)."
        )
    if totals.ok and totals.prompt_tokens_unknown:
        notes.append(
            f"{totals.prompt_tokens_unknown} successful requests have no prompt token count: "
            "the total token rate leaves their prompts out."
        )
    cancelled = sum(1 for r in records if r.error_kind == "cancelled")
    if cancelled:
        notes.append(
            f"{cancelled} requests were cancelled (skipped at the in-flight cap, or still in "
            "flight when the run ended); they count as errors."
        )
    not_streamed = sum(1 for r in records if r.ok and not r.stream)
    if not_streamed:
        notes.append(
            f"{not_streamed} successful requests were not streamed: they have no TTFT, ITL or TPOT."
        )
    return notes
