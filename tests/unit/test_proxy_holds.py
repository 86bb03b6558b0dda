"""The proxy's holds on a fake clock: what a request held more than once records, and what
held requests get when the gateway shuts down."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from fleetserve.config import GatewaySettings, HoldSettings
from fleetserve.errors import NoReplicaError, UpstreamStatusError
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.gateway.exchange import Exchange
from fleetserve.gateway.hold import HoldQueue
from fleetserve.gateway.proxy import Proxy
from fleetserve.gateway.shutdown import SHUTTING_DOWN, Shutdown, shutting_down_error
from fleetserve.gateway.ticket import Ticket
from fleetserve.gateway.upstream import BufferedResponse, UpstreamClient
from fleetserve.protocol.asgi import Message
from fleetserve.protocol.inspect import inspect_request
from fleetserve.routing.pickers import make_picker
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.window import LoadWindow
from fleetserve.tenancy.fairness import Priority
from fleetserve.tenancy.limiter import Admission
from fleetserve.tenancy.model import ApiKey, Principal, Tenant
from fleetserve.testing.clock import FakeClock

M = "m"
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


class AnsweringUpstream:
    """Answers every non-stream request at once, remembering where it went."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.failing: set[str] = set()  # replica ids that answer 503

    async def send(
        self,
        url: str,
        body: bytes,
        request_id: str,
        timeout_s: float | None = None,
        traceparent: str | None = None,
    ) -> BufferedResponse:
        self.urls.append(url)
        if any(url.startswith(f"http://{rid}/") for rid in self.failing):
            raise UpstreamStatusError(503, b'{"error": "overloaded"}', "application/json")
        return BufferedResponse(200, "application/json", b'{"ok": true}')


class Harness:
    def __init__(self) -> None:
        self.clock = FakeClock(start=100.0)
        self.fleet = Fleet()
        self.fleet.declare_model(M)
        self.metrics = GatewayMetrics()
        self.window = LoadWindow()
        self.settings = GatewaySettings()
        self.holds = HoldQueue(
            self.fleet, HoldSettings(), self.clock, self.window, self.metrics,
            retry_after_s=2, autoscaled={M},
        )  # fmt: skip
        self.shutdown = Shutdown(self.clock, 60.0)
        self.upstream = AnsweringUpstream()
        self.proxy = Proxy(
            self.fleet, {M: make_picker("round_robin")}, cast(UpstreamClient, self.upstream),
            self.settings, self.metrics, self.clock, self.window, self.holds, self.shutdown,
        )  # fmt: skip
        self.sent: list[Message] = []

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def forward(self, priority: Priority | None = None) -> tuple[asyncio.Task[None], Exchange]:
        exchange = Exchange()
        if priority is not None:  # a tenant's request, of this priority class
            tenant = Tenant(str(priority.name).lower(), priority=priority)
            principal = Principal(tenant, ApiKey("abcdefgh", tenant.name, "digest"))
            admission = Admission("r-1", tenant.name, "abcdefgh", 0, 0, recorded=False)
            exchange.ticket = Ticket(principal, admission, "r-1", BODY, None, 10, 0.0)
        info = inspect_request(BODY, chat=True)
        coro = self.proxy.forward(
            info, "/v1/chat/completions", BODY, "r-1", self.send, self.clock.now(), exchange
        )
        return asyncio.create_task(coro), exchange

    def add(self, rid: str, cap: int | None = None) -> Replica:
        replica = Replica(
            id=rid, url=f"http://{rid}", model=M, state=ReplicaState.READY, max_concurrency=cap
        )
        self.fleet.add(replica)
        return replica

    def sample(self, name: str) -> float | None:
        registry = self.metrics.registry
        assert registry is not None
        return registry.get_sample_value(name, {"model": M})


