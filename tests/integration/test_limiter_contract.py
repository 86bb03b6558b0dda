"""The Limiter contract: LocalLimiter and RedisLimiter (the real Redis, a random key prefix)
pass the same cases on one fake clock (the Redis scripts then take its time instead of the
server's TIME, a test-only argument), and agree request by request on random traffic.
tests/integration/test_redis_limiter.py covers what only Redis has: the server's own clock,
concurrency across clients, crashed holders, EVAL without SCRIPT."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from fleetserve.tenancy.limiter import Admission, Estimate, Limiter, Rejection, RejectReason
from fleetserve.tenancy.local_limiter import LocalLimiter
from fleetserve.tenancy.model import BudgetPeriod, Principal
from fleetserve.tenancy.periods import period_of
from fleetserve.tenancy.redis_limiter import RedisLimiter, connect
from fleetserve.tenancy.shared_limiter import SharedLimiter
from fleetserve.testing.clock import FakeClock
from tests.integration.redis_support import REDIS_URL, isolated_prefix, keys_under
from tests.unit.limiter_cases import admitted, estimate, principal, rejected

pytestmark = pytest.mark.integration
TTL_S = 15.0
MARCH_14 = datetime(2026, 3, 14, 12, 0, tzinfo=UTC).timestamp()


# $10 / $30 per million tokens: a 10-token prompt costs 100 micro-dollars, the default 90
# output tokens 2,700.
def priced(
    request_id: str | None = None, *, prompt: int = 10, max_tokens: int = 90, given: bool = True
) -> Estimate:
    return estimate(
        request_id,
        prompt=prompt,
        max_tokens=max_tokens,
        given=given,
        input_per_mtok_usd=10.0,
        output_per_mtok_usd=30.0,
    )


@dataclass
class Subject:
    limiter: LocalLimiter | RedisLimiter
    clock: FakeClock
    prefix: str | None = None  # Redis only

    async def state(self, who: Principal) -> dict[str, Any]:
        return await self.limiter.state(who)

    async def used(self, who: Principal, scope: str, counter: str) -> int:
        state = await self.state(who)
        return int(state[scope][counter]["used"])

    async def budget(self, who: Principal) -> dict[str, Any]:
        state = await self.state(who)
        return dict(state["tenant"]["budget"])


Make = Callable[..., Awaitable[Subject]]


async def _local(wall_start: float, lease_ttl_s: float) -> Subject:
    clock = FakeClock(wall_start=wall_start)
    return Subject(LocalLimiter(clock, lease_ttl_s=lease_ttl_s), clock)


@pytest.fixture(params=["local", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Builds the limiter under test on a fresh fake clock (starting at `wall_start`)."""
    made: list[Subject] = []
    if request.param == "local":

        async def build(wall_start: float = MARCH_14, lease_ttl_s: float = TTL_S) -> Subject:
            subject = await _local(wall_start, lease_ttl_s)
            made.append(subject)
            return subject

        yield build
        return
    async with isolated_prefix() as prefix:

        async def build_redis(wall_start: float = MARCH_14, lease_ttl_s: float = TTL_S) -> Subject:
            clock = FakeClock(wall_start=wall_start)
            limiter = RedisLimiter(
                connect(REDIS_URL),
                prefix=f"{prefix}:{len(made)}",
                lease_ttl_s=lease_ttl_s,
                owns_client=True,
                test_clock=clock,
            )
            subject = Subject(limiter, clock, f"{prefix}:{len(made)}")
            made.append(subject)
            return subject

        try:
            yield build_redis
        finally:
            for subject in made:
                await subject.limiter.close()


async def test_every_limiter_keeps_the_protocol() -> None:
    redis = RedisLimiter.from_url(REDIS_URL)
    local = LocalLimiter()
    limiters: list[Limiter] = [local, redis, SharedLimiter(redis, local)]
    await limiters[2].close()  # and the two it wraps


async def test_no_limits_and_no_budget_cost_nothing(make: Make) -> None:
    s = await make()
    free = principal()
    result = admitted(await s.limiter.admit(free, priced()))
    assert not result.recorded
    assert (result.requests, result.tokens, result.budget_left_micro_usd) == (None, None, None)
    # A budget does not apply to a free model: nothing to count either.
    budgeted = principal(budget_usd=1.0)
    assert not admitted(await s.limiter.admit(budgeted, estimate())).recorded
    await s.limiter.settle(result, 100, 0)
    await s.limiter.renew([result])
    if s.prefix is not None:
        assert await keys_under(s.prefix) == []  # no script ran


