"""Budget periods in UTC: when the one holding a moment began and when it ends.

- `day`: from midnight UTC;
- `week`: ISO weeks, from Monday 00:00 UTC;
- `month`: calendar months, from the 1st 00:00 UTC;
- `total`: one period that began at the epoch and never ends.

A period is named by its kind and its start (Unix seconds), e.g. `month:1769904000`: the
budget counters are keyed by that name, in memory and in Redis. The Redis scripts compute the
same bounds from the server's clock (lua/common.lua, days-from-civil arithmetic), so that
every gateway agrees on the period whatever its own clock says; tests hold the two to each
other. Pure: the moment comes in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fleetserve.tenancy.model import BudgetPeriod

DAY_S = 86_400


@dataclass(frozen=True, slots=True)
class Period:
    kind: BudgetPeriod
    start_s: int  # Unix seconds, UTC
    end_s: int | None  # None: `total` never ends

    @property
    def name(self) -> str:
        """What the counters of this period are keyed by."""
        return period_name(self.kind, self.start_s)

    def left_s(self, at_s: float) -> float | None:
        """Seconds from `at_s` to the end (None: never)."""
        return None if self.end_s is None else max(0.0, self.end_s - at_s)


def period_name(kind: BudgetPeriod, start_s: int) -> str:
    return f"{kind.value}:{int(start_s)}"


def period_of(kind: BudgetPeriod, at_s: float) -> Period:
    """The period of `kind` that holds the moment `at_s` (Unix seconds)."""
    if kind is BudgetPeriod.TOTAL:
        return Period(kind, 0, None)
    day = math.floor(at_s / DAY_S)
    if kind is BudgetPeriod.DAY:
        return Period(kind, day * DAY_S, (day + 1) * DAY_S)
    date = datetime.fromtimestamp(day * DAY_S, UTC)
    if kind is BudgetPeriod.WEEK:
        monday = date - timedelta(days=date.weekday())
        start = int(monday.timestamp())
        return Period(kind, start, start + 7 * DAY_S)
    first = date.replace(day=1)
    following = (
        first.replace(year=first.year + 1, month=1)
        if first.month == 12
        else first.replace(month=first.month + 1)
    )
    return Period(kind, int(first.timestamp()), int(following.timestamp()))
