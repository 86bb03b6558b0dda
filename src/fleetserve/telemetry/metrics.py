"""The gateway's Prometheus metrics (names, labels and help in telemetry/names.py).

The hot path pays a dict lookup per metric: each model's label children are resolved once
(`ModelMetrics`) and cached, and a model the fleet does not serve is counted as `other`, so
the cache, and the series, are bounded by the fleet whatever names requests carry.

With several worker processes, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR
set before import) sums every worker's values at scrape time, so /metrics answers for the
whole gateway rather than the one worker that served the scrape.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from fleetserve.telemetry import names as n
from fleetserve.telemetry.batched import FlushFirst, Timings
from fleetserve.telemetry.names import (
    E2E_BUCKETS,
    HOLD_BUCKETS,
    ITL_BUCKETS,
    NO_MODEL,
    OTHER_MODEL,
    RETRY_REASONS,
    TTFT_BUCKETS,
    UPSTREAM_ERROR_LABELS,
    MetricDef,
)

__all__ = ["E2E_BUCKETS", "HOLD_BUCKETS", "ITL_BUCKETS", "TTFT_BUCKETS"]

StateCounts = Callable[[], Iterable[tuple[str, str, int]]]
ServiceCounts = Callable[[], Iterable[tuple[str, bool, int]]]
"""(service, running, restarts) of each supervised background service."""
METRICS_FLUSH_S = 1.0  # with workers: how stale another worker's figures in /metrics may be
STREAM_ERROR = "stream_error"  # the status label of a stream that started and then failed


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    """One replica's figures for /metrics; None where not measured."""

    model: str
    replica: str
    in_flight: int
    running: float | None
    waiting: float | None
    kv_usage_frac: float | None
    scrape_age_s: float | None  # None: not ready (only ready replicas are scraped)


ReplicaRows = Callable[[], Iterable[ReplicaRow]]


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _counter(d: MetricDef, reg: CollectorRegistry | None) -> Counter:
    return Counter(d.name, d.help, d.labels, registry=reg)


def _gauge(d: MetricDef, reg: CollectorRegistry | None, mode: str) -> Gauge:
    return Gauge(d.name, d.help, d.labels, registry=reg, multiprocess_mode=mode)  # type: ignore[arg-type]


def _histogram(
    d: MetricDef, reg: CollectorRegistry | None, buckets: tuple[float, ...]
) -> Histogram:
    return Histogram(d.name, d.help, d.labels, registry=reg, buckets=buckets)


class ModelMetrics:
    """One model's figures since the last flush, as plain numbers (telemetry/batched.py says
    why), and its label children, resolved once. The request path adds to the attributes."""

    __slots__ = ("_children", "_metrics", "e2e", "failovers", "held", "hold", "in_flight",
                 "input_tokens", "itl", "model", "output_tokens", "requests", "ttft")  # fmt: skip

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        self.model = model
        self._metrics = metrics
        self.requests: dict[int | str, int] = {}  # by status: HTTP codes and STREAM_ERROR
        self.ttft = Timings(metrics.ttft.labels(model))
        self.itl = Timings(metrics.itl.labels(model))
        self.e2e = Timings(metrics.e2e.labels(model))
        self.hold = Timings(metrics.hold.labels(model))
        self.in_flight = 0  # a level, not a count: flushed as the gauge's value
        self.held = 0
        self.failovers = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self._children = (
            metrics.in_flight.labels(model), metrics.held.labels(model),
            metrics.failovers.labels(model), metrics.tokens.labels(model, "input"),
            metrics.tokens.labels(model, "output"),
        )  # fmt: skip

    def finished(self, status: int | str, e2e_s: float | None = None) -> None:
        requests = self.requests
        requests[status] = requests.get(status, 0) + 1
        if e2e_s is not None:
            self.e2e.observe(e2e_s)

    def tokens(self, prompt: int, completion: int) -> None:
        self.input_tokens += prompt
        self.output_tokens += completion

    def flush(self) -> None:
        in_flight, held, failovers, input_tokens, output_tokens = self._children
        in_flight.set(self.in_flight)
        held.set(self.held)
        if self.failovers:
            failovers.inc(self.failovers)
            self.failovers = 0
        if self.input_tokens:
            input_tokens.inc(self.input_tokens)
            self.input_tokens = 0
        if self.output_tokens:
            output_tokens.inc(self.output_tokens)
            self.output_tokens = 0
        requests = self.requests
        for status, count in requests.items():
            if count:
                self._metrics.requests.labels(self.model, str(status)).inc(count)
                requests[status] = 0
        for timings in (self.ttft, self.itl, self.e2e, self.hold):
            timings.flush()


