"""Replicas listed in the fleet file get short display names, per model, in the file's order."""

from __future__ import annotations

from fleetserve.config import ModelSpec
from fleetserve.fleet.discovery import populate_static
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica


def test_static_replicas_are_named_replica_n_per_model() -> None:
    fleet = Fleet()
    models = [
        ModelSpec(name="a", replicas=["http://127.0.0.1:8001", "http://127.0.0.1:8002"]),
        ModelSpec(name="b", replicas=["http://127.0.0.1:8003"]),
    ]
    populate_static(fleet, models, 0.0)
    named = {(r.model, r.url): (r.name, r.id) for r in fleet.replicas()}
    assert named == {
        ("a", "http://127.0.0.1:8001"): ("replica-0", "127.0.0.1:8001"),
        ("a", "http://127.0.0.1:8002"): ("replica-1", "127.0.0.1:8002"),
        ("b", "http://127.0.0.1:8003"): ("replica-0", "127.0.0.1:8003"),
    }


def test_a_replica_without_a_name_is_named_by_its_id() -> None:
    assert Replica("127.0.0.1:1", "http://127.0.0.1:1", "m").name == "127.0.0.1:1"
