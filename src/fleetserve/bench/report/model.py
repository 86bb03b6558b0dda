"""The one data model of a `fleetserve bench` run's report.

`fleetserve.bench.stats.summarize` builds it from the run's records; the console, JSON, CSV
and HTML renderers only read it, and `report.json` loads back into it for `bench compare`.
Every time is in seconds (names end in `_s`), every rate says its unit (`_rps`, `_tps`).
Latency distributions hold successful requests only; failures are counted in `errors`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

SloMetric = Literal["ttft", "tpot", "e2e", "itl"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RunConfig(_Frozen):
    """What was run against what, as the CLI describes it."""

    url: str
    model: str
    load: str  # a human description of the shape, e.g. "open loop, poisson, steady 10 rps"
    duration_s: float  # the duration asked for
    stream: bool = True
    started_at: str | None = None  # ISO 8601 wall-clock time of the run's start
    # True when the target says it is a simulation (fleetserve's sim engine): every page and
    # table of the report then carries `simulation_note` so nobody mistakes it for hardware.
    simulated: bool = False
    simulation_note: str | None = None
    options: dict[str, str] = Field(default_factory=dict)  # other settings worth showing


class Percentiles(_Frozen):
    """Exact order statistics of a sample (linear interpolation, numpy's default method).

    All values are None when `count` is 0.
    """

    count: int = 0
    mean: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None


class Latency(_Frozen):
    """TTFT, TPOT, ITL and end-to-end latency, in seconds, by vLLM's benchmark definitions."""

    ttft_s: Percentiles  # first_token_s - intended_s
    tpot_s: Percentiles  # per request: (end_s - first_token_s) / (output_tokens - 1)
    itl_s: Percentiles  # every gap between consecutive token chunks, pooled over requests
    e2e_s: Percentiles  # end_s - intended_s


class Histogram(_Frozen):
    """Counts in equal-width bins; `overflow` counts values above the last edge."""

    edges_s: list[float] = Field(default_factory=list)  # len(counts) + 1 edges, or none
    counts: list[int] = Field(default_factory=list)
    overflow: int = 0


class Histograms(_Frozen):
    ttft_s: Histogram = Histogram()
    itl_s: Histogram = Histogram()
    tpot_s: Histogram = Histogram()
    e2e_s: Histogram = Histogram()


class Totals(_Frozen):
    """Counts and rates over the measured window."""

    requests: int  # every request sent (ok, failed and cancelled)
    ok: int
    errors: int
    error_rate: float  # errors / requests (0 for an empty run)
    window_s: float  # the measured window: max(duration asked, last request's end)
    request_rate_rps: float  # ok / window_s
    sent_rate_rps: float  # requests / window_s: what the generator achieved
    output_token_rate_tps: float  # output tokens of ok requests / window_s
    total_token_rate_tps: float  # (prompt + output tokens of ok requests) / window_s
    prompt_tokens: int
    output_tokens: int
    tokens_counted: int  # ok requests whose token counts bench counted from chunks
    prompt_tokens_unknown: int  # ok requests without a prompt token count


class LagVerdict(_Frozen):
    """How far actual sends trailed the schedule, and whether that makes the run suspect."""

    p50_s: float | None
    p99_s: float | None
    max_s: float | None
    threshold_s: float
    kept_up: bool
    message: str


class ErrorExample(_Frozen):
    kind: str
    status: int | None
    message: str
    count: int


class ErrorSummary(_Frozen):
    by_kind: dict[str, int] = Field(default_factory=dict)
    by_status: dict[str, int] = Field(default_factory=dict)  # "503", or "none": no response head
    examples: list[ErrorExample] = Field(default_factory=list)  # most frequent messages first


class SloSpec(_Frozen):
    """One service-level objective: a per-request bound, or a percentile target of the run."""

    metric: SloMetric
    bound_s: float
    percentile: float | None = None  # None: every request must meet `bound_s`
    text: str  # as given, e.g. "ttft_p95=2s"


class SloResult(_Frozen):
    spec: SloSpec
    observed_s: float | None  # the run's percentile (percentile SLOs) or None
    met: int | None = None  # per-request SLOs: ok requests that met the bound
    passed: bool | None  # None: no data to judge (e.g. no TTFT on non-streaming requests)


class Goodput(_Frozen):
    """DistServe's goodput: ok requests that met every per-request SLO, per second."""

    good: int
    rate_rps: float  # good / window_s
    attainment: float  # good / requests (failed requests count as missed)


class SloReport(_Frozen):
    results: list[SloResult] = Field(default_factory=list)
    goodput: Goodput | None = None  # None when no per-request SLO was given


class SecondBucket(_Frozen):
    """One second of the run: [t_s, t_s + 1)."""

    t_s: int
    sent: int  # requests whose intended send time falls in this second
    completed: int  # ok requests that ended in this second
    errors: int  # failed requests that ended in this second
    output_tps: float  # output tokens whose chunks arrived in this second
    ttft_p50_s: float | None = None  # of ok requests that ended in this second
    ttft_p95_s: float | None = None
    e2e_p50_s: float | None = None
    e2e_p95_s: float | None = None
    itl_p95_s: float | None = None  # of gaps that ended in this second
    in_flight_mean: float = 0.0  # time-weighted mean of requests in flight
    # The fleet at the end of this second, last sample carried forward (None: unknown).
    replicas_ready: int | None = None
    replicas_desired: int | None = None
    queue_depth: int | None = None


class FleetPoint(_Frozen):
    """A fleet sample, as recorded (see `fleetserve.bench.records.FleetSample`)."""

    t_s: float
    replicas_ready: int | None = None
    replicas_desired: int | None = None
    replicas_starting: int | None = None
    replicas_draining: int | None = None
    in_flight: int | None = None
    queue_depth: int | None = None


class TenantSummary(_Frozen):
    """One tenant of a `bench --tenants` run, on the run's measured window.

    Requests are sent = ok + rejected + errors. Rejected ones were refused by the target's
    admission (HTTP 401, 403, 429): counted by the OpenAI error code, not as failures of the
    target. Tokens and latencies are of ok requests, as in the totals.
    """

    name: str
    key_prefix: str | None = None  # the key's public prefix `fs-XXXXXXXX`; never the secret
    key_source: str = "none"  # "key" (the file), "key_env NAME", "--api-key" or "none"
    load: str  # e.g. "closed loop, 10 users"
    model: str
    stream: bool = True
    requests: int
    ok: int
    rejected: int
    rejected_by_reason: dict[str, int] = Field(default_factory=dict)  # code -> count
    errors: int  # failed otherwise: timeouts, 5xx, other 4xx, cancelled ...
    prompt_tokens: int
    output_tokens: int
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    e2e_p95_s: float | None = None
    request_rate_rps: float  # ok / window_s
    output_token_rate_tps: float  # output tokens / window_s
    output_share_frac: float  # this tenant's part of every tenant's output tokens (0..1)
    # The last x-ratelimit-remaining-* the target sent this tenant (None: it sent none).
    ratelimit_remaining_requests: int | None = None
    ratelimit_remaining_tokens: int | None = None


class BenchReport(_Frozen):
    schema_version: int = SCHEMA_VERSION
    config: RunConfig
    totals: Totals
    latency: Latency
    histograms: Histograms = Histograms()
    lag: LagVerdict
    errors: ErrorSummary = ErrorSummary()
    slo: SloReport = SloReport()
    series: list[SecondBucket] = Field(default_factory=list)
    fleet: list[FleetPoint] = Field(default_factory=list)
    tenants: list[TenantSummary] = Field(default_factory=list)  # `bench --tenants` runs only
    notes: list[str] = Field(default_factory=list)  # warnings a reader must see
