"""The hold queue when every ready replica is at its concurrency cap, on a fake clock.

A held request is granted the slot a finished request frees, or a slot on a replica that turns
ready, oldest first; the slot is reserved (counted in flight) before the waiter runs.
"""

from __future__ import annotations

import asyncio

import pytest

from fleetserve.config import HoldSettings
from fleetserve.errors import NoReplicaError
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.gateway.hold import HoldQueue, Share, burst_cap
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.window import LoadWindow
from fleetserve.tenancy.fairness import Priority
from fleetserve.testing.clock import FakeClock

M = "m"
CAP = 2

READY = ReplicaState.READY
STARTING = ReplicaState.STARTING
DRAINING = ReplicaState.DRAINING


class Harness:
    def __init__(self, settings: HoldSettings | None = None, *, autoscaled: bool = False) -> None:
        self.clock = FakeClock(start=50.0)
        self.fleet = Fleet()
        self.fleet.declare_model(M)
        self.window = LoadWindow()
        self.demands: list[str] = []
        self.holds = HoldQueue(
            self.fleet, settings or HoldSettings(), self.clock, self.window, GatewayMetrics(),
            retry_after_s=3, autoscaled={M} if autoscaled else set(),
            on_demand=self.demands.append,
        )  # fmt: skip
        self.granted: list[tuple[str, str | None]] = []

    def add(
        self, rid: str, state: ReplicaState = READY, in_flight: int = CAP, cap: int | None = CAP
    ) -> None:
        replica = Replica(id=rid, url=f"http://{rid}", model=M, state=state, max_concurrency=cap)
        replica.in_flight = in_flight
        self.fleet.add(replica)

    def spawn(self, name: str, priority: Priority = Priority.STANDARD) -> asyncio.Task[None]:
        share = Share(name, priority=priority)

        async def held() -> None:
            self.granted.append((name, await self.holds.hold(M, self.clock.now(), None, share)))

        return asyncio.create_task(held())

    def finish(self, rid: str) -> None:
        """What the proxy does when a request on `rid` ends."""
        self.fleet.end(rid)
        self.holds.freed(rid, M)

    def in_flight(self, rid: str) -> int:
        replica = self.fleet.get(rid)
        assert replica is not None
        return replica.in_flight


@pytest.mark.parametrize(
    ("replicas", "should_hold"),
    [
        pytest.param([(READY, CAP, CAP)], True, id="one-ready-at-cap"),
        pytest.param([(READY, CAP, CAP), (READY, 1, CAP)], False, id="one-has-room"),
        pytest.param([(READY, CAP, CAP), (STARTING, 0, CAP)], True, id="at-cap-plus-starting"),
        pytest.param([(READY, 5, None)], False, id="uncapped-ready"),
        pytest.param([(READY, CAP, CAP), (READY, 9, None)], False, id="capped-and-uncapped"),
        pytest.param([(DRAINING, 0, CAP)], False, id="only-draining-static"),
        pytest.param([], False, id="no-replica-static"),
    ],
)
def test_which_states_hold(
    replicas: list[tuple[ReplicaState, int, int | None]], should_hold: bool
) -> None:
    h = Harness()
    for i, (state, in_flight, cap) in enumerate(replicas):
        h.add(f"r{i}", state, in_flight, cap)
    assert h.holds.should_hold(M) is should_hold


async def test_freed_slots_go_to_the_oldest_waiter_reserved() -> None:
    h = Harness()
    h.add("r1")
    tasks = [h.spawn(n) for n in "abc"]
    await h.clock.advance(1.0)
    assert h.holds.held(M) == 3
    assert h.window.snapshot(M, h.clock.now()).held == 3
    assert h.demands == []  # a backlog at capacity does not wake the autoscaler early
    h.finish("r1")
    await h.clock.settle()
    assert h.granted == [("a", "r1")]
    assert h.in_flight("r1") == CAP  # the slot went to "a" before anyone else could take it
    h.finish("r1")
    h.finish("r1")
    await asyncio.gather(*tasks)
    assert h.granted == [("a", "r1"), ("b", "r1"), ("c", "r1")]
    assert h.in_flight("r1") == CAP
    assert h.holds.held(M) == 0
    assert h.window.snapshot(M, h.clock.now()).held == 0


async def test_a_replica_turning_ready_takes_queued_requests_up_to_its_cap() -> None:
    h = Harness()
    h.add("r1")
    h.add("r2", STARTING, in_flight=0)
    tasks = {n: h.spawn(n) for n in "abcde"}
    await h.clock.advance(2.0)
    h.fleet.probe_passed("r2", h.clock.now())
    await h.clock.settle()
    assert h.granted == [("a", "r2"), ("b", "r2")]
    assert h.in_flight("r2") == CAP
    assert h.holds.held(M) == 3
    h.finish("r1")
    await h.clock.settle()
    assert h.granted[-1] == ("c", "r1")
    for name in "de":
        tasks[name].cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert h.holds.held(M) == 0