@pytest.mark.parametrize(
    "who",
    [
        pytest.param(principal(rpm=5), id="rpm"),
        pytest.param(principal(key_tpm=5000), id="tpm"),
        pytest.param(principal(concurrent=5), id="leases"),
    ],
)
async def test_a_request_id_is_admitted_once(make: Make, who: Principal) -> None:
    s = await make()
    admitted(await s.limiter.admit(who, estimate("same")))
    with pytest.raises(ValueError, match="already admitted"):
        await s.limiter.admit(who, estimate("same"))
    budgeted = principal(tenant="payer", budget_usd=1.0)
    admitted(await s.limiter.admit(budgeted, priced("paid")))
    with pytest.raises(ValueError, match="already admitted"):
        await s.limiter.admit(budgeted, priced("paid"))


async def test_rpm_is_a_sliding_window(make: Make) -> None:
    s = await make()
    who = principal(rpm=3)
    for at in (0.0, 10.0, 20.0):
        await s.clock.advance(at - s.clock.now())
        result = admitted(await s.limiter.admit(who, estimate()))
    assert result.requests is not None
    assert result.requests.limit == 3
    assert result.requests.remaining == 0
    assert result.requests.reset_s == pytest.approx(40.0)  # the first leaves at 60 s
    await s.clock.advance(10.0)
    refused = rejected(await s.limiter.admit(who, estimate()))
    assert (refused.reason, refused.scope) == (RejectReason.RPM, "tenant")
    assert refused.retry_after_s == pytest.approx(30.0)
    await s.clock.advance(29.75)  # 59.75 s: the first is still inside
    assert rejected(await s.limiter.admit(who, estimate())).retry_after_s == pytest.approx(0.25)
    await s.clock.advance(0.25)  # 60 s: it has left; the refusals took nothing
    after = admitted(await s.limiter.admit(who, estimate()))
    assert after.requests is not None
    assert after.requests.remaining == 0
    assert after.requests.reset_s == pytest.approx(10.0)  # the one of 10 s leaves at 70 s
    assert await s.used(who, "tenant", "rpm") == 3


async def test_the_tenant_counts_every_key_and_a_key_its_own(make: Make) -> None:
    s = await make()
    a = principal(key="keyAAAAA", rpm=5, key_rpm=2)
    b = principal(key="keyBBBBB", rpm=5)
    for _ in range(2):
        admitted(await s.limiter.admit(a, estimate()))
    refused = rejected(await s.limiter.admit(a, estimate()))
    assert (refused.reason, refused.scope) == (RejectReason.RPM, "key")
    assert refused.requests is not None
    assert refused.requests.limit == 2  # the tightest scope is the key's
    for _ in range(3):
        admitted(await s.limiter.admit(b, estimate()))
    refused = rejected(await s.limiter.admit(b, estimate()))
    assert (refused.reason, refused.scope) == (RejectReason.RPM, "tenant")
    assert await s.used(a, "tenant", "rpm") == 5
    assert await s.used(a, "key", "rpm") == 2


async def test_a_rejection_records_nothing_anywhere(make: Make) -> None:
    """Only the key's TPM refuses, the last check but the budget's: the tenant's RPM, TPM,
    leases and budget, and the key's RPM and leases, hold nothing of it."""
    s = await make()
    who = principal(
        rpm=10, tpm=10_000, concurrent=5, key_rpm=10, key_tpm=150, key_concurrent=5,
        budget_usd=1.0,
    )  # fmt: skip
    refused = rejected(await s.limiter.admit(who, priced(prompt=100, max_tokens=100)))
    assert (refused.reason, refused.scope) == (RejectReason.TPM, "key")
    state = await s.state(who)
    for scope in ("tenant", "key"):
        assert {name: state[scope][name]["used"] for name in ("rpm", "tpm", "concurrent")} == {
            "rpm": 0,
            "tpm": 0,
            "concurrent": 0,
        }
    assert state["tenant"]["budget"]["reserved_micro_usd"] == 0
    # The budget refuses last: everything else had room, and still took nothing.
    broke = principal(rpm=10, tpm=10_000, concurrent=5, budget_usd=0.001)
    refused = rejected(await s.limiter.admit(broke, priced()))
    assert refused.reason is RejectReason.BUDGET
    state = await s.state(broke)
    assert [state["tenant"][n]["used"] for n in ("rpm", "tpm", "concurrent")] == [0, 0, 0]
    # An RPM refusal is reported before a budget one.
    full = principal(rpm=1, budget_usd=0.001)
    admitted(await s.limiter.admit(full, estimate()))  # free: no budget needed
    assert rejected(await s.limiter.admit(full, priced())).reason is RejectReason.RPM


