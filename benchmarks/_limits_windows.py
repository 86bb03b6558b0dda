"""Pure arithmetic of benchmarks/tenancy_limits.py: sliding windows over admission times, and
the replay of a budget's reservations and settlements.

Times are integer microseconds on one clock (the Redis server's TIME, which on this machine
is the same clock as `time.time()`). A sliding window of `window_us` ending at `t` holds the
admissions `a` with `t - window_us < a <= t`, as lua/admit.lua trims it (`ZREMRANGEBYSCORE
-inf now-window`).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass


def count_at(times: Sequence[int], t: int, window_us: int) -> int:
    """Admissions in the window ending at `t` (`times` sorted)."""
    return bisect.bisect_right(times, t) - bisect.bisect_right(times, t - window_us)


def max_window_count(times: Sequence[int], window_us: int) -> int:
    """The most admissions any window holds (a window holds the most when it ends at an
    admission, so those are the only windows to look at)."""
    return max((count_at(times, t, window_us) for t in times), default=0)


def count_range(times: Sequence[int], lo: int, hi: int, window_us: int) -> tuple[int, int]:
    """(min, max) of `count_at(t)` over every `t` in [lo, hi]: the count only changes at an
    admission (up) or at an admission + window (down), so it is enough to look at `lo` and at
    those points inside (lo, hi]."""
    points = [lo, hi]
    points += times[bisect.bisect_right(times, lo) : bisect.bisect_right(times, hi)]
    gone = [
        t + window_us
        for t in times[
            bisect.bisect_right(times, lo - window_us) : bisect.bisect_right(times, hi - window_us)
        ]
    ]
    counts = [count_at(times, p, window_us) for p in [*points, *gone]]
    return min(counts), max(counts)


@dataclass(frozen=True, slots=True)
class FullShare:
    full_frac: float  # of [start, end], the share of time the window held `limit`
    longest_gap_us: int  # the longest stretch below it
    gaps: int  # how many stretches below it
    lowest: int  # the fewest admissions the window held


def full_share(times: Sequence[int], start: int, end: int, window_us: int, limit: int) -> FullShare:
    """How much of [start, end] the window spent at `limit` admissions (a sweep over the
    points where the count changes)."""
    if end <= start:
        return FullShare(0.0, 0, 0, count_at(times, start, window_us))
    ups = times[bisect.bisect_right(times, start) : bisect.bisect_right(times, end)]
    downs = [
        t + window_us
        for t in times[
            bisect.bisect_right(times, start - window_us) : bisect.bisect_right(
                times, end - window_us
            )
        ]
    ]
    edges = sorted({start, *ups, *downs, end})
    full = 0
    gap = longest = gaps = 0
    lowest = limit
    for left, right in itertools.pairwise(edges):
        held = count_at(times, left, window_us)
        lowest = min(lowest, held)
        if held >= limit:
            full += right - left
            if gap:
                longest, gap = max(longest, gap), 0
        else:
            if gap == 0:
                gaps += 1
            gap += right - left
    longest = max(longest, gap)
    return FullShare(full / (end - start), longest, gaps, lowest)


def window_sums(times: Sequence[int], weights: Sequence[int], window_us: int) -> list[int]:
    """The summed weight of the window ending at each admission (`times` sorted, `weights`
    in the same order)."""
    prefix = [0, *itertools.accumulate(weights)]
    out = []
    for i, t in enumerate(times):
        first = bisect.bisect_right(times, t - window_us)
        out.append(prefix[i + 1] - prefix[first])
    return out


# --- the budget replay ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Charge:
    """One admitted request of a budgeted tenant."""

    request_id: str
    admitted_us: int  # when the limiter reserved its worst case
    settled_by_us: int | None  # the settlement happened at or before this (None: never seen)
    settled_after_us: int | None  # ... and after this (the last time it was seen held)
    worst_micro_usd: int
    cost_micro_usd: int | None  # what it was settled to (None: unknown)


@dataclass(frozen=True, slots=True)
class BudgetVerdict:
    admitted: int
    explained: int  # fit the budget counting only settlements certainly before them
    within_resolution: int  # fit only counting settlements that may have come before them
    unexplained: list[str]  # request ids that did not fit either way


def replay_budget(charges: Sequence[Charge], budget_micro_usd: int) -> BudgetVerdict:
    """Whether every admission fitted the budget when it was made: spent (settled costs) plus
    held (worst cases of those not yet settled) plus its own worst case <= the budget. A
    settlement known to be over by the admission frees `worst - cost`; one whose time
    brackets the admission is counted only for the lenient verdict."""
    order = sorted(charges, key=lambda c: c.admitted_us)
    explained = lenient = 0
    unexplained: list[str] = []
    for i, charge in enumerate(order):
        t = charge.admitted_us
        committed = freed_sure = freed_maybe = 0
        for other in order[: i + 1]:
            committed += other.worst_micro_usd
            if other is charge or other.cost_micro_usd is None:
                continue
            saving = other.worst_micro_usd - other.cost_micro_usd
            if other.settled_by_us is not None and other.settled_by_us <= t:
                freed_sure += saving
            elif other.settled_after_us is not None and other.settled_after_us < t:
                freed_maybe += saving
        sure = committed - freed_sure
        if sure <= budget_micro_usd:
            explained += 1
        elif sure - freed_maybe <= budget_micro_usd:
            lenient += 1
        else:
            unexplained.append(charge.request_id)
    return BudgetVerdict(len(order), explained, lenient, unexplained)
