"""The gateway's Prometheus metrics.

With several worker processes, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR
set before import) sums every worker's values at scrape time, so /metrics answers for the
whole gateway rather than the one worker that served the scrape.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

# Buckets in seconds. TTFT and ITL follow vLLM's own histograms so the two line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5,
               5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
               1920.0, 7680.0)  # fmt: skip
# Holds last from a request's wait for a warm replica (ms) to a cold start (tens of seconds)
# up to the hold timeout (120 s by default).
HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0,
                90.0, 120.0, 180.0, 300.0, 600.0)  # fmt: skip

StateCounts = Callable[[], Iterable[tuple[str, str, int]]]
ServiceCounts = Callable[[], Iterable[tuple[str, bool, int]]]
"""(service, running, restarts) of each supervised background service."""


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class GatewayMetrics:
    """Metric objects of one gateway worker; children are cached per model for the hot path."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        multiproc = multiprocess_dir() is not None
        reg = None if multiproc else (registry or CollectorRegistry())
        self.registry = reg
        self.requests = Counter(
            "fleetserve_requests", "Requests answered, by model and HTTP status.",
            ["model", "status"], registry=reg,
        )  # fmt: skip
        self.ttft = Histogram(
            "fleetserve_ttft_seconds",
            "Time to first token of streams at the gateway, from the end of the request body.",
            ["model"], buckets=TTFT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.itl = Histogram(
            "fleetserve_itl_seconds",
            "Inter-token latency at the gateway: the gap between stream events that carry "
            "generated output (content, reasoning, tool calls, text).",
            ["model"], buckets=ITL_BUCKETS, registry=reg,
        )  # fmt: skip
        # Served requests only (2xx from a replica, stream not cut), so its quantiles describe
        # serving; rejections and failures are counted in fleetserve_requests by status.
        self.e2e = Histogram(
            "fleetserve_e2e_seconds",
            "End of the request body to the last byte of the answer, for served requests.",
            ["model"], buckets=E2E_BUCKETS, registry=reg,
        )  # fmt: skip
        self.in_flight = Gauge(
            "fleetserve_in_flight", "Requests being proxied now.", ["model"],
            registry=reg, multiprocess_mode="livesum",
        )  # fmt: skip
        self.retries = Counter(
            "fleetserve_retries", "Attempts retried on another replica, by reason.",
            ["model", "reason"], registry=reg,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "fleetserve_upstream_errors", "Failed attempts against replicas, by kind.",
            ["model", "kind"], registry=reg,
        )  # fmt: skip
        self.held = Gauge(
            "fleetserve_held_requests", "Requests held now, waiting for a replica of their model.",
            ["model"], registry=reg, multiprocess_mode="livesum",
        )  # fmt: skip
        self.hold = Histogram(
            "fleetserve_hold_seconds",
            "Time a held request waited at the gateway for a replica, all its holds together.",
            ["model"], buckets=HOLD_BUCKETS, registry=reg,
        )  # fmt: skip
        self.client_timeouts = Counter(
            "fleetserve_client_timeouts",
            "Clients cut off for being slow: kind header_read and body_read (answered 408), "
            "write_stall (a stream the client stopped reading).",
            ["kind"], registry=reg,
        )  # fmt: skip
        # Set by the autoscaler, which runs in one process: the most recent value wins.
        self.desired_replicas = Gauge(
            "fleetserve_desired_replicas", "Replicas the autoscaler wants, by model.",
            ["model"], registry=reg, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self._ttft: dict[str, Histogram] = {}
        self._itl: dict[str, Histogram] = {}
        self._e2e: dict[str, Histogram] = {}
        self._in_flight: dict[str, Gauge] = {}
        self._requests: dict[tuple[str, int], Counter] = {}

    def observe_ttft(self, model: str, seconds: float) -> None:
        child = self._ttft.get(model)
        if child is None:
            child = self._ttft[model] = self.ttft.labels(model)
        child.observe(seconds)

    def itl_child(self, model: str) -> Histogram:
        child = self._itl.get(model)
        if child is None:
            child = self._itl[model] = self.itl.labels(model)
        return child

    def finished(self, model: str, status: int, e2e_s: float | None = None) -> None:
        """Count an answered request; `e2e_s` for a served one (None: rejected or failed)."""
        key = (model, status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(model, str(status))
        counter.inc()
        if e2e_s is None:
            return
        child = self._e2e.get(model)
        if child is None:
            child = self._e2e[model] = self.e2e.labels(model)
        child.observe(e2e_s)

    def set_desired_replicas(self, model: str, replicas: int) -> None:
        """The autoscaler's latest target for `model` (the composition root wires this)."""
        self.desired_replicas.labels(model).set(replicas)

    def in_flight_child(self, model: str) -> Gauge:
        child = self._in_flight.get(model)
        if child is None:
            child = self._in_flight[model] = self.in_flight.labels(model)
        return child


def observe_zeros(histogram: Histogram, n: int) -> None:
    """`histogram.observe(0.0)` n times for the cost of one: the lowest bucket counts them (a
    sum of zeros adds nothing). Stream events that arrive in one read are 0 s apart; a fast
    engine sends a whole answer in one read, and n observations there cost the gateway a
    fifth of its streaming throughput (benchmarks/gateway_overhead.py). It uses the child's
    bucket values, `_buckets`, as they have been since prometheus_client 0.1; a unit test
    checks the samples equal n observations."""
    histogram._buckets[0].inc(n)


class FleetStateCollector(Collector):
    """`fleetserve_replicas{model,state}` read from the live fleet at scrape time."""

    def __init__(self, counts: StateCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "fleetserve_replicas", "Replicas by model and state.", labels=["model", "state"]
        )
        for model, state, n in self._counts():
            family.add_metric([model, state], n)
        yield family


class ServiceCollector(Collector):
    """`fleetserve_service_up{service}` (1 running, 0 restarting after a failure) and
    `fleetserve_service_restarts_total{service}`, read from the supervisor at scrape time."""

    def __init__(self, services: ServiceCounts) -> None:
        self._services = services

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "fleetserve_service_up",
            "Whether a background service (health checks, autoscaler, discovery) is running.",
            labels=["service"],
        )
        restarts = CounterMetricFamily(
            "fleetserve_service_restarts",
            "Restarts of a background service after an unexpected failure.",
            labels=["service"],
        )
        for service, running, count in self._services():
            up.add_metric([service], 1 if running else 0)
            restarts.add_metric([service], count)
        yield up
        yield restarts


def exposition(
    metrics: GatewayMetrics, fleet_states: StateCounts, services: ServiceCounts | None = None
) -> bytes:
    """The /metrics body: this process's (or all workers') metrics plus the fleet's state and,
    when given, the state of this process's background services."""
    registry = CollectorRegistry()
    if metrics.registry is None:
        path = multiprocess_dir()
        assert path is not None
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    else:
        for collector in (metrics.registry,):
            registry.register(_Forward(collector))
    registry.register(FleetStateCollector(fleet_states))
    if services is not None:
        registry.register(ServiceCollector(services))
    return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, inner: CollectorRegistry) -> None:
        self._inner = inner

    def collect(self) -> Iterable[Metric]:
        return self._inner.collect()
