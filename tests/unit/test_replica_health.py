"""Passive ejection with backoff, half-open probes and draining, on explicit times."""

from __future__ import annotations

import pytest

from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import EjectionPolicy, Replica
from fleetserve.routing.snapshot import ReplicaState

POLICY = EjectionPolicy(after_failures=3, base_s=2.0, max_s=5.0)


def ready_fleet() -> tuple[Fleet, Replica]:
    fleet = Fleet(POLICY)
    replica = Replica(id="r", url="http://127.0.0.1:1", model="m")
    fleet.add(replica)
    fleet.probe_passed("r", 0.0)
    return fleet, replica


def test_starting_until_first_probe_then_ready() -> None:
    fleet = Fleet(POLICY)
    fleet.add(Replica(id="r", url="http://x", model="m"))
    assert fleet.ready("m") == []
    fleet.probe_failed("r", 1.0, "refused")  # a starting engine is not ejected
    assert fleet.get("r").state is ReplicaState.STARTING  # type: ignore[union-attr]
    fleet.probe_passed("r", 2.0)
    assert [s.id for s in fleet.ready("m")] == ["r"]


@pytest.mark.parametrize(
    ("events", "state"),
    [
        pytest.param(["f", "f"], ReplicaState.READY, id="two-failures-stay"),
        pytest.param(["f", "f", "f"], ReplicaState.UNHEALTHY, id="three-eject"),
        pytest.param(["f", "f", "s", "f", "f"], ReplicaState.READY, id="success-resets-count"),
    ],
)
def test_consecutive_failures_eject(events: list[str], state: ReplicaState) -> None:
    fleet, replica = ready_fleet()
    for i, event in enumerate(events):
        if event == "f":
            fleet.record_failure("r", float(i), "boom")
        else:
            fleet.record_success("r", float(i))
    assert replica.state is state


def test_ejection_backoff_doubles_and_caps_with_half_open_probe() -> None:
    fleet, replica = ready_fleet()
    for _ in range(3):
        fleet.record_failure("r", 10.0, "boom")
    assert replica.ejected_until == 12.0
    assert not replica.probe_due(11.9)
    assert replica.probe_due(12.0)
    fleet.probe_failed("r", 12.0, "still down")  # half-open probe fails: ejected again, longer
    assert replica.ejected_until == 16.0
    fleet.probe_failed("r", 16.0, "still down")
    assert replica.ejected_until == 21.0  # capped at max_s
    fleet.probe_passed("r", 21.0)
    assert replica.state is ReplicaState.READY
    assert replica.consecutive_failures == 0


def test_draining_is_not_routed_and_listeners_hear_changes() -> None:
    fleet, replica = ready_fleet()
    seen: list[str] = []
    fleet.subscribe(lambda r: seen.append(r.state.value))
    fleet.drain("r", 1.0)
    assert fleet.ready("m") == []
    assert seen == ["draining"]
    fleet.probe_passed("r", 2.0)  # a probe does not undo draining
    assert replica.state is ReplicaState.DRAINING


def test_in_flight_counts_and_snapshots() -> None:
    fleet, _ = ready_fleet()
    fleet.begin("r")
    fleet.begin("r")
    assert fleet.ready("m")[0].in_flight == 2
    fleet.end("r")
    fleet.end("r")
    fleet.end("r")  # never below zero
    assert fleet.ready("m")[0].in_flight == 0
