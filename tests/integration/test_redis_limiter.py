"""RedisLimiter where only Redis can show it: windows and leases on the server's own clock,
exactness under concurrent admissions from separate clients, the leases of a SIGKILLed
gateway, EVAL where SCRIPT is refused, one hash tag per tenant, the Lua calendar."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import signal
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fleetserve.tenancy.limiter import Admission, Rejection
from fleetserve.tenancy.model import BudgetPeriod
from fleetserve.tenancy.periods import period_of
from fleetserve.tenancy.redis_limiter import RedisLimiter, connect
from fleetserve.tenancy.scripts import (
    COMMON,
    LuaScript,
    ScriptRunner,
    lua_script,
    lua_source,
    script,
)
from fleetserve.testing.clock import FakeClock
from tests.integration.redis_support import REDIS_URL, isolated_prefix, keys_under
from tests.unit.limiter_cases import admitted, estimate, principal, rejected

pytestmark = pytest.mark.integration


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with isolated_prefix() as name:
        yield name


def patient(prefix: str) -> RedisLimiter:
    """A limiter on its own pool with long timeouts: the tests that use it prove counting
    under concurrency, not latency, and a loaded machine may take a while to open the
    hundreds of connections a burst asks for at once."""
    return RedisLimiter.from_url(REDIS_URL, prefix=prefix, timeout_s=10.0, connect_timeout_s=10.0)


async def admit_until(
    limiter: RedisLimiter, who: Any, deadline_s: float, ask: Any = None
) -> tuple[Admission, float]:
    """Poll admissions until one goes (or fail at the deadline); returns it and when."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        result = await limiter.admit(who, ask or estimate())
        if isinstance(result, Admission):
            return result, time.monotonic()
        await asyncio.sleep(min(0.02, result.retry_after_s))
    pytest.fail(f"nothing was admitted within {deadline_s} s")


async def test_a_sliding_window_on_the_servers_clock(prefix: str) -> None:
    """A 1 s window on Redis TIME under steady excess demand: any 6 admissions span more
    than the window (bounds taken around each call, on this machine's clock, the server's),
    and each window fills up to its limit."""
    limiter = RedisLimiter(connect(REDIS_URL), prefix=prefix, window_s=1.0, owns_client=True)
    who = principal(rpm=5)
    spans: list[tuple[float, float]] = []  # (sent, answered) of each admission
    try:
        end = time.time() + 3.2
        for _ in range(2000):
            if time.time() >= end:
                break
            sent = time.time()
            result = await limiter.admit(who, estimate())
            if isinstance(result, Admission):
                spans.append((sent, time.time()))
            else:
                assert 0 < result.retry_after_s <= 1.0
                await asyncio.sleep(min(0.01, result.retry_after_s))
    finally:
        await limiter.close()
    for first, sixth in zip(spans, spans[5:], strict=False):
        assert sixth[1] - first[0] > 1.0
    assert 15 <= len(spans) <= 25  # four windows began in 3.2 s; the first three filled


async def test_200_admissions_from_four_clients_admit_exactly_the_limit(prefix: str) -> None:
    limiters = [patient(prefix) for _ in range(4)]
    who = principal(rpm=60)
    try:
        results = await asyncio.gather(
            *(limiters[i % 4].admit(who, estimate()) for i in range(200))
        )
        assert sum(isinstance(r, Admission) for r in results) == 60
        assert all(r.retry_after_s > 55 for r in results if isinstance(r, Rejection))
        state = await limiters[0].state(who)
        assert state["tenant"] == {"name": "acme", "rpm": {"used": 60, "limit": 60}}
    finally:
        for limiter in limiters:
            await limiter.close()


def ten_cents() -> Any:
    """At most $0.10: 1,000 prompt tokens at $10/Mtok and 3,000 output tokens at $30/Mtok."""
    return estimate(prompt=1000, max_tokens=3000, input_per_mtok_usd=10.0, output_per_mtok_usd=30.0)