async def test_a_draining_replica_frees_no_slot() -> None:
    h = Harness()
    h.add("r1")
    h.add("r2")
    task = h.spawn("a")
    await h.clock.advance(1.0)
    h.fleet.drain("r2", h.clock.now())
    h.finish("r2")
    await h.clock.settle()
    assert h.granted == []
    assert h.in_flight("r2") == CAP - 1
    h.finish("r1")
    await task
    assert h.granted == [("a", "r1")]


async def test_a_cancelled_grant_passes_the_slot_on() -> None:
    h = Harness()
    h.add("r1")
    first, second = h.spawn("a"), h.spawn("b")
    await h.clock.advance(1.0)
    h.finish("r1")  # granted to "a", which has not run yet
    first.cancel()  # its client went away before it could use the slot
    await asyncio.wait_for(second, timeout=2.0)  # real seconds: without the hand-back it hangs
    assert first.cancelled()
    assert h.granted == [("b", "r1")]
    assert h.in_flight("r1") == CAP


async def test_freed_with_nothing_held_changes_nothing() -> None:
    h = Harness()
    h.add("r1")
    h.finish("r1")
    assert h.in_flight("r1") == CAP - 1
    assert h.holds.held(M) == 0


async def test_wait_past_the_bound_at_capacity_is_503_replicas_at_capacity() -> None:
    h = Harness(HoldSettings(timeout_s=30.0))
    h.add("r1")
    h.add("r2", in_flight=3, cap=3)
    task = h.spawn("a")
    await h.clock.advance(30.1)
    with pytest.raises(NoReplicaError) as caught:
        await task
    err = caught.value
    assert (err.status, err.code, err.headers) == (
        503,
        "replicas_at_capacity",
        {"Retry-After": "3"},
    )
    assert "all 2 ready replicas" in err.message
    assert "(2/3 in flight each) for 30 s" in err.message
    assert h.holds.held(M) == 0


async def test_full_queue_at_capacity_answers_at_once() -> None:
    h = Harness(HoldSettings(max_held=1))
    h.add("r1")
    first = h.spawn("a")
    await h.clock.settle()
    with pytest.raises(NoReplicaError) as caught:
        await h.holds.hold(M, h.clock.now())
    assert caught.value.code == "hold_queue_full"
    assert "at their concurrency limit" in caught.value.message
    h.finish("r1")
    await first
    assert h.granted == [("a", "r1")]


async def test_from_zero_a_capped_replica_takes_its_cap_and_the_rest_wait_for_slots() -> None:
    h = Harness(autoscaled=True)
    tasks = [h.spawn(n) for n in "abc"]
    await h.clock.advance(5.0)
    assert h.demands == [M]  # no replica at all: the autoscaler is woken
    h.add("r1", STARTING, in_flight=0)
    h.fleet.probe_passed("r1", h.clock.now())
    await h.clock.settle()
    assert h.granted == [("a", "r1"), ("b", "r1")]
    h.finish("r1")
    await asyncio.gather(*tasks)
    assert [name for name, _ in h.granted] == ["a", "b", "c"]
    assert h.in_flight("r1") == CAP


@pytest.mark.parametrize(
    ("cap", "headroom", "bound"),
    [(8, 0.25, 10), (4, 0.25, 5), (2, 0.25, 3), (1, 0.1, 2), (8, 0.0, 8), (3, 1.0, 6)],
)
def test_the_interactive_bound_is_the_cap_plus_its_headroom_and_one_slot_at_least(
    cap: int, headroom: float, bound: int
) -> None:
    assert burst_cap(cap, headroom) == bound


async def test_an_interactive_waiter_takes_a_headroom_slot_a_batch_one_waits_under_the_cap() -> (
    None
):
    h = Harness(HoldSettings(interactive_headroom=0.5))  # cap 2: one slot of headroom
    h.add("r1", in_flight=3)  # the cap plus its headroom: nobody gets in
    batch = h.spawn("batch", Priority.BATCH)
    await h.clock.advance(0.1)
    inter = h.spawn("inter", Priority.INTERACTIVE)
    await h.clock.advance(0.1)
    h.finish("r1")  # 2 in flight: at the cap, under the interactive bound
    await h.clock.settle()
    assert h.granted == [("inter", "r1")]  # it went first, into the headroom slot
    assert h.in_flight("r1") == 3
    h.finish("r1")
    await h.clock.settle()
    assert h.granted == [("inter", "r1")]  # 2 in flight: the batch one still waits
    h.finish("r1")
    await asyncio.gather(batch, inter)
    assert h.granted == [("inter", "r1"), ("batch", "r1")]
    assert h.in_flight("r1") == 2


async def test_without_headroom_an_interactive_waiter_waits_under_the_cap_too() -> None:
    h = Harness(HoldSettings(interactive_headroom=0.0))
    h.add("r1", in_flight=3)
    task = h.spawn("inter", Priority.INTERACTIVE)
    await h.clock.advance(0.1)
    h.finish("r1")
    await h.clock.settle()
    assert h.granted == []  # 2 in flight, the cap
    h.finish("r1")
    await task
    assert h.granted == [("inter", "r1")]
