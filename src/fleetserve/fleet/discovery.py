"""Discovery: where replicas come from. Static lists here; the local actuator
(`fleet.local`) and Kubernetes EndpointSlices (`fleet.kubernetes_discovery`) write the same
Fleet."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from fleetserve.config import ModelSpec
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica


def replica_id(url: str) -> str:
    return urlsplit(url).netloc or url


def populate_static(fleet: Fleet, models: Sequence[ModelSpec], now: float) -> None:
    """Add every replica the fleet file lists, in the starting state until a probe passes.

    Each is named `replica-N`, numbered per model in the order the fleet file lists them."""
    for spec in models:
        fleet.declare_model(spec.name)
        for index, url in enumerate(spec.replicas):
            rid = replica_id(url)
            if fleet.get(rid) is not None:
                rid = f"{spec.name}@{rid}"
            fleet.add(
                Replica(
                    id=rid,
                    url=url,
                    model=spec.name,
                    max_concurrency=spec.max_concurrency,
                    state_since=now,
                    name=f"replica-{index}",
                )
            )