async def test_a_5_dollar_budget_admits_50_of_1000_concurrent_10_cent_requests(
    prefix: str,
) -> None:
    limiters = [patient(prefix) for _ in range(4)]
    who = principal(budget_usd=5.0)
    try:
        results = await asyncio.gather(
            *(limiters[i % 4].admit(who, ten_cents()) for i in range(1000))
        )
        admissions = [r for r in results if isinstance(r, Admission)]
        assert len(admissions) == 50
        assert {r.cost_reserved_micro_usd for r in admissions} == {100_000}
        budget = (await limiters[0].state(who))["tenant"]["budget"]  # type: ignore[index]
        assert budget["spent_micro_usd"] + budget["reserved_micro_usd"] == 5_000_000
        await asyncio.gather(*(limiters[1].settle(a, 4000, 100_000) for a in admissions))
        more = await asyncio.gather(*(limiters[2].admit(who, ten_cents()) for _ in range(100)))
        assert not any(isinstance(r, Admission) for r in more)  # none once it is spent
        budget = (await limiters[3].state(who))["tenant"]["budget"]  # type: ignore[index]
        assert (budget["spent_micro_usd"], budget["reserved_micro_usd"]) == (5_000_000, 0)
    finally:
        for limiter in limiters:
            await limiter.close()


async def test_concurrent_admissions_and_settlements_keep_the_budget_exact(prefix: str) -> None:
    """1,000 requests within 0.2 s through four clients, each settling at a random cost as
    soon as it is admitted, some without max_tokens (capped): the spend Redis counted is
    exactly the sum of the settlements, and never past the budget."""
    limiters = [patient(prefix) for _ in range(4)]
    who = principal(budget_usd=5.0)
    rng = random.Random(3)
    settled: list[int] = []

    async def one(i: int) -> None:
        limiter = limiters[i % 4]
        ask = estimate(
            prompt=1000,
            max_tokens=3000,
            given=rng.random() < 0.5,
            input_per_mtok_usd=10.0,
            output_per_mtok_usd=30.0,
        )
        await asyncio.sleep(rng.random() * 0.2)  # arrivals spread: settlements come between
        result = await limiter.admit(who, ask)
        if isinstance(result, Admission):
            await asyncio.sleep(rng.random() * 0.05)
            cost = rng.randrange(0, result.cost_reserved_micro_usd + 1)
            await limiter.settle(result, 10, cost)
            settled.append(cost)

    try:
        await asyncio.gather(*(one(i) for i in range(1000)))
        budget = (await limiters[0].state(who))["tenant"]["budget"]  # type: ignore[index]
        assert budget["reserved_micro_usd"] == 0
        assert budget["spent_micro_usd"] == sum(settled) <= 5_000_000
        assert len(settled) > 50  # settling below the worst case let more go
    finally:
        for limiter in limiters:
            await limiter.close()


async def test_leases_expire_on_the_servers_clock(prefix: str) -> None:
    limiter = RedisLimiter(connect(REDIS_URL), prefix=prefix, lease_ttl_s=0.5, owns_client=True)
    who = principal(concurrent=1)
    try:
        admitted(await limiter.admit(who, estimate()))
        start = time.monotonic()
        rejected(await limiter.admit(who, estimate()))
        _, at = await admit_until(limiter, who, deadline_s=5.0)
        assert 0.3 < at - start < 2.0
    finally:
        await limiter.close()


CHILD = """
import asyncio, sys
from fleetserve.tenancy.limiter import Admission, Estimate
from fleetserve.tenancy.model import ApiKey, Limits, Principal, Tenant
from fleetserve.tenancy.redis_limiter import RedisLimiter

async def main() -> None:
    limiter = RedisLimiter.from_url(sys.argv[1], prefix=sys.argv[2], lease_ttl_s=1.0)
    who = Principal(Tenant("acme", limits=Limits(max_concurrent=3)),
                    ApiKey("key00001", "acme", "0" * 64))
    held = []
    for i in range(3):
        result = await limiter.admit(who, Estimate(f"child-{i}", 10, 10, True))
        assert isinstance(result, Admission), result
        held.append(result)
    print("held", flush=True)
    for _ in range(300):  # a gateway's renewal loop, well inside the TTL
        await limiter.renew(held)
        await asyncio.sleep(0.2)

asyncio.run(main())
"""


