"""Passive ejection with backoff, half-open probes and draining, on explicit times."""

from __future__ import annotations

import itertools

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


# -- the ejection count decays while a replica stays healthy (Envoy's outlier detection) ----
DECAYING = EjectionPolicy(after_failures=1, base_s=2.0, max_s=60.0, decay_s=10.0)


def outage(fleet: Fleet, at: float, probes_failed: int = 0) -> float:
    """An ejection at `at`, and `probes_failed` half-open probes that fail while it is out;
    then the next probe passes. Returns the time it is back."""
    replica = fleet.get("r")
    assert replica is not None
    fleet.probe_failed("r", at, "down")
    for _ in range(probes_failed):
        fleet.probe_failed("r", replica.ejected_until, "still down")
    back = replica.ejected_until
    fleet.probe_passed("r", back)
    return back


@pytest.mark.parametrize(
    ("healthy_gaps_s", "expected_s"),
    [
        pytest.param([1, 1], [2, 4, 8], id="outages-close-together-keep-doubling"),
        pytest.param([1, 10.5], [2, 4, 4], id="one-healthy-interval-takes-one-off"),
        pytest.param([1, 25], [2, 4, 2], id="two-intervals-take-two-off"),
        pytest.param([1, 1, 1, 1, 100], [2, 4, 8, 16, 32, 2], id="long-healthy-back-to-base"),
        pytest.param([9.9], [2, 4], id="just-short-of-an-interval"),
    ],
)
def test_ejection_count_decays_after_healthy_intervals(
    healthy_gaps_s: list[float], expected_s: list[float]
) -> None:
    fleet = Fleet(DECAYING)
    fleet.add(Replica(id="r", url="http://127.0.0.1:1", model="m"))
    fleet.probe_passed("r", 0.0)
    replica = fleet.get("r")
    assert replica is not None
    durations = []
    at = 0.0
    for gap in [0.0, *healthy_gaps_s]:
        at += gap
        back = outage(fleet, at)
        durations.append(back - at)
        at = back
    assert durations == pytest.approx(expected_s)
    assert replica.state is ReplicaState.READY


def test_time_spent_ejected_does_not_decay_the_count() -> None:
    fleet = Fleet(DECAYING)
    fleet.add(Replica(id="r", url="http://127.0.0.1:1", model="m"))
    fleet.probe_passed("r", 0.0)
    replica = fleet.get("r")
    assert replica is not None
    fleet.probe_failed("r", 0.0, "down")
    ejected = [replica.ejected_until]
    for _ in range(4):  # each half-open probe fails: out for longer each time
        fleet.probe_failed("r", replica.ejected_until, "still down")
        ejected.append(replica.ejected_until)
    assert [b - a for a, b in itertools.pairwise([0.0, *ejected])] == [2, 4, 8, 16, 32]


def test_a_long_outage_stays_at_the_cap_and_recovers_in_a_few_intervals() -> None:
    """Thousands of failed probes (a replica down for a day) neither overflow the backoff nor
    keep the replica at the cap long after it recovered."""
    fleet = Fleet(DECAYING)
    fleet.add(Replica(id="r", url="http://127.0.0.1:1", model="m"))
    fleet.probe_passed("r", 0.0)
    back = outage(fleet, 0.0, probes_failed=2000)
    replica = fleet.get("r")
    assert replica is not None
    assert replica.state is ReplicaState.READY
    fleet.probe_failed("r", back + 1, "down")
    assert replica.ejected_until - (back + 1) == 60.0  # still at the cap right after
    back = replica.ejected_until
    fleet.probe_passed("r", back)
    fleet.probe_failed("r", back + 60, "down")  # six healthy intervals: back to the base
    assert replica.ejected_until - (back + 60) == 2.0
