"""LocalLimiter on its own (the shared semantics are in tests/integration/
test_limiter_contract.py, against Redis too): the sliding window against the `limits`
package as an oracle, scopes under random load, budgets that never overshoot, the fast path."""

from __future__ import annotations

import random

import limits.storage.memory as limits_memory
import pytest
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from fleetserve.tenancy.limiter import Admission, Rejection, RejectReason
from fleetserve.tenancy.local_limiter import LocalLimiter
from fleetserve.tenancy.reservations import fit_budget, worst_case_micro_usd
from fleetserve.testing.clock import FakeClock
from tests.unit.limiter_cases import admitted, estimate, principal, rejected


class _OracleTime:
    """What `limits` reads as `time.time()`: the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def time(self) -> float:
        return self.clock.wall()


@pytest.mark.parametrize("seed", range(4))
async def test_sliding_window_agrees_with_the_limits_package(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """limits' moving window is a true sliding log too: both admit the very same requests."""
    clock = FakeClock(start=0.0, wall_start=0.0)
    monkeypatch.setattr(limits_memory, "time", _OracleTime(clock))
    oracle = MovingWindowRateLimiter(MemoryStorage())
    item = RateLimitItemPerMinute(30)
    limiter = LocalLimiter(clock)
    who = principal(rpm=30)
    rng = random.Random(seed)
    agreed = 0
    for _ in range(1500):  # bursts and lulls over several minutes
        await clock.advance(rng.choice([0.0, rng.uniform(0, 0.2), rng.uniform(0, 3.0)]))
        ours = isinstance(limiter.admit_now(who, estimate()), Admission)
        theirs = oracle.hit(item, "acme")
        assert ours == theirs, f"at t={clock.now():.3f}"
        agreed += ours
    assert agreed > 30 * 3  # the test saw several windows fill and empty