class GatewayMetrics:
    """Metric objects of one gateway worker; each model's figures are kept per model
    (`ModelMetrics`) and handed to prometheus_client by `flush()`, which a read of the
    registry and `exposition` call first (and, with workers, a timer every second).

    `served(model)` says whether a model name gets its own label (the fleet serves it); any
    other name is counted as `other`. Without it every name is taken as given (tests)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        served: Callable[[str], bool] | None = None,
    ) -> None:
        multiproc = multiprocess_dir() is not None
        reg = None if multiproc else (registry or CollectorRegistry())
        self.registry = reg
        self.served = served
        self._flushes: list[Callable[[], None]] = []
        if reg is not None:
            reg.register(FlushFirst(self.flush))
        self.requests = _counter(n.REQUESTS, reg)
        self.ttft = _histogram(n.TTFT, reg, TTFT_BUCKETS)
        self.itl = _histogram(n.ITL, reg, ITL_BUCKETS)
        self.e2e = _histogram(n.E2E, reg, E2E_BUCKETS)
        self.tokens = _counter(n.TOKENS, reg)
        self.in_flight = _gauge(n.IN_FLIGHT, reg, "livesum")
        self.retries = _counter(n.RETRIES, reg)
        self.failovers = _counter(n.FAILOVERS, reg)
        self.upstream_errors = _counter(n.UPSTREAM_ERRORS, reg)
        self.held = _gauge(n.HELD, reg, "livesum")
        self.hold_capacity = _gauge(n.HOLD_CAPACITY, reg, "livesum")
        self.hold = _histogram(n.HOLD, reg, HOLD_BUCKETS)
        self.client_timeouts = _counter(n.CLIENT_TIMEOUTS, reg)
        # Set by the autoscaler, which runs in one process: the most recent value wins.
        self.desired_replicas = _gauge(n.DESIRED_REPLICAS, reg, "mostrecent")
        self.max_replicas = _gauge(n.MAX_REPLICAS, reg, "mostrecent")
        self.decisions = _counter(n.DECISIONS, reg)
        self._models: dict[str, ModelMetrics] = {}
        self._refused: dict[tuple[str, int | str], Counter] = {}
        self._errors: dict[tuple[str, str, str], Counter] = {}
        self._retries: dict[tuple[str, str], Counter] = {}

    def also_flush(self, flush: Callable[[], None]) -> None:
        """Run `flush` with this one's (the tenant metrics', sharing the registry)."""
        self._flushes.append(flush)

    def flush(self) -> None:
        """Hand every figure counted so far to prometheus_client."""
        for children in self._models.values():
            children.flush()
        for flush in self._flushes:
            flush()

    def of(self, model: str) -> ModelMetrics:
        """The children of a served model's label, created at its first request (so its
        series start at zero). The request path asks only for served models; any other name
        gets the children of `other`."""
        children = self._models.get(model)
        if children is None:
            served = self.served
            if served is not None and not served(model):
                model = OTHER_MODEL
                children = self._models.get(model)
            if children is None:
                children = self._models[model] = ModelMetrics(self, model)
                for kind, phase in UPSTREAM_ERROR_LABELS:  # at zero (names.py says why)
                    self._errors[(model, kind, phase)] = self.upstream_errors.labels(
                        model, kind, phase
                    )
                for reason in RETRY_REASONS:
                    self._retries[(model, reason)] = self.retries.labels(model, reason)
        return children

    def _unserved(self, model: str, status: int | str) -> Counter:
        """The request counter of a refused request whose model is not served: `other`,
        or `-` before a model was named. Nothing else is created for them (no series)."""
        label = NO_MODEL if model == NO_MODEL else OTHER_MODEL
        key = (label, status)
        counter = self._refused.get(key)
        if counter is None:
            counter = self._refused[key] = self.requests.labels(label, str(status))
        return counter

    # -- what the request path calls -----------------------------------------------------
    def observe_ttft(self, model: str, seconds: float) -> None:
        self.of(model).ttft.observe(seconds)

    def itl_child(self, model: str) -> Timings:
        return self.of(model).itl

    def finished(self, model: str, status: int | str, e2e_s: float | None = None) -> None:
        """Count an answered request; `e2e_s` for a served one (None: rejected or failed)."""
        children = self._models.get(model)
        if children is None:
            served = self.served
            if model == NO_MODEL or (served is not None and not served(model)):
                self._unserved(model, status).inc()
                return
            children = self.of(model)
        children.finished(status, e2e_s)

    def upstream_error(self, model: str, kind: str, phase: str) -> None:
        key = (model, kind, phase)
        child = self._errors.get(key)
        if child is None:  # kinds and phases are fixed sets (gateway/proxy.py)
            label = self.of(model).model
            child = self._errors[key] = self.upstream_errors.labels(label, kind, phase)
        child.inc()

    def retried(self, model: str, reason: str) -> None:
        key = (model, reason)
        child = self._retries.get(key)
        if child is None:
            child = self._retries[key] = self.retries.labels(self.of(model).model, reason)
        child.inc()

    # -- the autoscaler ------------------------------------------------------------------
    def set_desired_replicas(
        self, model: str, replicas: int, max_replicas: int | None = None
    ) -> None:
        """The autoscaler's latest target for `model` (the composition root wires this)."""
        self.desired_replicas.labels(model).set(replicas)
        if max_replicas is not None:
            self.max_replicas.labels(model).set(max_replicas)

    def start_decisions(
        self, model: str, directions: Iterable[str], signals: Iterable[str]
    ) -> None:
        """Every (direction, signal) child of `model` at zero, before the first decision (so
        that the first of each counts in increase())."""
        signals = list(signals)
        for direction in directions:
            for signal in signals:
                self.decisions.labels(model, direction, signal)

    def decided(self, model: str, direction: str, signal: str) -> None:
        """One autoscaler decision (runs every period: not the hot path)."""
        self.decisions.labels(model, direction, signal).inc()