async def test_tpm_reserves_then_settles_to_what_was_used(make: Make) -> None:
    s = await make()
    who = principal(tpm=1000)
    first = admitted(await s.limiter.admit(who, estimate(prompt=100, max_tokens=500)))
    assert first.tokens_reserved == 600
    assert first.tokens is not None
    assert (first.tokens.limit, first.tokens.remaining) == (1000, 400)
    await s.clock.advance(10.0)
    admitted(await s.limiter.admit(who, estimate(prompt=100, max_tokens=200)))
    await s.clock.advance(10.0)
    refused = rejected(await s.limiter.admit(who, estimate(prompt=100, max_tokens=400)))
    assert (refused.reason, refused.scope) == (RejectReason.TPM, "tenant")
    assert refused.tokens is not None
    assert refused.tokens.remaining == 100
    assert refused.retry_after_s == pytest.approx(40.0)  # the first 600 leave at 60 s
    await s.clock.advance(10.0)
    await s.limiter.settle(first, 100, 0)  # it used 100 of its 600
    assert await s.used(who, "tenant", "tpm") == 400
    admitted(await s.limiter.admit(who, estimate(prompt=100, max_tokens=400)))
    assert await s.used(who, "tenant", "tpm") == 900
    await s.clock.advance(30.0)  # 60 s: the first (settled at 100) leaves the window
    assert await s.used(who, "tenant", "tpm") == 800
    # More than the limit never fits: the whole window as Retry-After.
    assert rejected(
        await s.limiter.admit(who, estimate(prompt=1000, max_tokens=1))
    ).retry_after_s == pytest.approx(60.0)


async def test_a_settlement_after_the_window_changes_nothing(make: Make) -> None:
    s = await make()
    who = principal(tpm=1000)
    old = admitted(await s.limiter.admit(who, estimate(prompt=500, max_tokens=500)))
    await s.clock.advance(61.0)
    admitted(await s.limiter.admit(who, estimate(prompt=500, max_tokens=500)))
    await s.limiter.settle(old, 10, 0)  # long stream: its reservation had already left
    assert await s.used(who, "tenant", "tpm") == 1000


async def test_leases_expire_unless_renewed_and_settle_releases(make: Make) -> None:
    s = await make()
    who = principal(concurrent=2)
    a = admitted(await s.limiter.admit(who, estimate("a")))
    admitted(await s.limiter.admit(who, estimate("b")))
    await s.clock.advance(5.0)
    refused = rejected(await s.limiter.admit(who, estimate("c")))
    assert (refused.reason, refused.scope) == (RejectReason.CONCURRENCY, "tenant")
    assert refused.retry_after_s == pytest.approx(1.0)  # soonest expiry is 10 s off: capped
    await s.clock.advance(5.0)
    await s.limiter.renew([a])  # a's holder is alive; b's went silent
    await s.clock.advance(4.5)
    assert rejected(await s.limiter.admit(who, estimate("c"))).retry_after_s == pytest.approx(0.5)
    await s.clock.advance(0.5)  # 15 s: b's lease expired
    assert await s.used(who, "tenant", "concurrent") == 1
    admitted(await s.limiter.admit(who, estimate("c")))
    rejected(await s.limiter.admit(who, estimate("d")))
    await s.limiter.settle(a, 0, 0)
    admitted(await s.limiter.admit(who, estimate("d")))
    await s.clock.advance(TTL_S)  # nobody renews c and d
    assert await s.used(who, "tenant", "concurrent") == 0


async def test_key_leases_are_the_keys_own(make: Make) -> None:
    s = await make()
    a = principal(key="keyAAAAA", concurrent=3, key_concurrent=1)
    b = principal(key="keyBBBBB", concurrent=3)
    first = admitted(await s.limiter.admit(a, estimate()))
    assert rejected(await s.limiter.admit(a, estimate())).scope == "key"
    admitted(await s.limiter.admit(b, estimate()))
    admitted(await s.limiter.admit(b, estimate()))
    assert rejected(await s.limiter.admit(b, estimate())).scope == "tenant"
    await s.limiter.settle(first, 0, 0)
    admitted(await s.limiter.admit(b, estimate()))
    assert await s.used(a, "key", "concurrent") == 0


