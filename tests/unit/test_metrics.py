"""The gateway's metric helpers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from fleetserve.telemetry.metrics import ITL_BUCKETS, observe_zeros


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in registry.collect() for s in m.samples
            if not s.name.endswith("_created")]  # fmt: skip


def test_observe_zeros_is_n_observations_of_zero() -> None:
    """It writes the histogram's own bucket values: a prometheus_client that stores them
    otherwise fails here, not silently in production."""
    fast, slow = CollectorRegistry(), CollectorRegistry()
    one = Histogram("itl", "x", ["model"], buckets=ITL_BUCKETS, registry=fast).labels("m")
    other = Histogram("itl", "x", ["model"], buckets=ITL_BUCKETS, registry=slow).labels("m")
    for histogram in (one, other):
        histogram.observe(0.03)
    observe_zeros(one, 15)
    for _ in range(15):
        other.observe(0.0)
    assert samples(fast) == samples(slow)
