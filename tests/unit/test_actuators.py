"""Victim choice and the SimActuator on a fake clock: cold starts, drains, replica-seconds."""

from __future__ import annotations

import pytest

from fleetserve.fleet.actuators import Actuator, VictimCandidate, choose_victims
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.sim_actuator import ReplicaSeconds, SimActuator, SimEvent
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.testing.clock import FakeClock

S, R, D, U = (
    ReplicaState.STARTING,
    ReplicaState.READY,
    ReplicaState.DRAINING,
    ReplicaState.UNHEALTHY,
)


def c(
    rid: str, state: ReplicaState, in_flight: int = 0, launched_at: float = 0.0
) -> VictimCandidate:
    return VictimCandidate(rid, state, in_flight, launched_at)


@pytest.mark.parametrize(
    ("candidates", "count", "victims"),
    [
        pytest.param([c("a", R), c("b", S)], 1, ["b"], id="starting-first"),
        pytest.param([c("a", R), c("b", U), c("c", S)], 2, ["c", "b"], id="then-unhealthy"),
        pytest.param([c("a", R, 3), c("b", R, 1), c("c", R, 2)], 2, ["b", "c"], id="least-loaded"),
        pytest.param(
            [c("old", R, 0, 1.0), c("new", R, 0, 5.0)], 1, ["new"], id="newest-among-equals"
        ),
        pytest.param([c("a", D), c("b", R, 9)], 1, ["b"], id="draining-never-chosen"),
        pytest.param([c("a", R), c("b", R)], 5, ["a", "b"], id="more-than-there-are"),
        pytest.param([c("a", R)], 0, [], id="none"),
        pytest.param([c("a", R)], -1, [], id="negative"),
    ],
)
def test_choose_victims(candidates: list[VictimCandidate], count: int, victims: list[str]) -> None:
    assert choose_victims(candidates, count) == victims


def states(sim: SimActuator) -> tuple[int, int, int]:
    return len(sim.ids(S)), len(sim.ids(R)), len(sim.ids(D))


# Each step: (virtual time to move to, replicas to ask for or None, (starting, ready, draining)
# after it). Cold start 10 s, drain grace 30 s; in-flight work per replica comes from `busy`.
Step = tuple[float, int | None, tuple[int, int, int]]


@pytest.mark.parametrize(
    ("busy", "steps"),
    [
        pytest.param(
            {},
            [(0, 2, (2, 0, 0)), (9.9, None, (2, 0, 0)), (10, None, (0, 2, 0))],
            id="cold-start-then-ready",
        ),
        pytest.param(
            {},
            [(0, 2, (2, 0, 0)), (20, 1, (0, 1, 0)), (25, 0, (0, 0, 0))],
            id="idle-drains-end-at-once",
        ),
        pytest.param(
            {"sim-0": 1, "sim-1": 1},
            [(0, 2, (2, 0, 0)), (20, 1, (0, 1, 1)), (49.9, None, (0, 1, 1)), (50, None, (0, 1, 0))],
            id="busy-drain-cut-at-grace",
        ),
        pytest.param(
            {},
            [(0, 1, (1, 0, 0)), (5, 3, (3, 0, 0)), (6, 1, (1, 0, 0)), (10, None, (0, 1, 0))],
            id="scale-down-while-starting-drops-the-newest",
        ),
        pytest.param(
            {"sim-0": 2},
            [(0, 1, (1, 0, 0)), (10, 0, (0, 0, 1)), (11, 1, (1, 0, 1)), (21, None, (0, 1, 1))],
            id="scale-up-during-drain-launches-new",
        ),
    ],
)
async def test_sim_actuator_sequence(busy: dict[str, int], steps: list[Step]) -> None:
    clock = FakeClock()
    sim = SimActuator(
        clock, cold_start_s=10.0, drain_grace_s=30.0, in_flight=lambda r: busy.get(r, 0)
    )
    for at, desired, expected in steps:
        await clock.advance(at - clock.now())
        if desired is not None:
            await sim.set_replicas(desired)
        else:
            sim.advance()
        assert states(sim) == expected, f"at {at}"
        assert await sim.current() == expected[0] + expected[1]