async def test_budget_reserves_the_worst_case_and_settles_to_the_cost(make: Make) -> None:
    s = await make()
    who = principal(budget_usd=0.01)  # 10,000 micro-dollars
    one = admitted(await s.limiter.admit(who, priced()))
    assert one.cost_reserved_micro_usd == 2800  # 10 prompt + 90 output tokens
    assert one.budget_left_micro_usd == 7200
    two = admitted(await s.limiter.admit(who, priced()))
    three = admitted(await s.limiter.admit(who, priced()))
    assert three.budget_left_micro_usd == 1600
    refused = rejected(await s.limiter.admit(who, priced()))
    assert refused.reason is RejectReason.BUDGET
    assert refused.retry_after_s == pytest.approx(1.0)  # in-flight reservations may free it
    await s.limiter.settle(one, 40, 1300)
    await s.limiter.settle(two, 0, 10**9)  # never more than the reservation
    budget = await s.budget(who)
    assert (budget["spent_micro_usd"], budget["reserved_micro_usd"]) == (4100, 2800)
    assert budget["left_micro_usd"] == 3100
    assert budget["limit_micro_usd"] == 10_000
    period = period_of(BudgetPeriod.MONTH, MARCH_14)
    assert (budget["period"], budget["period_start"]) == ("month", period.start_s)
    assert budget["period_end"] == period.end_s


async def test_budget_caps_max_tokens_when_the_client_gave_none(make: Make) -> None:
    s = await make()
    who = principal(tpm=100_000, budget_usd=0.0021)  # 2,100 micro-dollars
    capped = admitted(await s.limiter.admit(who, priced(given=False)))
    assert capped.max_tokens == 66  # (2,100 - 100) / 30
    assert capped.cost_reserved_micro_usd == 2080
    assert capped.tokens_reserved == 76  # TPM reserves the capped request
    assert await s.used(who, "tenant", "tpm") == 76
    assert capped.budget_left_micro_usd == 20
    refused = rejected(await s.limiter.admit(who, priced(given=False)))
    assert refused.reason is RejectReason.BUDGET  # 20 left cannot pay the prompt
    await s.limiter.settle(capped, 30, 700)
    # A client that set max_tokens is refused rather than capped.
    given = rejected(await s.limiter.admit(who, priced(given=True)))
    assert given.reason is RejectReason.BUDGET
    again = admitted(await s.limiter.admit(who, priced(given=False)))
    assert again.max_tokens == 43  # (1,400 - 100) / 30


async def test_a_free_model_goes_whatever_the_budget(make: Make) -> None:
    s = await make()
    who = principal(rpm=100, budget_usd=0.001)
    admitted(await s.limiter.admit(who, priced(prompt=1, max_tokens=30)))
    assert rejected(await s.limiter.admit(who, priced())).reason is RejectReason.BUDGET
    free = admitted(await s.limiter.admit(who, estimate()))
    assert free.cost_reserved_micro_usd == 0


@pytest.mark.parametrize(
    ("period", "wall_start", "retry_s"),
    [
        pytest.param("day", "2026-03-14T23:59:00", 60.0, id="day"),
        pytest.param("week", "2026-03-15T23:58:00", 120.0, id="week"),  # a Sunday
        pytest.param("month", "2028-02-29T23:59:30", 30.0, id="month-leap"),
        pytest.param("month", "2026-12-31T23:59:00", 60.0, id="month-new-year"),
    ],
)
async def test_a_spent_budget_waits_for_the_next_period(
    make: Make, period: str, wall_start: str, retry_s: float
) -> None:
    start = datetime.fromisoformat(wall_start).replace(tzinfo=UTC).timestamp()
    s = await make(wall_start=start)
    who = principal(budget_usd=0.003, period=BudgetPeriod(period))
    done = admitted(await s.limiter.admit(who, priced(max_tokens=90)))
    await s.limiter.settle(done, 100, 2800)
    refused = rejected(await s.limiter.admit(who, priced(max_tokens=90)))
    assert refused.reason is RejectReason.BUDGET
    assert refused.retry_after_s == pytest.approx(retry_s)
    await s.clock.advance(retry_s)  # the new period starts with nothing spent
    fresh = admitted(await s.limiter.admit(who, priced(max_tokens=90)))
    assert fresh.budget_left_micro_usd == 200
    budget = await s.budget(who)
    assert budget["period_start"] == start + retry_s
    assert budget["spent_micro_usd"] == 0


