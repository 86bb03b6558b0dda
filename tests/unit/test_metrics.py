"""The gateway's metric helpers."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from fleetserve.autoscale.decision import Decision, Direction
from fleetserve.errors import (
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from fleetserve.gateway.proxy import _error_kind, _phase
from fleetserve.telemetry.batched import Timings
from fleetserve.telemetry.metrics import (
    ITL_BUCKETS,
    STREAM_ERROR,
    GatewayMetrics,
    ReplicaRow,
    exposition,
    observe_zeros,
)
from fleetserve.telemetry.names import (
    NO_MODEL,
    NO_TENANT,
    OTHER_MODEL,
    RETRY_REASONS,
    UPSTREAM_ERROR_LABELS,
)
from fleetserve.telemetry.tenant_metrics import TenantLabels, TenantMetrics


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples
            if not s.name.endswith("_created")]  # fmt: skip


@pytest.mark.parametrize("zeros", [0, 15])
def test_batched_timings_flush_as_observe_would(zeros: int) -> None:
    """Timings write the histogram's own bucket values at a flush: a prometheus_client that
    stores them otherwise fails here, not silently in production. Edges (an observation equal
    to a bound), zeros, and a value past the last bound included; two flushes add up."""
    fast, slow = CollectorRegistry(), CollectorRegistry()
    one = Histogram("itl", "x", ["model"], buckets=ITL_BUCKETS, registry=fast).labels("m")
    other = Histogram("itl", "x", ["model"], buckets=ITL_BUCKETS, registry=slow).labels("m")
    timings = Timings(one)
    values = [0.03, 0.0005, 0.05, 0.0, 7.7, 1e6, 0.0004999]
    for i, value in enumerate(values):
        timings.observe(value)
        other.observe(value)
        if i == 3:
            timings.flush()
    observe_zeros(timings, zeros)
    for _ in range(zeros):
        other.observe(0.0)
    assert samples(fast) != samples(slow)  # the last observations wait for the flush
    timings.flush()
    assert samples(fast) == samples(slow)


def test_a_registry_read_flushes_first() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    metrics.of("m").finished(200, 0.2)
    metrics.of("m").in_flight += 3
    registry = metrics.registry
    assert registry is not None
    get = registry.get_sample_value
    assert get("fleetserve_requests_total", {"model": "m", "status": "200"}) == 1
    assert get("fleetserve_e2e_seconds_count", {"model": "m"}) == 1
    assert get("fleetserve_in_flight", {"model": "m"}) == 3
    metrics.of("m").in_flight -= 3
    assert get("fleetserve_in_flight", {"model": "m"}) == 0
    assert get("fleetserve_requests_total", {"model": "m", "status": "200"}) == 1  # no double


def _series(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(name, tuple(sorted(labels.items()))) for name, labels, _ in samples(registry)}


def test_unknown_models_are_other_and_create_nothing_else() -> None:
    """A model the fleet does not serve gets no children: one request counter, `other`."""
    served = {"m"}
    metrics = GatewayMetrics(CollectorRegistry(), served=served.__contains__)
    metrics.of("m")  # a served model's series exist from the start
    registry = metrics.registry
    assert registry is not None
    before = _series(registry)
    for i in range(500):
        metrics.finished(f"junk-{i}", 404)
        metrics.finished(NO_MODEL, 400)
    added = _series(registry) - before
    assert added == {
        ("fleetserve_requests_total", (("model", "other"), ("status", "404"))),
        ("fleetserve_requests_total", (("model", "-"), ("status", "400"))),
    }
    assert (
        registry.get_sample_value("fleetserve_requests_total", {"model": "other", "status": "404"})
        == 500
    )
    assert metrics.of("junk") is metrics.of(OTHER_MODEL)  # cache bounded by the fleet
    assert set(metrics._models) == {"m", OTHER_MODEL}


def test_served_model_counts_status_e2e_tokens_and_failed_streams() -> None:
    metrics = GatewayMetrics(CollectorRegistry(), served={"m"}.__contains__)
    registry = metrics.registry
    assert registry is not None
    model = metrics.of("m")
    model.finished(200, 0.5)
    model.finished(STREAM_ERROR)
    model.tokens(10, 3)
    metrics.upstream_error("m", "closed", "stream")
    metrics.retried("m", "connect")
    get = registry.get_sample_value
    assert get("fleetserve_requests_total", {"model": "m", "status": "200"}) == 1
    assert get("fleetserve_requests_total", {"model": "m", "status": STREAM_ERROR}) == 1
    assert get("fleetserve_e2e_seconds_count", {"model": "m"}) == 1  # the failed one untimed
    assert get("fleetserve_tokens_total", {"model": "m", "kind": "input"}) == 10
    assert get("fleetserve_tokens_total", {"model": "m", "kind": "output"}) == 3
    assert get("fleetserve_failovers_total", {"model": "m"}) == 0
    assert get("fleetserve_upstream_errors_total",
               {"model": "m", "kind": "closed", "phase": "stream"}) == 1  # fmt: skip
    assert get("fleetserve_retries_total", {"model": "m", "reason": "connect"}) == 1
    assert get("fleetserve_held_requests", {"model": "m"}) == 0


def test_tenant_labels_name_the_first_n() -> None:
    labels = TenantLabels(2)
    assert [labels(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", "other", "a",
                                                                   "other", "b"]  # fmt: skip


def test_tenant_metrics_budget_and_rejections() -> None:
    registry = CollectorRegistry()
    tenants = TenantMetrics(registry, 5)
    tenants.rejected(NO_TENANT, "invalid_key")
    tenants.answered("acme", 200, 5, 7, 0.0)
    tenants.budget("acme", 12.5, 0.875, 0.8)
    get = registry.get_sample_value
    assert get("fleetserve_tenant_rejections_total",
               {"tenant": "-", "reason": "invalid_key"}) == 1  # fmt: skip
    assert get("fleetserve_tenant_requests_total", {"tenant": "-", "status": "401"}) is None
    assert get("fleetserve_tenant_cost_usd_total", {"tenant": "acme"}) == 0  # exists at zero
    assert get("fleetserve_tenant_tokens_total", {"tenant": "acme", "kind": "output"}) == 7
    assert get("fleetserve_tenant_budget_spent_ratio", {"tenant": "acme"}) == 0.875
    assert get("fleetserve_tenant_budget_soft_limit_ratio", {"tenant": "acme"}) == 0.8


def test_replica_rows_leave_unmeasured_figures_out() -> None:
    rows = [
        ReplicaRow("m", "r1", 2, 3.0, 1.0, 0.25, 0.5),
        ReplicaRow("m", "r2", 0, None, None, None, None),  # starting: not scraped
    ]
    text = exposition(GatewayMetrics(CollectorRegistry()), lambda: [("m", "ready", 1)],
                      replica_rows=lambda: rows).decode()  # fmt: skip
    assert 'fleetserve_replica_in_flight{model="m",replica="r1"} 2.0' in text
    assert 'fleetserve_replica_in_flight{model="m",replica="r2"} 0.0' in text
    assert 'fleetserve_replica_kv_usage_ratio{model="m",replica="r1"} 0.25' in text
    assert 'fleetserve_replica_scrape_age_seconds{model="m",replica="r1"} 0.5' in text
    r2 = [line for line in text.splitlines() if 'replica="r2"' in line]
    assert r2 == ['fleetserve_replica_in_flight{model="m",replica="r2"} 0.0']


def test_decision_signal_is_the_one_that_won() -> None:
    def decision(signals: dict[str, int | None], recommendation: int) -> Decision:
        return Decision(0.0, recommendation, 1, Direction.UP, recommendation, "", signals)

    assert decision({"load": 2, "queue": 3, "ttft": 3}, 3).signal == "queue"
    assert decision({"load": None, "queue": None}, 1).signal == "none"


@pytest.mark.parametrize(
    ("error", "phase"),
    [
        pytest.param(UpstreamConnectError("refused"), None, id="connect"),
        pytest.param(UpstreamTimeoutError("connect", 1), None, id="timeout-connect"),
        pytest.param(UpstreamTimeoutError("first_byte", 1), None, id="timeout-first-byte"),
        pytest.param(UpstreamStatusError(503, b"", None), None, id="status-5xx"),
        pytest.param(UpstreamClosedError("gone"), None, id="closed"),
        pytest.param(UpstreamClosedError("gone"), "stream", id="closed-mid-stream"),
        pytest.param(UpstreamTimeoutError("idle", 1), "stream", id="idle-mid-stream"),
    ],
)
def test_upstream_error_labels_are_the_ones_started_at_zero(
    error: UpstreamError, phase: str | None
) -> None:
    """The proxy's labels are the pre-created ones (names.py): none appears at 1."""
    kind = _error_kind(error)
    assert (kind, phase or _phase(error)) in UPSTREAM_ERROR_LABELS
    if phase is None:
        assert kind in RETRY_REASONS