async def test_transitions_happen_at_their_own_time_and_are_reported_in_order() -> None:
    clock = FakeClock()
    events: list[SimEvent] = []
    sim = SimActuator(clock, cold_start_s=10.0, listener=events.append)
    await sim.set_replicas(1)
    await clock.advance(3)
    await sim.set_replicas(2)
    assert sim.next_due() == 10.0
    await clock.advance(100)  # nobody looked in between
    returned = sim.advance()
    assert [(e.at, e.kind, e.replica_id) for e in events] == [
        (0.0, "launched", "sim-0"),
        (3.0, "launched", "sim-1"),
        (10.0, "ready", "sim-0"),
        (13.0, "ready", "sim-1"),
    ]
    assert returned == events[2:]
    assert sim.next_due() is None
    status = await sim.describe()
    assert status.cold_starts_s == (10.0, 10.0)
    assert [r.cold_start_s for r in status.replicas] == [10.0, 10.0]


async def test_drain_ends_when_the_last_request_finishes() -> None:
    clock = FakeClock()
    busy = {"sim-0": 1}
    events: list[SimEvent] = []
    sim = SimActuator(
        clock,
        cold_start_s=0.0,
        drain_grace_s=30.0,
        in_flight=lambda r: busy.get(r, 0),
        listener=events.append,
    )
    await sim.set_replicas(1)
    assert sim.ids(R) == ["sim-0"]  # zero cold start: ready at once
    await clock.advance(5)
    await sim.set_replicas(0)
    assert sim.next_due() == 35.0  # the drain deadline
    await clock.advance(7)
    assert sim.ids(D) == ["sim-0"]
    assert await sim.current() == 0
    busy["sim-0"] = 0
    sim.advance()
    assert events[-1] == SimEvent(12.0, "removed", "sim-0", cut_in_flight=0)


async def test_work_cut_at_the_drain_deadline_is_reported() -> None:
    clock = FakeClock()
    sim = SimActuator(clock, cold_start_s=0.0, drain_grace_s=30.0, in_flight=lambda r: 4)
    await sim.set_replicas(1)
    await sim.set_replicas(0)
    await clock.advance(45)
    assert sim.advance() == [SimEvent(30.0, "removed", "sim-0", cut_in_flight=4)]


async def test_replica_seconds_per_state() -> None:
    clock = FakeClock()
    busy: dict[str, int] = {}
    sim = SimActuator(clock, cold_start_s=10.0, in_flight=lambda r: busy.get(r, 0))
    await sim.set_replicas(2)  # two launched at 0, ready at 10
    await clock.advance(30)
    busy["sim-1"] = 1
    await sim.set_replicas(1)  # sim-0 (idle) goes at once, sim-1 stays
    await clock.advance(10)
    await sim.set_replicas(0)  # sim-1 drains from 40 ...
    await clock.advance(5)
    busy["sim-1"] = 0
    sim.advance()  # ... to 45
    assert sim.replica_seconds() == ReplicaSeconds(starting_s=20.0, ready_s=50.0, draining_s=5.0)
    await clock.advance(100)
    assert sim.replica_seconds().total_s == 75.0  # nothing runs: nothing more is counted


async def test_live_replicas_count_up_to_now_and_close_removes_all() -> None:
    clock = FakeClock()
    sim = SimActuator(clock, cold_start_s=4.0)
    await sim.set_replicas(3)
    await clock.advance(10)
    assert sim.replica_seconds() == ReplicaSeconds(starting_s=12.0, ready_s=18.0)
    await sim.close()
    assert await sim.current() == 0
    await clock.advance(10)
    assert sim.replica_seconds().total_s == 30.0


async def test_mirrors_into_a_fleet_and_reads_its_in_flight() -> None:
    clock = FakeClock()
    fleet = Fleet()
    actuator: Actuator = SimActuator(clock, cold_start_s=2.0, fleet=fleet, model="m")
    assert fleet.serves("m")
    await actuator.set_replicas(2)
    assert fleet.count_by_state("m")[S] == 2
    assert fleet.ready("m") == []
    await clock.advance(2)
    assert await actuator.current() == 2
    assert [s.id for s in fleet.ready("m")] == ["sim-0", "sim-1"]
    fleet.begin("sim-0")
    fleet.begin("sim-0")
    fleet.begin("sim-1")
    await actuator.set_replicas(0)  # both drain: no new requests route there
    assert fleet.ready("m") == []
    assert fleet.count_by_state("m")[D] == 2
    fleet.end("sim-1")
    assert await actuator.current() == 0
    assert [r.id for r in fleet.replicas("m")] == ["sim-0"]  # sim-1 finished and went
    fleet.end("sim-0")
    fleet.end("sim-0")
    await actuator.describe()
    assert len(fleet) == 0


async def test_rejects_a_negative_count() -> None:
    sim = SimActuator(FakeClock(), cold_start_s=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        await sim.set_replicas(-1)