async def test_a_spent_total_budget_says_retry_much_later(make: Make) -> None:
    s = await make()
    who = principal(budget_usd=0.002, period=BudgetPeriod.TOTAL)
    done = admitted(await s.limiter.admit(who, priced(max_tokens=30)))
    await s.limiter.settle(done, 0, 1000)
    refused = rejected(await s.limiter.admit(who, priced(max_tokens=60)))
    assert refused.retry_after_s == pytest.approx(86_400.0)
    assert (await s.budget(who))["period_end"] is None


async def test_an_unsettled_reservation_expires_into_spend(make: Make) -> None:
    """A gateway that died never settles: after the lease TTL its reservation counts as
    spent at its worst case (never freed: the request may have used it all). Renewed,
    it stays a reservation."""
    s = await make()
    who = principal(budget_usd=0.01)
    lost = admitted(await s.limiter.admit(who, priced()))
    alive = admitted(await s.limiter.admit(who, priced()))
    await s.clock.advance(TTL_S - 1)
    await s.limiter.renew([alive])
    await s.clock.advance(1.0)
    budget = await s.budget(who)
    assert (budget["spent_micro_usd"], budget["reserved_micro_usd"]) == (2800, 2800)
    await s.limiter.settle(lost, 10, 200)  # too late: it already counted at its worst
    await s.limiter.settle(alive, 10, 200)
    budget = await s.budget(who)
    assert (budget["spent_micro_usd"], budget["reserved_micro_usd"]) == (3000, 0)


async def test_seed_spend_sets_a_missing_counter_only(make: Make) -> None:
    s = await make()
    who = principal(budget_usd=0.01, period=BudgetPeriod.DAY)
    today = period_of(BudgetPeriod.DAY, MARCH_14).start_s
    assert await s.limiter.seed_spend(who.tenant, today, 9000)
    assert not await s.limiter.seed_spend(who.tenant, today, 1)  # SET NX: it exists now
    assert (await s.budget(who))["spent_micro_usd"] == 9000
    refused = rejected(await s.limiter.admit(who, priced()))
    assert refused.reason is RejectReason.BUDGET
    capped = admitted(await s.limiter.admit(who, priced(given=False)))
    assert capped.max_tokens == 30  # (1,000 - 100) / 30
    # Yesterday's counter is another one.
    assert await s.limiter.seed_spend(who.tenant, today - 86_400, 5)


async def test_the_tightest_scope_fills_the_headers(make: Make) -> None:
    s = await make()
    who = principal(rpm=10, tpm=5000, key_rpm=3, key_tpm=100_000)
    result = admitted(await s.limiter.admit(who, estimate(prompt=1000, max_tokens=1000)))
    assert result.requests is not None
    assert result.tokens is not None
    assert (result.requests.limit, result.requests.remaining) == (3, 2)
    assert (result.tokens.limit, result.tokens.remaining) == (5000, 3000)
    admitted(await s.limiter.admit(who, estimate(prompt=1000, max_tokens=1000)))
    await s.clock.advance(1.0)
    full = admitted(await s.limiter.admit(who, estimate(prompt=500, max_tokens=500)))
    assert full.tokens is not None
    assert full.tokens.remaining == 0
    assert full.tokens.reset_s == pytest.approx(59.0)
    assert full.requests is not None
    assert full.requests.remaining == 0
    assert full.requests.reset_s == pytest.approx(59.0)


async def test_state_lists_every_counter_with_a_limit(make: Make) -> None:
    s = await make()
    who = principal(rpm=10, concurrent=4, key_tpm=900, budget_usd=1.0)
    admitted(await s.limiter.admit(who, priced(prompt=20, max_tokens=80)))
    state = await s.state(who)
    assert state["tenant"]["name"] == "acme"
    assert state["tenant"]["rpm"] == {"used": 1, "limit": 10}
    assert state["tenant"]["concurrent"] == {"used": 1, "limit": 4}
    assert "tpm" not in state["tenant"]
    assert state["key"] == {"prefix": "key00001", "tpm": {"used": 100, "limit": 900}}
    assert state["tenant"]["budget"]["reserved_micro_usd"] == 2600