def observe_zeros(timings: Timings, n: int) -> None:
    """`observe(0.0)` n times for the cost of one: the lowest bucket counts them (a sum of
    zeros adds nothing). Stream events that arrive in one read are 0 s apart; a fast engine
    sends a whole answer in one read (benchmarks/gateway_overhead.py)."""
    timings.observe_zeros(n)


class FleetStateCollector(Collector):
    """`fleetserve_replicas{model,state}` and, with `rows`, each replica's figures, read from
    the live fleet at scrape time (so a replica that left the fleet leaves /metrics)."""

    def __init__(self, counts: StateCounts, rows: ReplicaRows | None = None) -> None:
        self._counts = counts
        self._rows = rows

    def collect(self) -> Iterable[Metric]:
        family = _gauge_family(n.REPLICAS)
        for model, state, count in self._counts():
            family.add_metric([model, state], count)
        yield family
        if self._rows is None:
            return
        families = {
            d.name: _gauge_family(d)
            for d in (n.REPLICA_IN_FLIGHT, n.REPLICA_RUNNING, n.REPLICA_WAITING,
                      n.REPLICA_KV_USAGE, n.REPLICA_SCRAPE_AGE)
        }  # fmt: skip
        for row in self._rows():
            labels = [row.model, row.replica]
            families[n.REPLICA_IN_FLIGHT.name].add_metric(labels, row.in_flight)
            for d, value in (
                (n.REPLICA_RUNNING, row.running),
                (n.REPLICA_WAITING, row.waiting),
                (n.REPLICA_KV_USAGE, row.kv_usage_frac),
                (n.REPLICA_SCRAPE_AGE, row.scrape_age_s),
            ):
                if value is not None:
                    families[d.name].add_metric(labels, value)
        yield from families.values()


def _gauge_family(d: MetricDef) -> GaugeMetricFamily:
    return GaugeMetricFamily(d.name, d.help, labels=list(d.labels))


class ServiceCollector(Collector):
    """`fleetserve_service_up{service}` (1 running, 0 restarting after a failure) and
    `fleetserve_service_restarts_total{service}`, read from the supervisor at scrape time."""

    def __init__(self, services: ServiceCounts) -> None:
        self._services = services

    def collect(self) -> Iterable[Metric]:
        up = _gauge_family(n.SERVICE_UP)
        restarts = CounterMetricFamily(
            n.SERVICE_RESTARTS.name, n.SERVICE_RESTARTS.help, labels=list(n.SERVICE_RESTARTS.labels)
        )
        for service, running, count in self._services():
            up.add_metric([service], 1 if running else 0)
            restarts.add_metric([service], count)
        yield up
        yield restarts


def exposition(
    metrics: GatewayMetrics,
    fleet_states: StateCounts,
    services: ServiceCounts | None = None,
    replica_rows: ReplicaRows | None = None,
) -> bytes:
    """The /metrics body: this process's (or all workers') metrics plus the fleet's state
    (and, with `replica_rows`, each replica's) and, when given, the state of this process's
    background services."""
    registry = CollectorRegistry()
    if metrics.registry is None:
        metrics.flush()  # this worker's; the others flush every METRICS_FLUSH_S
        path = multiprocess_dir()
        assert path is not None
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Forward(metrics.registry))
    registry.register(FleetStateCollector(fleet_states, replica_rows))
    if services is not None:
        registry.register(ServiceCollector(services))
    return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, inner: CollectorRegistry) -> None:
        self._inner = inner

    def collect(self) -> Iterable[Metric]:
        return self._inner.collect()
