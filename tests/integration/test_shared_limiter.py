"""SharedLimiter when Redis goes away and comes back: a TCP proxy in front of the real Redis
is cut mid-test. fail_closed refuses (503), local enforces each limit's share per process;
one log line and one callback when an outage begins and when it ends, never per request."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from fleetserve.tenancy.limiter import Admission, RejectReason
from fleetserve.tenancy.local_limiter import LocalLimiter
from fleetserve.tenancy.model import Limits
from fleetserve.tenancy.redis_limiter import RedisLimiter
from fleetserve.tenancy.shared_limiter import SharedLimiter, divided
from fleetserve.testing.gateway import wait_until
from tests.integration.redis_support import REDIS_URL, TcpProxy, isolated_prefix
from tests.unit.limiter_cases import admitted, estimate, principal, rejected

pytestmark = pytest.mark.integration
LOGGER = "fleetserve.tenancy.shared_limiter"


@dataclass
class Rig:
    proxy: TcpProxy
    prefix: str
    outages: list[bool] = field(default_factory=list)

    def limiter(self, mode: str, processes: int = 1) -> SharedLimiter:
        return SharedLimiter(
            RedisLimiter.from_url(self.proxy.url, prefix=self.prefix),
            LocalLimiter(),
            mode,  # type: ignore[arg-type]
            processes,
            self.outages.append,
        )


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with isolated_prefix("shared") as prefix:
        proxy = TcpProxy()
        await proxy.start()
        try:
            yield Rig(proxy, prefix)
        finally:
            await proxy.cut()


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


async def until_admitted(limiter: SharedLimiter, who: object, deadline_s: float = 5.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if isinstance(await limiter.admit(who, estimate()), Admission):  # type: ignore[arg-type]
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"Redis was not back within {deadline_s} s")


async def test_fail_closed_refuses_while_out_and_says_so_once(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = rig.limiter("fail_closed")
    who = principal(rpm=1000)
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        admitted(await limiter.admit(who, estimate()))
        await rig.proxy.cut()
        for _ in range(50):
            refused = rejected(await limiter.admit(who, estimate()))
            assert refused.reason is RejectReason.UNAVAILABLE
            assert refused.retry_after_s == 1.0
        assert limiter.out
        # A request with nothing to check needs no Redis: it still goes.
        assert not admitted(await limiter.admit(principal(), estimate())).recorded
        assert rig.outages == [True]
        assert len(outage_lines(caplog)) == 1
        assert "Redis is unreachable" in outage_lines(caplog)[0]
        assert "refused (503)" in outage_lines(caplog)[0]
        await rig.proxy.start()  # Redis is back: within about a probe interval
        back = time.monotonic()
        await until_admitted(limiter, who)
        assert time.monotonic() - back < 3.0
        assert rig.outages == [True, False]
        lines = outage_lines(caplog)
        assert len(lines) == 2
        assert "answers again" in lines[1]
    finally:
        await limiter.close()


async def test_local_enforces_each_processes_share(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = rig.limiter("local", processes=3)
    who = principal(rpm=10, key_concurrent=7)  # shares: 4 per minute, 3 at once
    budgeted = principal(tenant="payer", budget_usd=5.0)
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        before = admitted(await limiter.admit(who, estimate()))  # shared, in Redis
        await rig.proxy.cut()
        results = [await limiter.admit(who, estimate()) for _ in range(6)]
        assert [isinstance(r, Admission) for r in results] == [True] * 3 + [False] * 3
        concurrency = rejected(results[3])
        assert (concurrency.reason, concurrency.scope) == (RejectReason.CONCURRENCY, "key")
        local = [r for r in results if isinstance(r, Admission)]
        await limiter.settle(local[0], 5, 0)  # given back on the side that admitted it
        admitted(await limiter.admit(who, estimate()))
        rpm = rejected(await limiter.admit(who, estimate()))
        assert rpm.reason is RejectReason.RPM  # 4 of the 10 per minute here
        # A budget cannot be split: priced requests of budgeted tenants wait, free ones go.
        assert (
            rejected(
                await limiter.admit(
                    budgeted, estimate(input_per_mtok_usd=1.0, output_per_mtok_usd=1.0)
                )
            ).reason
            is RejectReason.UNAVAILABLE
        )
        admitted(await limiter.admit(budgeted, estimate()))
        await limiter.settle(before, 5, 0)  # a Redis admission, while out: dropped quietly
        state = await limiter.state(who)
        assert state["shared"] is False
        assert state["key"]["concurrent"] == {"used": 3, "limit": 3}  # type: ignore[index]
        assert len(outage_lines(caplog)) == 1
        assert "1/3" in outage_lines(caplog)[0]

        await rig.proxy.start()
        await wait_until(lambda: not limiter.out)
        assert not limiter.out
        assert rig.outages == [True, False]
        for admission in local[1:]:
            await limiter.settle(admission, 5, 0)  # still to the local side
        assert (await limiter.state(who))["shared"] is True
        assert limiter.local.state_now(limiter.share(who))["key"] == {
            "prefix": "key00001",
            "concurrent": {"used": 1, "limit": 3},
        }
    finally:
        await limiter.close()


async def test_renewals_go_to_the_side_that_admitted(rig: Rig) -> None:
    limiter = rig.limiter("local")
    who = principal(concurrent=5)
    try:
        shared = admitted(await limiter.admit(who, estimate()))
        await rig.proxy.cut()
        local = admitted(await limiter.admit(who, estimate()))
        await limiter.renew([shared, local])  # the shared one is skipped while out
        await rig.proxy.start()
        await wait_until(lambda: not limiter.out)
        await limiter.renew([shared, local])
        state = await limiter.state(who)
        assert state["tenant"]["concurrent"]["used"] == 1  # type: ignore[index]
        await limiter.settle(shared, 1, 0)
        state = await limiter.state(who)
        assert state["tenant"]["concurrent"]["used"] == 0  # type: ignore[index]
    finally:
        await limiter.close()


async def test_probes_go_at_most_once_a_second(caplog: pytest.LogCaptureFixture) -> None:
    """A Redis that accepts and hangs up at once: however many requests come, the limiter
    tries it once per probe interval, not once per request."""
    accepted = 0

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.transport.abort()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = SharedLimiter(
        RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0"), LocalLimiter(), "fail_closed"
    )
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        start = time.monotonic()
        for _ in range(200):
            rejected(await limiter.admit(principal(rpm=5), estimate()))
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - start
        assert accepted <= 1 + elapsed / 1.0 + 1
        assert len(outage_lines(caplog)) == 1
    finally:
        await limiter.close()
        server.close()
        await server.wait_closed()


async def test_a_closed_port_from_the_start_fails_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outages: list[bool] = []
    limiter = SharedLimiter(
        RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0"),
        LocalLimiter(),
        "fail_closed",
        on_outage=outages.append,
    )
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        for _ in range(10):
            refused = rejected(await limiter.admit(principal(tpm=100), estimate()))
            assert refused.reason is RejectReason.UNAVAILABLE
        assert outages == [True]
        assert len(outage_lines(caplog)) == 1
        with pytest.raises(Exception, match="onnect"):
            await limiter.seed_spend(principal(budget_usd=1).tenant, 0, 1)
    finally:
        await limiter.close()


@pytest.mark.parametrize(
    ("limits", "processes", "share"),
    [
        pytest.param(Limits(60, 1000, 8), 4, Limits(15, 250, 2), id="even"),
        pytest.param(Limits(10, 7, 3), 4, Limits(3, 2, 1), id="round-up"),
        pytest.param(Limits(1, None, 1), 8, Limits(1, None, 1), id="at-least-one"),
        pytest.param(Limits(), 3, Limits(), id="none"),
    ],
)
def test_divided(limits: Limits, processes: int, share: Limits) -> None:
    assert divided(limits, processes) == share


async def test_bad_arguments() -> None:
    redis = RedisLimiter.from_url(REDIS_URL)
    try:
        with pytest.raises(ValueError, match="processes"):
            SharedLimiter(redis, LocalLimiter(), "local", 0)
        with pytest.raises(ValueError, match="mode"):
            SharedLimiter(redis, LocalLimiter(), "open", 1)  # type: ignore[arg-type]
    finally:
        await redis.close()