async def test_local_and_redis_agree_on_random_traffic() -> None:
    """The same random requests, settlements and renewals through both limiters on two
    fake clocks in step: every answer is the same, to the micro-second and micro-dollar."""
    async with isolated_prefix() as prefix:
        local = await _local(MARCH_14, 5.0)
        clock = FakeClock(wall_start=MARCH_14)
        shared = RedisLimiter(
            connect(REDIS_URL), prefix=prefix, lease_ttl_s=5.0, owns_client=True, test_clock=clock
        )
        try:
            await _drive_both(local, Subject(shared, clock), random.Random(11))
        finally:
            await shared.close()


async def _drive_both(local: Subject, shared: Subject, rng: random.Random) -> None:
    who = [
        principal(key="keyAAAAA", rpm=24, tpm=16_000, concurrent=5, key_rpm=14,
                  budget_usd=3.0, period=BudgetPeriod.DAY),
        principal(key="keyBBBBB", rpm=24, tpm=16_000, concurrent=5, key_tpm=9_000,
                  key_concurrent=3, budget_usd=3.0, period=BudgetPeriod.DAY),
    ]  # fmt: skip
    running: list[tuple[Admission, Admission]] = []
    seen: set[str] = set()
    for i in range(800):
        step = rng.choice([0.0, 0.0, 0.125, 0.5, 2.0, 6.0])
        await local.clock.advance(step)
        await shared.clock.advance(step)
        ask = estimate(
            f"r{i}",
            prompt=rng.randrange(1, 1000),
            max_tokens=rng.randrange(1, 1000),
            given=rng.random() < 0.5,
            input_per_mtok_usd=rng.choice([0.0, 3.0]),
            output_per_mtok_usd=rng.choice([0.0, 15.0, 60.0]),
        )
        p = rng.choice(who)
        mine = await local.limiter.admit(p, ask)
        theirs = await shared.limiter.admit(p, ask)
        assert _same(mine, theirs), (i, mine, theirs)
        if isinstance(mine, Rejection):
            seen.add(f"{mine.reason}-{mine.scope}")
        elif mine.max_tokens is not None:
            seen.add("capped")
        if isinstance(mine, Admission) and isinstance(theirs, Admission):
            running.append((mine, theirs))
        if running and rng.random() < 0.3:
            await local.limiter.renew([m for m, _ in running])
            await shared.limiter.renew([t for _, t in running])
        while running and rng.random() < 0.25:
            m, t = running.pop(rng.randrange(len(running)))
            used = rng.randrange(0, m.tokens_reserved + 1)
            cost = rng.randrange(0, m.cost_reserved_micro_usd + 2)
            await local.limiter.settle(m, used, cost)
            await shared.limiter.settle(t, used, cost)
    for p in who:
        assert await local.state(p) == await shared.state(p)
    # Every way to answer came up.
    assert seen == {
        "rpm-tenant", "rpm-key", "tpm-tenant", "tpm-key", "concurrency-tenant",
        "concurrency-key", "budget-tenant", "capped",
    }  # fmt: skip


def _same(a: Admission | Rejection, b: Admission | Rejection) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, Rejection) and isinstance(b, Rejection):
        return (
            (a.reason, a.scope) == (b.reason, b.scope)
            and a.retry_after_s == pytest.approx(b.retry_after_s, abs=1e-6)
            and _same_quota(a.requests, b.requests)
            and _same_quota(a.tokens, b.tokens)
        )
    assert isinstance(a, Admission)
    assert isinstance(b, Admission)
    return (
        (a.tokens_reserved, a.cost_reserved_micro_usd, a.max_tokens, a.budget_left_micro_usd)
        == (b.tokens_reserved, b.cost_reserved_micro_usd, b.max_tokens, b.budget_left_micro_usd)
        and _same_quota(a.requests, b.requests)
        and _same_quota(a.tokens, b.tokens)
        and a.recorded == b.recorded
    )


def _same_quota(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    return bool(
        a.limit == b.limit  # type: ignore[attr-defined]
        and a.remaining == b.remaining  # type: ignore[attr-defined]
        and a.reset_s == pytest.approx(b.reset_s, abs=1e-6)  # type: ignore[attr-defined]
    )