async def test_a_request_held_twice_is_observed_once_with_its_whole_wait() -> None:
    h = Harness()
    h.add("r1", cap=1)
    h.fleet.begin("r1")  # r1 is busy with another request: at its cap
    task, exchange = h.forward()
    await h.clock.advance(2.0)
    assert h.holds.held(M) == 1
    # The other request ends and its slot is granted to ours, but r1 starts draining before
    # ours runs: it is held again, now for a cold start.
    h.fleet.end("r1")
    h.holds.freed("r1", M)
    h.fleet.drain("r1", h.clock.now())
    await h.clock.advance(3.0)
    assert h.holds.held(M) == 1
    h.add("r2")  # a new replica turns ready and takes it
    await task
    assert h.upstream.urls == ["http://r2/v1/chat/completions"]
    assert exchange.status == 200
    assert h.sample("fleetserve_hold_seconds_count") == 1
    assert h.sample("fleetserve_hold_seconds_sum") == pytest.approx(5.0)


async def test_shutdown_answers_held_requests_at_once_and_refuses_new_holds() -> None:
    h = Harness()
    task, _ = h.forward()
    await h.clock.advance(1.0)
    assert h.holds.held(M) == 1
    h.holds.close(shutting_down_error(2))
    with pytest.raises(NoReplicaError) as caught:
        await task
    assert (caught.value.status, caught.value.code) == (503, SHUTTING_DOWN)
    assert caught.value.headers == {"Retry-After": "2"}
    assert h.holds.held(M) == 0
    later, _ = h.forward()
    with pytest.raises(NoReplicaError, match="shutting down"):
        await later


async def test_an_interactive_request_takes_a_headroom_slot_where_others_are_held() -> None:
    h = Harness()  # the default headroom: a quarter of the cap, one slot at least
    h.add("r1", cap=2)
    h.fleet.begin("r1")
    h.fleet.begin("r1")  # at its cap
    batch, _ = h.forward(Priority.BATCH)
    standard, _ = h.forward()
    await h.clock.advance(1.0)
    assert h.holds.held(M) == 2
    inter, exchange = h.forward(Priority.INTERACTIVE)
    await inter  # sent at once, over the cap by one
    assert exchange.status == 200
    assert h.upstream.urls == ["http://r1/v1/chat/completions"]
    assert h.holds.held(M) == 2
    h.fleet.begin("r1")  # three in flight: the cap plus its headroom
    second, _ = h.forward(Priority.INTERACTIVE)
    await h.clock.advance(0.1)
    assert h.holds.held(M) == 3  # now it waits too, first in line
    h.fleet.end("r1")
    h.holds.freed("r1", M)
    await second
    assert h.holds.held(M) == 2  # the freed headroom slot went to it, not to the others
    for task in (batch, standard):
        task.cancel()
    await asyncio.gather(batch, standard, return_exceptions=True)


async def test_a_retry_waits_for_a_slot_on_a_replica_at_its_cap_instead_of_failing() -> None:
    """r2 answers 503; r1, the only other, is at its cap: the retry holds for r1's slot (it
    used to answer 502 at once), is not handed a slot on r2 that it just failed on, and is
    served by r1 when r1 frees one."""
    h = Harness()
    h.add("r1", cap=1)
    h.add("r2", cap=4)
    h.upstream.failing = {"r2"}
    h.fleet.begin("r1")  # r1 busy with another request
    task, exchange = h.forward()
    await h.clock.advance(0.5)
    assert h.upstream.urls == ["http://r2/v1/chat/completions"]  # the first try, failed
    assert h.holds.held(M) == 1  # the retry waits
    h.fleet.begin("r2")
    h.fleet.end("r2")
    h.holds.freed("r2", M)  # a slot on r2 frees: not for this request
    await h.clock.advance(0.5)
    assert h.holds.held(M) == 1
    assert len(h.upstream.urls) == 1
    h.fleet.end("r1")
    h.holds.freed("r1", M)  # r1's request ends
    await task
    assert h.upstream.urls[-1] == "http://r1/v1/chat/completions"
    assert exchange.status == 200
