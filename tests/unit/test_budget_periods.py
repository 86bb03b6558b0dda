"""Budget periods: the UTC day, ISO week, calendar month or all time holding a moment."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from fleetserve.tenancy.model import BudgetPeriod
from fleetserve.tenancy.periods import Period, period_name, period_of


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


@pytest.mark.parametrize(
    ("kind", "at", "start", "end"),
    [
        pytest.param("day", "2026-03-14T15:09:26", "2026-03-14", "2026-03-15", id="day"),
        pytest.param("day", "2026-03-14T00:00:00", "2026-03-14", "2026-03-15", id="midnight"),
        pytest.param("day", "2026-03-14T23:59:59", "2026-03-14", "2026-03-15", id="last-second"),
        pytest.param("week", "2026-03-14T12:00:00", "2026-03-09", "2026-03-16", id="saturday"),
        pytest.param("week", "2026-03-09T00:00:00", "2026-03-09", "2026-03-16", id="monday-0h"),
        pytest.param("week", "2026-03-15T23:59:59", "2026-03-09", "2026-03-16", id="sunday-end"),
        pytest.param("week", "2027-01-01T08:00:00", "2026-12-28", "2027-01-04", id="new-year"),
        pytest.param("month", "2026-03-14T12:00:00", "2026-03-01", "2026-04-01", id="march"),
        pytest.param("month", "2026-12-31T23:59:59", "2026-12-01", "2027-01-01", id="december"),
        pytest.param("month", "2028-02-29T10:00:00", "2028-02-01", "2028-03-01", id="leap-feb"),
        pytest.param("month", "2100-02-28T10:00:00", "2100-02-01", "2100-03-01", id="2100-feb"),
        pytest.param("month", "1970-01-01T00:00:00", "1970-01-01", "1970-02-01", id="epoch"),
    ],
)
def test_period_bounds(kind: str, at: str, start: str, end: str) -> None:
    period = period_of(BudgetPeriod(kind), ts(at))
    assert period == Period(BudgetPeriod(kind), ts(start + "T00:00:00"), ts(end + "T00:00:00"))
    assert period.name == f"{kind}:{ts(start + 'T00:00:00')}"


def test_total_never_ends() -> None:
    period = period_of(BudgetPeriod.TOTAL, ts("2026-03-14T15:09:26"))
    assert period == Period(BudgetPeriod.TOTAL, 0, None)
    assert period.left_s(1e9) is None
    assert period_name(BudgetPeriod.TOTAL, 0) == "total:0"


def test_left_s_counts_down_to_the_end() -> None:
    period = period_of(BudgetPeriod.DAY, ts("2026-03-14T23:00:00"))
    assert period.left_s(ts("2026-03-14T23:00:00")) == 3600
    assert period.left_s(ts("2026-03-15T01:00:00")) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_against_the_calendar(seed: int) -> None:
    """Random moments over four centuries against datetime's own calendar."""
    rng = random.Random(seed)
    for _ in range(2000):
        at = rng.uniform(0, ts("2400-01-01T00:00:00"))
        moment = datetime.fromtimestamp(at, UTC)
        midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        monday = midnight - timedelta(days=midnight.weekday())
        first = midnight.replace(day=1)
        day = period_of(BudgetPeriod.DAY, at)
        week = period_of(BudgetPeriod.WEEK, at)
        month = period_of(BudgetPeriod.MONTH, at)
        assert day.start_s == midnight.timestamp()
        assert week.start_s == monday.timestamp()
        assert month.start_s == first.timestamp()
        assert month.end_s is not None
        assert datetime.fromtimestamp(month.end_s, UTC).day == 1
        assert month.start_s <= at < month.end_s
        assert (month.end_s - month.start_s) // 86_400 in (28, 29, 30, 31)
        assert week.end_s == week.start_s + 7 * 86_400
