"""Reading the usage ledger: totals grouped by tenant, key, model or UTC day, and spend.

Sums and counts are computed by the database; the TTFT p95 is computed here from the
groups' samples with `telemetry.quantiles`, so SQLite and PostgreSQL give the same figure
(neither has one percentile function the other shares).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Integer, Select, case, cast, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from fleetserve.errors import InvalidRequestError
from fleetserve.telemetry.quantiles import percentile_of
from fleetserve.tenancy.model import USAGE_GROUPS, FinishReason, UsageGroupBy, UsageRow
from fleetserve.tenancy.schema import usage
from fleetserve.tenancy.store_rows import usage_from

NO_KEY = "-"  # the group of rows written without a key (auth none)
DAY_S = 86_400
S = TypeVar("S", bound=Select[Any])


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """Totals of one group: a tenant, a key prefix, a model or a UTC day (YYYY-MM-DD)."""

    group: str
    requests: int
    errors: int  # status >= 400, or finished with an error
    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int
    ttft_p95_s: float | None  # None: no row of the group has a TTFT


def _group_column(by: UsageGroupBy, dialect: str) -> ColumnElement[Any]:
    if by == "tenant":
        return usage.c.tenant
    if by == "key":
        return usage.c.key_prefix
    if by == "model":
        return usage.c.model
    if by == "day":  # whole days since the epoch, UTC
        days = usage.c.started_at / DAY_S
        # CAST rounds on PostgreSQL and truncates on SQLite; floor() is not in every SQLite.
        return func.floor(days) if dialect == "postgresql" else cast(days, Integer)
    raise InvalidRequestError(f"invalid group {by!r}: one of {', '.join(USAGE_GROUPS)}", param="by")


def _group_name(by: UsageGroupBy, value: Any) -> str:
    if by == "day":
        return dt.datetime.fromtimestamp(int(value) * DAY_S, dt.UTC).date().isoformat()
    if value is None:
        return NO_KEY
    return str(value)


def _filtered(statement: S, since: float | None, until: float | None, tenant: str | None) -> S:
    if since is not None:
        statement = statement.where(usage.c.started_at >= since)
    if until is not None:
        statement = statement.where(usage.c.started_at < until)
    if tenant is not None:
        statement = statement.where(usage.c.tenant == tenant)
    return statement


async def usage_groups(
    connection: AsyncConnection,
    *,
    since: float | None,
    until: float | None,
    tenant: str | None,
    by: UsageGroupBy,
) -> list[UsageGroup]:
    group = _group_column(by, connection.dialect.name).label("grp")
    failed = or_(usage.c.status >= 400, usage.c.finish_reason == FinishReason.ERROR.value)
    totals = _filtered(
        select(
            group,
            func.count().label("requests"),
            func.sum(case((failed, 1), else_=0)).label("errors"),
            func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
            func.sum(usage.c.completion_tokens).label("completion_tokens"),
            func.sum(usage.c.cost_micro_usd).label("cost_micro_usd"),
        ).group_by(group),
        since,
        until,
        tenant,
    )
    ttfts = _filtered(
        select(group, usage.c.ttft_s).where(usage.c.ttft_s.is_not(None)), since, until, tenant
    )
    samples: defaultdict[str, list[float]] = defaultdict(list)
    for value, ttft in await connection.execute(ttfts):
        samples[_group_name(by, value)].append(float(ttft))
    groups = [
        UsageGroup(
            group=(name := _group_name(by, row.grp)),
            requests=int(row.requests),
            errors=int(row.errors or 0),
            prompt_tokens=int(row.prompt_tokens or 0),
            completion_tokens=int(row.completion_tokens or 0),
            cost_micro_usd=int(row.cost_micro_usd or 0),
            ttft_p95_s=percentile_of(samples.get(name, ()), 95),
        )
        for row in await connection.execute(totals)
    ]
    return sorted(groups, key=lambda g: g.group)


async def usage_rows(
    connection: AsyncConnection,
    *,
    since: float | None,
    tenant: str | None,
    limit: int | None,
) -> list[UsageRow]:
    statement = _filtered(select(usage), since, None, tenant).order_by(
        usage.c.started_at, usage.c.request_id
    )
    if limit is not None:
        statement = statement.limit(limit)
    return [usage_from(row._mapping) for row in await connection.execute(statement)]


async def spend(connection: AsyncConnection, tenant: str, since: float | None) -> int:
    statement = _filtered(
        select(func.coalesce(func.sum(usage.c.cost_micro_usd), 0)), since, None, tenant
    )
    return int((await connection.execute(statement)).scalar_one())
