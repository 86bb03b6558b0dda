"""The simulated engine's statistics, exported under vLLM's metric names.

The scheduler updates plain counters and bucket arrays (no locks, no label lookups: this runs
for every token); a prometheus_client collector renders them at scrape time into a per-engine
`CollectorRegistry`. Names, types, labels (`model_name`, `engine`) and histogram buckets follow
vLLM V1's PrometheusStatLogger (vllm/v1/metrics/loggers.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

# vLLM's buckets, vllm/v1/metrics/loggers.py.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip

FINISH_REASONS = ("stop", "length", "abort")


def build_1_2_5_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: vLLM's buckets for token-count histograms."""
    buckets: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return tuple(buckets)
            buckets.append(float(value))
        scale *= 10


@dataclass(slots=True)
class Histogram:
    """Bucket counts without cumulation; cumulated when rendered."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal", which bisect_left gives.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, value: float, times: int) -> None:
        if times > 0:
            self.counts[bisect_left(self.bounds, value)] += times
            self.total += value * times

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            # repr() of these bounds is what Prometheus' Go formatting gives: 0.001, 1.0, 2560.0.
            out.append((repr(float(bound)), float(running)))
        out.append(("+Inf", float(running + self.counts[-1])))
        return out


@dataclass(slots=True)
class EngineStats:
    """Everything /metrics reports, as plain numbers the scheduler updates."""

    max_model_len: int
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(TOKEN_LATENCY_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(TOKEN_LATENCY_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    prefill: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    decode: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    inference: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    prompt_len: Histogram = field(init=False)
    generation_len: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_len = Histogram(build_1_2_5_buckets(self.max_model_len))
        self.generation_len = Histogram(build_1_2_5_buckets(self.max_model_len))


@dataclass(frozen=True, slots=True)
class LoadGauges:
    """The scheduler state the gauges read at scrape time."""

    running: int
    waiting: int
    kv_usage_frac: float


class VllmMetricsCollector(Collector):
    """Renders `EngineStats` and live gauges as vLLM's metric families."""

    def __init__(
        self, stats: EngineStats, gauges: Callable[[], LoadGauges], model_name: str
    ) -> None:
        self._stats = stats
        self._gauges = gauges
        self._labels = [model_name, "0"]

    def collect(self) -> Iterator[Metric]:
        s, g, labels = self._stats, self._gauges(), self._labels
        names = ["model_name", "engine"]
        yield _gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                     names, labels, g.running)  # fmt: skip
        yield _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                     names, labels, g.waiting)  # fmt: skip
        yield _gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                     names, labels, g.kv_usage_frac)  # fmt: skip
        yield _gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED: Use "
            "vllm:kv_cache_usage_perc instead.",
            names, labels, g.kv_usage_frac,
        )  # fmt: skip
        counters = (
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.",
             s.generation_tokens),
            ("vllm:prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.", s.prefix_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             s.prefix_hits),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
             s.preemptions),
        )  # fmt: skip
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(labels, value)
            yield family
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.",
            labels=[*names, "finished_reason"],
        )  # fmt: skip
        for reason, value in s.finished.items():
            success.add_metric([*labels, reason], value)
        yield success
        histograms = (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
             s.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
             s.itl),
            ("vllm:time_per_output_token_seconds",
             "Histogram of time per output token in seconds.", s.tpot),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
             s.e2e),
            ("vllm:request_queue_time_seconds",
             "Histogram of time spent in WAITING phase for request.", s.queue),
            ("vllm:request_prefill_time_seconds",
             "Histogram of time spent in PREFILL phase for request.", s.prefill),
            ("vllm:request_decode_time_seconds",
             "Histogram of time spent in DECODE phase for request.", s.decode),
            ("vllm:request_inference_time_seconds",
             "Histogram of time spent in RUNNING phase for request.", s.inference),
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", s.prompt_len),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.",
             s.generation_len),
        )  # fmt: skip
        for name, doc, hist in histograms:
            buckets = HistogramMetricFamily(name, doc, labels=names)
            buckets.add_metric(labels, hist.cumulative(), hist.total)
            yield buckets


def _gauge(
    name: str, doc: str, names: Sequence[str], labels: Sequence[str], value: float
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=names)
    family.add_metric(labels, value)
    return family


def build_registry(collector: VllmMetricsCollector) -> CollectorRegistry:
    """A registry of one engine's metrics only; nothing from the process-global registry."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
