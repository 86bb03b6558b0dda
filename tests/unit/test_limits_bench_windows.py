"""The window arithmetic and budget replay of benchmarks/tenancy_limits.py, on hand-made
timelines: its figures are only as right as these."""

from __future__ import annotations

import pytest
from benchmarks._limits_windows import (
    Charge,
    count_at,
    count_range,
    full_share,
    max_window_count,
    replay_budget,
    window_sums,
)

W = 60


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        pytest.param(0, 1, id="an-admission-counts-at-its-own-time"),
        pytest.param(59, 2, id="both-inside"),
        pytest.param(60, 1, id="gone-exactly-one-window-later-as-the-script-trims"),
        pytest.param(-1, 0, id="before-any"),
        pytest.param(130, 0, id="after-all"),
    ],
)
def test_count_at(t: int, expected: int) -> None:
    assert count_at([0, 10, 70], t, W) == expected


def test_max_window_count_looks_at_windows_ending_at_admissions() -> None:
    # 0, 10 and 59 in one window; 60 pushes 0 out.
    assert max_window_count([0, 10, 59, 60, 119], W) == 3
    assert max_window_count([], W) == 0
    assert max_window_count([0, 60, 120], W) == 1


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        pytest.param(20, 30, (2, 2), id="nothing-changes-inside"),
        pytest.param(55, 65, (1, 2), id="an-expiry-then-an-arrival-inside"),
        pytest.param(59, 60, (1, 2), id="expiry-at-the-end"),
        pytest.param(69, 70, (2, 2), id="one-leaves-as-one-arrives"),
    ],
)
def test_count_range(lo: int, hi: int, expected: tuple[int, int]) -> None:
    # Counts: [0,10): 1, [10,60): 2, [60,62): 1, then 2 (at 70 one leaves as one arrives).
    assert count_range([0, 10, 62, 70], lo, hi, W) == expected


def test_full_share_finds_the_dips() -> None:
    # limit 2: full from 10 until 60 (0 leaves), again from 62 (arrival) until 70 (10 leaves),
    # again at 75.
    share = full_share([0, 10, 62, 75], 10, 100, W, limit=2)
    assert share.gaps == 2
    assert share.longest_gap_us == 5  # 70..75
    assert share.full_frac == pytest.approx((50 + 8 + 25) / 90)
    assert share.lowest == 1


def test_window_sums() -> None:
    assert window_sums([0, 10, 60, 61], [5, 7, 1, 2], W) == [5, 12, 8, 10]


def _charge(rid: str, at: int, settled: int | None, cost: int, after: int | None = None) -> Charge:
    return Charge(rid, at, settled, at if after is None else after, 100, cost)


def test_budget_replay_admits_into_room_freed_by_settlements() -> None:
    # Budget 200: two worst cases fill it; each settles at 40, freeing 60 each: room for one
    # more (spent 80 + 100 <= 200) at 30, not for a second in flight (80 + 200 > 200).
    charges = [_charge("a", 0, 20, 40), _charge("b", 1, 21, 40), _charge("c", 30, 50, 40)]
    verdict = replay_budget(charges, 200)
    assert (verdict.explained, verdict.within_resolution, verdict.unexplained) == (3, 0, [])
    over = [*charges, _charge("d", 31, 60, 40)]
    assert replay_budget(over, 200).unexplained == ["d"]


def test_budget_replay_counts_a_bracketing_settlement_only_leniently() -> None:
    # b's settlement happened between 25 (still held) and 35 (gone): c at 30 may have seen it.
    charges = [_charge("a", 0, 20, 40), _charge("b", 1, 35, 40, after=25), _charge("c", 30, 50, 40)]
    verdict = replay_budget(charges, 220)
    assert (verdict.explained, verdict.within_resolution, verdict.unexplained) == (2, 1, [])
    late = [*charges[:2], _charge("c", 24, 50, 40)]
    assert replay_budget(late, 220).unexplained == ["c"]
