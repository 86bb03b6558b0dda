"""The hold queue on a fake clock: release order, bounds, disconnects, the wake hook, ticks."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from fleetserve.config import HoldSettings
from fleetserve.errors import NoReplicaError
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.gateway.hold import HoldQueue
from fleetserve.gateway.keepalive import StreamKeepAlive, answer_as_event
from fleetserve.protocol.asgi import Message
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.window import LoadWindow
from fleetserve.testing.clock import FakeClock

M = "m"


class Harness:
    def __init__(self, settings: HoldSettings | None = None, *, autoscaled: bool = True) -> None:
        self.clock = FakeClock(start=100.0)
        self.fleet = Fleet()
        self.fleet.declare_model(M)
        self.window = LoadWindow()
        self.metrics = GatewayMetrics()
        self.demands: list[str] = []
        self.holds = HoldQueue(
            self.fleet, settings or HoldSettings(), self.clock, self.window, self.metrics,
            retry_after_s=2, autoscaled={M} if autoscaled else set(),
            on_demand=self.demands.append,
        )  # fmt: skip
        self.done: list[str] = []

    def spawn(self, name: str) -> asyncio.Task[None]:
        async def held() -> None:
            await self.holds.hold(M, self.clock.now())
            self.done.append(name)

        return asyncio.create_task(held())

    def add_replica(self, rid: str, state: ReplicaState = ReplicaState.STARTING) -> None:
        self.fleet.add(Replica(id=rid, url=f"http://{rid}", model=M, state=state))

    def metric(self, name: str, **labels: str) -> float | None:
        assert self.metrics.registry is not None
        return self.metrics.registry.get_sample_value(name, labels or {"model": M})


async def test_released_fifo_when_a_replica_turns_ready() -> None:
    h = Harness()
    tasks = [h.spawn(name) for name in "abc"]
    await h.clock.advance(3.0)
    assert h.holds.held(M) == 3
    assert h.window.snapshot(M, h.clock.now()).held == 3
    assert h.metric("fleetserve_held_requests") == 3
    h.add_replica("r1")  # starting: nothing is released yet
    await h.clock.advance(1.0)
    assert h.done == []
    h.fleet.probe_passed("r1", h.clock.now())
    await asyncio.gather(*tasks)
    assert h.done == ["a", "b", "c"]
    assert h.holds.held(M) == 0
    assert h.window.snapshot(M, h.clock.now()).held == 0
    assert h.metric("fleetserve_held_requests") == 0


async def test_wait_past_the_bound_is_503_no_replica_ready() -> None:
    h = Harness(HoldSettings(timeout_s=120.0))
    task = h.spawn("a")
    await h.clock.advance(119.9)
    assert not task.done()
    await h.clock.advance(0.2)
    with pytest.raises(NoReplicaError) as caught:
        await task
    err = caught.value
    assert (err.status, err.code, err.headers) == (503, "no_replica_ready", {"Retry-After": "2"})
    assert "within 120 s" in err.message
    assert h.holds.held(M) == 0


async def test_bound_counts_from_the_first_wait() -> None:
    h = Harness(HoldSettings(timeout_s=10.0))
    task = asyncio.create_task(h.holds.hold(M, started=h.clock.now() - 8.0))
    await h.clock.advance(2.5)
    with pytest.raises(NoReplicaError, match="within 10 s"):
        await task


async def test_full_queue_answers_at_once_and_keeps_the_others() -> None:
    h = Harness(HoldSettings(max_held=2))
    first, second = h.spawn("a"), h.spawn("b")
    await h.clock.settle()
    with pytest.raises(NoReplicaError) as caught:
        await h.holds.hold(M, h.clock.now())
    assert caught.value.code == "hold_queue_full"
    assert caught.value.headers == {"Retry-After": "2"}
    assert h.holds.held(M) == 2
    h.add_replica("r1", ReplicaState.READY)
    await asyncio.gather(first, second)
    assert h.done == ["a", "b"]


async def test_disconnected_client_leaves_the_queue_at_once() -> None:
    h = Harness()
    tasks = {name: h.spawn(name) for name in "abc"}
    await h.clock.advance(1.0)
    tasks["b"].cancel()  # what the gateway's disconnect watcher does
    await h.clock.settle()
    assert h.holds.held(M) == 2
    assert h.window.snapshot(M, h.clock.now()).held == 2
    assert h.metric("fleetserve_held_requests") == 2
    assert h.holds.release(M) == 2
    await asyncio.gather(tasks["a"], tasks["c"])
    assert h.done == ["a", "c"]
    assert tasks["b"].cancelled()


async def test_wake_hook_called_once_per_burst() -> None:
    h = Harness()
    first = [h.spawn(n) for n in "abc"]
    await h.clock.advance(1.0)
    assert h.demands == [M]
    h.add_replica("r1", ReplicaState.READY)
    await asyncio.gather(*first)
    h.fleet.drain("r1", h.clock.now())
    second = [h.spawn(n) for n in "de"]
    await h.clock.advance(1.0)
    assert h.demands == [M, M]
    h.add_replica("r2", ReplicaState.READY)
    await asyncio.gather(*second)


async def test_failing_wake_hook_does_not_fail_the_request() -> None:
    h = Harness()

    def broken(model: str) -> None:
        raise RuntimeError(f"autoscaler down for {model}")

    h.holds.on_demand = broken
    task = h.spawn("a")
    await h.clock.advance(1.0)
    h.add_replica("r1", ReplicaState.READY)
    await task
    assert h.done == ["a"]


async def test_removed_ready_replica_releases_nothing() -> None:
    h = Harness()
    h.add_replica("r1", ReplicaState.READY)
    h.fleet.drain("r1", 0.0)
    task = h.spawn("a")
    await h.clock.advance(1.0)
    h.fleet.remove("r1")
    await h.clock.advance(1.0)
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    ("autoscaled", "boot", "later", "can_hold", "should_hold"),
    [
        pytest.param(True, [], [], True, True, id="autoscaled-empty"),
        pytest.param(False, [], [], False, False, id="static-empty"),
        pytest.param(False, [ReplicaState.STARTING], [], False, False, id="static-starting"),
        pytest.param(False, [], [ReplicaState.STARTING], True, True, id="added-starting"),
        pytest.param(False, [], [ReplicaState.UNHEALTHY], False, False, id="added-unhealthy"),
        pytest.param(True, [ReplicaState.READY], [], True, False, id="autoscaled-has-ready"),
        pytest.param(True, [ReplicaState.DRAINING], [], True, True, id="autoscaled-draining"),
    ],
)
def test_which_models_hold(
    autoscaled: bool,
    boot: list[ReplicaState],
    later: list[ReplicaState],
    can_hold: bool,
    should_hold: bool,
) -> None:
    fleet = Fleet()
    fleet.declare_model(M)
    for i, state in enumerate(boot):
        fleet.add(Replica(id=f"b{i}", url=f"http://b{i}", model=M, state=state))
    holds = HoldQueue(
        fleet, HoldSettings(), FakeClock(), LoadWindow(), GatewayMetrics(),
        retry_after_s=1, autoscaled={M} if autoscaled else set(),
    )  # fmt: skip
    for i, state in enumerate(later):
        fleet.add(Replica(id=f"l{i}", url=f"http://l{i}", model=M, state=state))
    assert holds.can_hold(M) is can_hold
    assert holds.should_hold(M) is should_hold


async def test_stream_keepalive_sends_head_then_comments() -> None:
    h = Harness(HoldSettings(stream_head_after_s=1.0, keepalive_s=5.0, timeout_s=12.0))
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    started = h.clock.now()
    ticker = StreamKeepAlive(send, h.holds.settings, started)
    task = asyncio.create_task(h.holds.hold(M, started, ticker))
    await h.clock.advance(0.9)
    assert sent == []
    await h.clock.advance(0.2)
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    await h.clock.advance(10.0)
    comments = [m["body"] for m in sent[1:]]
    assert comments == [
        b": waiting for a replica (1.0s)\n\n",
        b": waiting for a replica (6.0s)\n\n",
        b": waiting for a replica (11.0s)\n\n",
    ]
    assert ticker.head_sent
    await h.clock.advance(1.0)
    with pytest.raises(NoReplicaError):
        await task


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        pytest.param(
            b'{"error": {"message": "bad", "type": "invalid_request_error", "code": "x"}}\n',
            "x", "bad", id="openai-envelope",
        ),
        pytest.param(b"<html>oops</html>", "upstream_error", "the replica answered 500: "
                     "<html>oops</html>", id="not-json"),
    ],
)  # fmt: skip
def test_upstream_answer_as_one_event(body: bytes, code: str, message: str) -> None:
    event = answer_as_event(500, body)
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    assert event.count(b"\n") == 2
    error = orjson.loads(event[6:])["error"]
    assert (error["code"], error["message"]) == (code, message)