async def test_the_leases_of_a_killed_gateway_expire(prefix: str) -> None:
    """A process holds every slot and renews them; SIGKILLed, it stops renewing, and its
    leases expire within the TTL: the slots come back without anyone settling."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(CHILD),
        REDIS_URL,
        prefix,
        stdout=asyncio.subprocess.PIPE,
    )
    limiter = RedisLimiter(connect(REDIS_URL), prefix=prefix, lease_ttl_s=1.0, owns_client=True)
    who = principal(concurrent=3)
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), timeout=20)
        assert line.strip() == b"held"
        end = time.monotonic() + 2.0  # twice the TTL: the renewals keep them
        while time.monotonic() < end:
            assert isinstance(await limiter.admit(who, estimate()), Rejection)
            await asyncio.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        _, at = await admit_until(limiter, who, deadline_s=5.0)
        assert at - killed <= 1.5  # the TTL, and the poll
    finally:
        if child.returncode is None:
            child.kill()
        await asyncio.wait_for(child.wait(), timeout=10)
        await limiter.close()


async def test_renewals_of_several_tenants_go_in_one_pipeline(prefix: str) -> None:
    clock = FakeClock()
    limiter = RedisLimiter(
        connect(REDIS_URL), prefix=prefix, lease_ttl_s=10.0, owns_client=True, test_clock=clock
    )
    tenants = [principal(tenant=name, concurrent=2) for name in ("a", "b", "c")]
    try:
        held = [admitted(await limiter.admit(who, estimate())) for who in tenants]
        dropped = [admitted(await limiter.admit(who, estimate())) for who in tenants]
        await clock.advance(8.0)
        await limiter.renew(held)
        await clock.advance(4.0)  # 12 s: the renewed stay, the others expired
        for who in tenants:
            state = await limiter.state(who)
            assert state["tenant"]["concurrent"]["used"] == 1  # type: ignore[index]
        assert len(dropped) == 3
    finally:
        await limiter.close()


async def test_every_key_of_a_tenant_shares_its_hash_tag_and_expires(prefix: str) -> None:
    limiter = RedisLimiter(connect(REDIS_URL), prefix=prefix, owns_client=True)
    who = principal(
        rpm=10, tpm=10_000, concurrent=3, key_rpm=5, key_tpm=5000, key_concurrent=2,
        budget_usd=1.0,
    )  # fmt: skip
    total = principal(tenant="forever", budget_usd=1.0, period=BudgetPeriod.TOTAL)
    try:
        admitted(await limiter.admit(who, ten_cents()))
        admitted(await limiter.admit(total, ten_cents()))
    finally:
        await limiter.close()
    keys = await keys_under(prefix)
    acme = [k for k in keys if "{t:acme}" in k]
    assert len(acme) == 10  # RPM x2, TPM x4, leases x2, budget x2
    assert len({key_slot(k.encode()) for k in acme}) == 1
    assert all("{t:acme}" in k or "{t:forever}" in k for k in keys)
    client = Redis.from_url(REDIS_URL)
    try:
        for key in acme:
            assert await client.pttl(key) > 0  # idle counters go away on their own
        month_end = period_of(BudgetPeriod.MONTH, time.time()).end_s
        assert month_end is not None
        budget_ttl_s = await client.pttl(f"{prefix}:{{t:acme}}:budget") / 1000
        assert budget_ttl_s == pytest.approx(month_end + 86_400 - time.time(), abs=5)
        assert await client.pttl(f"{prefix}:{{t:forever}}:budget") == -1  # a total: kept
    finally:
        await client.aclose()


def _unique(lua: LuaScript) -> LuaScript:
    """The same script under a SHA the server has never seen (its cache is shared)."""
    return lua_script(lua.name, lua.source + f"\n-- {secrets.token_hex(8)}\n")


@pytest.fixture
async def restricted_user() -> AsyncIterator[Any]:
    """Makes Redis users that may not run some commands (as a proxy might refuse them)."""
    admin = Redis.from_url(REDIS_URL)
    made: list[str] = []

    async def make(*denied: str) -> Redis:
        name = f"test-limits-{secrets.token_hex(4)}"
        password = secrets.token_hex(16)
        await admin.acl_setuser(
            name,
            enabled=True,
            passwords=[f"+{password}"],
            keys=["*"],
            channels=["*"],
            categories=["+@all"],
            commands=[f"-{command}" for command in denied],
        )
        made.append(name)
        return Redis(host="127.0.0.1", port=6379, username=name, password=password)

    try:
        yield make
    finally:
        for name in made:
            await admin.acl_deluser(name)
        await admin.aclose()


async def test_noscript_loads_the_script_once(prefix: str) -> None:
    client = Redis.from_url(REDIS_URL)
    runner = ScriptRunner(client)
    lua = _unique(script("seed.lua"))
    try:
        key = f"{prefix}:{{t:x}}:budget"
        assert await runner.run(lua, [key], ["day:0", 5, ""]) == 1
        assert await client.script_exists(lua.sha) == [True]
        assert not runner.eval_only
        assert await runner.run(lua, [key], ["day:0", 5, ""]) == 0
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "denied",
    [
        pytest.param(("script",), id="script-refused"),
        pytest.param(("script", "evalsha"), id="script-and-evalsha-refused"),
    ],
)
async def test_scripts_go_with_eval_where_script_is_refused(
    prefix: str, restricted_user: Any, denied: tuple[str, ...], caplog: pytest.LogCaptureFixture
) -> None:
    client = await restricted_user(*denied)
    runner = ScriptRunner(client)
    lua = _unique(script("seed.lua"))  # unknown to the server: EVALSHA says NOSCRIPT
    key = f"{prefix}:{{t:x}}:budget"
    try:
        with caplog.at_level(logging.WARNING, logger="fleetserve.tenancy.scripts"):
            assert await runner.run(lua, [key], ["day:0", 5, ""]) == 1
            assert runner.eval_only
            assert await runner.run(lua, [key], ["day:0", 5, ""]) == 0
        refusals = [r for r in caplog.records if "EVAL from now on" in r.getMessage()]
        assert len(refusals) == 1
    finally:
        await client.aclose()


async def test_the_limiter_keeps_limits_shared_through_eval(
    prefix: str, restricted_user: Any
) -> None:
    """Where a proxy refuses SCRIPT and EVALSHA the limits stay exact across clients (not
    local, as LiteLLM's #32232): EVAL is one round trip and as atomic."""
    clients = [await restricted_user("script", "evalsha") for _ in range(2)]
    limiters = [RedisLimiter(c, prefix=prefix, owns_client=True) for c in clients]
    who = principal(rpm=30, concurrent=40)
    try:
        results = await asyncio.gather(
            *(limiters[i % 2].admit(who, estimate()) for i in range(100))
        )
        admissions = [r for r in results if isinstance(r, Admission)]
        assert len(admissions) == 30
        assert all(limiter.eval_only for limiter in limiters)
        await limiters[0].settle(admissions[0], 10, 0)
        await limiters[1].renew(admissions[1:3])
        state = await limiters[0].state(who)
        assert state["tenant"]["concurrent"]["used"] == 29  # type: ignore[index]
    finally:
        for limiter in limiters:
            await limiter.close()


async def test_the_lua_calendar_agrees_with_periods_py() -> None:
    """lua/common.lua's days-from-civil arithmetic against periods.period_of, over random
    moments from 1970 to 2400 and the edges of months, weeks and leap days."""
    client = Redis.from_url(REDIS_URL)
    probe = (
        lua_source(COMMON)
        + """
local out = {}
for i = 2, #ARGV do
  local s, e = period_bounds(ARGV[1], tonumber(ARGV[i]))
  out[#out + 1] = s
  out[#out + 1] = e
end
return out
"""
    )
    rng = random.Random(5)
    moments = [rng.randrange(0, 13_569_465_600) for _ in range(3000)]
    for year in (1970, 2000, 2024, 2026, 2100, 2399):  # month edges, either side
        for month in range(1, 13):
            start = period_of(BudgetPeriod.MONTH, _utc(year, month)).start_s
            moments += [start - 1, start, start + 1]
    try:
        for kind in ("day", "week", "month", "total"):
            for chunk in range(0, len(moments), 1000):
                part = moments[chunk : chunk + 1000]
                got = await client.eval(probe, 0, kind, *part)
                for i, at in enumerate(part):
                    period = period_of(BudgetPeriod(kind), at)
                    end = -1 if period.end_s is None else period.end_s
                    assert (got[2 * i], got[2 * i + 1]) == (period.start_s, end), (kind, at)
    finally:
        await client.aclose()


def _utc(year: int, month: int) -> int:
    return int(datetime(year, month, 15, tzinfo=UTC).timestamp())


async def test_a_closed_port_fails_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limiter = RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        start = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await limiter.admit(principal(rpm=5), estimate())
        assert time.monotonic() - start < 1.0
    finally:
        await limiter.close()


async def test_a_request_with_nothing_to_check_needs_no_redis() -> None:
    """No limits and no budget (or a free model): no round trip, so no Redis needed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limiter = RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        for who in (principal(), principal(budget_usd=1.0)):
            result = admitted(await limiter.admit(who, estimate()))
            await limiter.renew([result])
            await limiter.settle(result, 10, 0)
    finally:
        await limiter.close()


async def test_a_silent_server_times_out() -> None:
    """A Redis that accepts and never answers (hung, or a black-holed proxy)."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    try:
        start = time.monotonic()
        with pytest.raises((RedisTimeoutError, RedisConnectionError)):
            await limiter.admit(principal(rpm=5), estimate())
        assert 0.4 < time.monotonic() - start < 2.0
    finally:
        await limiter.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def _evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_admissions_made_together_go_as_one_call_and_count_one_by_one(prefix: str) -> None:
    """Twenty admissions started in one loop iteration against rpm=5, concurrency 3 and a
    budget of four requests' worst case: one EVALSHA carries them all, and the script takes
    them in order as if each had come alone: exactly the first three go (concurrency binds
    first), the rest are refused, and the budget's reservations add up exactly."""
    limiter = patient(prefix)
    observer = connect(REDIS_URL)
    who = principal(rpm=5, concurrent=3, budget_usd=400e-6)  # worst case: 90 tokens, $90e-6
    asks = [estimate(prompt=10, max_tokens=90, output_per_mtok_usd=1.0) for _ in range(20)]
    try:
        await limiter.admit(principal("warm-up", "key00009", rpm=1), estimate())  # loads it
        before = await _evalsha_calls(observer)
        results = await asyncio.gather(*(limiter.admit(who, ask) for ask in asks))
        calls = await _evalsha_calls(observer) - before
        assert calls == 1
        went = [admitted(r) for r in results[:3]]
        assert [r.budget_left_micro_usd for r in went] == [310, 220, 130]
        assert all(rejected(r).reason.value == "concurrency" for r in results[3:])
        # Their settlements, together too: one call, and every lease and reservation is back.
        before = await _evalsha_calls(observer)
        await asyncio.gather(*(limiter.settle(a, 50, 40) for a in went))
        assert await _evalsha_calls(observer) - before == 1
        state = await limiter.state(who)
        tenant = state["tenant"]
        assert isinstance(tenant, dict)
        assert tenant["concurrent"] == {"used": 0, "limit": 3}
        assert tenant["rpm"] == {"used": 3, "limit": 5}
        budget = tenant["budget"]
        assert isinstance(budget, dict)
        assert budget["spent_micro_usd"] == 120
        assert budget["reserved_micro_usd"] == 0
        # A duplicate id inside a batch is refused alone; the others are unaffected.
        more = [estimate(prompt=10, max_tokens=90) for _ in range(2)]
        again = await asyncio.gather(
            limiter.admit(principal(rpm=5), more[0]),
            limiter.admit(principal(rpm=5), more[0]),
            limiter.admit(principal(rpm=5), more[1]),
            return_exceptions=True,
        )
        assert isinstance(again[0], Admission)
        assert isinstance(again[2], Admission)
        assert isinstance(again[1], ValueError)
    finally:
        await limiter.close()
        await observer.aclose()