@pytest.mark.parametrize("seed", range(3))
async def test_tenant_and_key_scopes_under_random_load(seed: int) -> None:
    """Two keys of one tenant: the tenant's window counts both, each key's its own; no
    window of any scope ever holds more than its limit, and refusals leave no mark."""
    rng = random.Random(seed)
    clock = FakeClock()
    limiter = LocalLimiter(clock)
    keys = {
        "keyAAAAA": principal(key="keyAAAAA", rpm=40, tpm=30_000, key_rpm=25),
        "keyBBBBB": principal(key="keyBBBBB", rpm=40, tpm=30_000, key_tpm=12_000),
    }
    times: dict[str, list[float]] = {"keyAAAAA": [], "keyBBBBB": []}
    tokens: dict[str, list[tuple[float, int]]] = {"keyAAAAA": [], "keyBBBBB": []}
    for _ in range(2500):
        await clock.advance(rng.choice([0.0, 0.05, 0.3, 1.0, 4.0]))
        name = rng.choice(list(keys))
        want = rng.randrange(100, 2000)
        result = limiter.admit_now(keys[name], estimate(prompt=want // 2, max_tokens=want // 2))
        if isinstance(result, Admission):
            times[name].append(clock.now())
            tokens[name].append((clock.now(), result.tokens_reserved))
            await limiter.settle(result, result.tokens_reserved, 0)
    everything = sorted(times["keyAAAAA"] + times["keyBBBBB"])
    every_token = sorted(tokens["keyAAAAA"] + tokens["keyBBBBB"])
    assert max_in_window(everything) <= 40
    assert max_in_window(times["keyAAAAA"]) <= 25
    assert max_token_window(every_token) <= 30_000
    assert max_token_window(tokens["keyBBBBB"]) <= 12_000
    assert len(everything) > 200


def max_in_window(times: list[float], window_s: float = 60.0) -> int:
    """The most admissions any window (t - window_s, t] holds (times sorted)."""
    return max_token_window([(t, 1) for t in times], window_s)


def max_token_window(entries: list[tuple[float, int]], window_s: float = 60.0) -> int:
    """The most tokens any window (t - window_s, t] holds (entries sorted by time)."""
    best = held = first = 0
    for t, n in entries:
        held += n
        while entries[first][0] <= t - window_s:
            held -= entries[first][1]
            first += 1
        best = max(best, held)
    return best


@pytest.mark.parametrize("seed", range(4))
async def test_budget_never_overshoots_with_capped_requests(seed: int) -> None:
    """Random prompts and caps, some without max_tokens (capped to what is left), settled
    at random: spent + reserved never passes the budget, and every settlement at most its
    reservation."""
    rng = random.Random(seed)
    clock = FakeClock()
    limiter = LocalLimiter(clock)
    who = principal(budget_usd=2.0)
    limit = 2_000_000
    in_flight: list[Admission] = []
    for _ in range(1500):
        ask = estimate(
            prompt=rng.randrange(1, 3000),
            max_tokens=rng.randrange(1, 4000),
            given=rng.random() < 0.5,
            input_per_mtok_usd=rng.choice([0.15, 3.0, 10.0]),
            output_per_mtok_usd=rng.choice([0.6, 15.0, 30.0]),
        )
        result = limiter.admit_now(who, ask)
        if isinstance(result, Admission):
            assert result.cost_reserved_micro_usd <= worst_case_micro_usd(ask)
            if result.max_tokens is not None:
                assert not ask.max_tokens_given
                assert 1 <= result.max_tokens < ask.max_tokens
            in_flight.append(result)
        else:
            assert result.reason is RejectReason.BUDGET
        while in_flight and rng.random() < 0.5:
            done = in_flight.pop(rng.randrange(len(in_flight)))
            await limiter.settle(done, 0, rng.randrange(0, 2 * done.cost_reserved_micro_usd + 2))
        budget = limiter.state_now(who)["tenant"]["budget"]  # type: ignore[index]
        assert budget["spent_micro_usd"] + budget["reserved_micro_usd"] <= limit
    for done in in_flight:
        await limiter.settle(done, 0, done.cost_reserved_micro_usd)
    budget = limiter.state_now(who)["tenant"]["budget"]  # type: ignore[index]
    assert limit - 40_000 <= budget["spent_micro_usd"] <= limit  # all but crumbs used


@pytest.mark.parametrize(
    ("left", "given", "expect"),
    [
        pytest.param(1_000_000, True, (1_000, None), id="fits"),
        pytest.param(999, True, None, id="given-does-not-fit"),
        pytest.param(999, False, (999, 899), id="capped"),  # 100 prompt + 899 output
        pytest.param(600, False, (600, 500), id="capped-more"),
        pytest.param(101, False, (101, 1), id="one-token"),
        pytest.param(100, False, None, id="prompt-only"),
        pytest.param(0, False, None, id="nothing-left"),
    ],
)
def test_fit_budget(left: int, given: bool, expect: tuple[int, int | None] | None) -> None:
    # $1 per Mtok in and out: the prompt costs 100, the worst case 1,000 micro-dollars.
    ask = estimate(
        prompt=100, max_tokens=900, given=given, input_per_mtok_usd=1.0, output_per_mtok_usd=1.0
    )
    worst = worst_case_micro_usd(ask)
    assert worst == 1_000
    fit = fit_budget(ask, worst, left)
    assert (None if fit is None else (fit.cost_micro_usd, fit.max_tokens)) == expect


def test_fit_budget_with_awkward_rates() -> None:
    """Rates that are not binary fractions: the capped cost never passes what is left."""
    rng = random.Random(7)
    for _ in range(20_000):
        ask = estimate(
            prompt=rng.randrange(0, 10_000),
            max_tokens=rng.randrange(2, 10_000),
            given=False,
            input_per_mtok_usd=rng.uniform(0.01, 20),
            output_per_mtok_usd=rng.uniform(0.01, 80),
        )
        left = rng.randrange(0, 200_000)
        fit = fit_budget(ask, worst_case_micro_usd(ask), left)
        if fit is not None:
            assert fit.cost_micro_usd <= left
            if fit.max_tokens is not None:  # and one token more would not have fit
                more = (
                    ask.prompt_tokens * ask.input_micro_usd_per_token
                    + (fit.max_tokens + 1) * ask.output_micro_usd_per_token
                )
                assert more > left - 1e-6


async def test_no_limits_no_budget_records_nothing() -> None:
    limiter = LocalLimiter(FakeClock())
    free = principal()
    result = admitted(limiter.admit_now(free, estimate()))
    assert not result.recorded
    assert result.requests is None
    assert result.tokens is None
    assert result.budget_left_micro_usd is None
    # A budget alone does not apply to a free model either.
    budgeted = principal(budget_usd=0.0)
    assert not admitted(limiter.admit_now(budgeted, estimate())).recorded
    priced = estimate(input_per_mtok_usd=1.0)
    assert rejected(limiter.admit_now(budgeted, priced)).reason is RejectReason.BUDGET
    await limiter.settle(result, 10, 0)
    await limiter.renew([result])


async def test_a_request_id_is_admitted_once() -> None:
    limiter = LocalLimiter(FakeClock())
    who = principal(concurrent=5)
    limiter.admit_now(who, estimate("same"))
    with pytest.raises(ValueError, match="already admitted"):
        limiter.admit_now(who, estimate("same"))


async def test_limits_follow_changes() -> None:
    """An admin raises, lowers or lifts a limit: the next admission uses the new value, and
    the history already counted still counts (what goes while a limit is lifted does not)."""
    clock = FakeClock()
    limiter = LocalLimiter(clock)
    for _ in range(3):
        admitted(limiter.admit_now(principal(rpm=3), estimate()))
    assert isinstance(limiter.admit_now(principal(rpm=3), estimate()), Rejection)
    assert isinstance(limiter.admit_now(principal(rpm=4), estimate()), Admission)
    assert isinstance(limiter.admit_now(principal(rpm=2), estimate()), Rejection)
    assert admitted(limiter.admit_now(principal(), estimate())).recorded is False  # lifted
    assert isinstance(limiter.admit_now(principal(rpm=5), estimate()), Admission)  # 4 held
    assert isinstance(limiter.admit_now(principal(rpm=5), estimate()), Rejection)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="lease_ttl_s"):
        LocalLimiter(FakeClock(), lease_ttl_s=0)
    limiter = LocalLimiter(FakeClock())
    with pytest.raises(ValueError, match="no budget"):
        limiter.seed_spend_now(principal().tenant, 0, 10)
    with pytest.raises(ValueError, match="negative"):
        limiter.seed_spend_now(principal(budget_usd=1).tenant, 0, -1)
