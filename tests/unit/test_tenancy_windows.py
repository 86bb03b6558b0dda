"""The limit counters: every sliding window within its limit, reservations settled, leases
that expire, budgets that never overshoot; checked against brute force on random loads."""

from __future__ import annotations

import random

import pytest

from fleetserve.tenancy.windows import Budget, Leases, RequestLog, TokenLog


def windows_hold(times: list[float], limit: int, window_s: float) -> bool:
    """Brute force: no window (t - window_s, t] over any admission time holds more than limit."""
    return all(sum(1 for u in times if t - window_s < u <= t) <= limit for t in times)


@pytest.mark.parametrize("seed", range(5))
def test_request_log_is_a_true_sliding_window(seed: int) -> None:
    rng = random.Random(seed)
    log = RequestLog(limit=60, window_s=60.0)
    admitted: list[float] = []
    now = 0.0
    for _ in range(3000):  # bursts and lulls over ~5 minutes
        now += rng.choice([0.0, 0.01, 0.1, 0.5, 2.0])
        verdict = log.admit(now)
        if verdict.admitted:
            admitted.append(now)
        else:
            assert verdict.remaining == 0
            assert 0 < verdict.reset_s <= 60.0
    assert windows_hold(admitted, 60, 60.0)


def test_request_log_admits_exactly_the_limit_under_excess_demand() -> None:
    log = RequestLog(limit=60, window_s=60.0)
    step = 0.125  # 8 req/s, in binary fractions so that window edges are exact
    admitted = [i * step for i in range(6000) if log.admit(i * step).admitted]
    assert len(admitted) == 13 * 60  # 750 s: 60 in each window that starts a minute
    for start in range(0, 690, 7):  # every window full once demand exceeds the limit
        assert sum(1 for t in admitted if start < t <= start + 60) == 60


def test_a_refused_request_takes_nothing() -> None:
    log = RequestLog(limit=1, window_s=60.0)
    assert log.admit(0.0).admitted
    for t in range(1, 60):
        assert not log.admit(float(t)).admitted
    verdict = log.admit(60.0)
    assert verdict.admitted  # the window moved past the one admission; refusals left no mark


@pytest.mark.parametrize("seed", range(5))
def test_token_log_holds_reservations_and_settles_them(seed: int) -> None:
    rng = random.Random(seed)
    log = TokenLog(limit=10_000, window_s=60.0)
    pending: dict[str, tuple[float, int]] = {}  # reserved, not settled: (at, reserved)
    settled: list[tuple[float, int]] = []  # (at, used)
    now = 0.0
    for i in range(2000):
        now += rng.choice([0.0, 0.25, 0.5, 3.0])
        rid = f"r{i}"
        reserve = rng.randrange(100, 2000)
        if log.reserve(rid, reserve, now).admitted:
            pending[rid] = (now, reserve)
        if pending and rng.random() < 0.5:  # some request finishes, usually under its reserve
            done = rng.choice(list(pending))
            at, reserved = pending.pop(done)
            used = rng.randrange(0, reserved + 1)
            log.settle(done, used, now)
            settled.append((at, used))
        held = [*pending.values(), *settled]
        in_window = sum(t for at, t in held if at > now - 60.0)
        assert log.used(now) == in_window <= 10_000


def test_token_log_refuses_what_does_not_fit_and_says_when_it_will() -> None:
    log = TokenLog(limit=1000, window_s=60.0)
    assert log.reserve("a", 600, 0.0).admitted
    assert log.reserve("b", 300, 10.0).admitted
    refused = log.reserve("c", 500, 20.0)
    assert not refused.admitted
    assert refused.remaining == 100
    assert refused.reset_s == pytest.approx(40.0)  # a leaves the window at 60 s
    log.settle("a", 100, 30.0)  # a used 100 of its 600
    assert log.reserve("c", 500, 30.0).admitted


def test_leases_expire_unless_renewed() -> None:
    leases = Leases(limit=2, ttl_s=30.0)
    assert leases.acquire("a", 0.0).admitted
    assert leases.acquire("b", 0.0).admitted
    refused = leases.acquire("c", 10.0)
    assert not refused.admitted
    assert refused.reset_s == pytest.approx(20.0)
    assert leases.renew("a", 20.0)  # a's holder is alive; b's died silently
    assert leases.held(31.0) == 1  # b expired at 30 s
    assert leases.acquire("c", 31.0).admitted
    assert not leases.renew("b", 31.0)  # lost
    leases.release("a")
    assert leases.held(31.0) == 1


@pytest.mark.parametrize("seed", range(5))
def test_budget_never_overshoots(seed: int) -> None:
    """1,000 requests of at most $0.10 against $5: spend never passes it, however they
    interleave, and once nothing is left nothing more is admitted."""
    rng = random.Random(seed)
    budget = Budget(5 * 1_000_000)
    in_flight: dict[str, int] = {}
    admitted_after_empty = 0
    for i in range(1000):
        worst = 100_000
        verdict = budget.reserve(f"r{i}", worst)
        if verdict.admitted:
            if budget.spent >= budget.limit:
                admitted_after_empty += 1
            in_flight[f"r{i}"] = worst
        while in_flight and rng.random() < 0.6:
            rid = rng.choice(list(in_flight))
            budget.settle(rid, rng.randrange(0, in_flight.pop(rid) + 1))
        assert budget.committed <= budget.limit
    for rid, worst in in_flight.items():
        budget.settle(rid, worst)
    assert budget.spent <= 5 * 1_000_000
    assert admitted_after_empty == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="limit"):
        RequestLog(0)
    log = TokenLog(10)
    log.reserve("x", 1, 0.0)
    with pytest.raises(ValueError, match="already holds"):
        log.reserve("x", 1, 0.0)
    with pytest.raises(ValueError, match="negative"):
        Budget(-1)
