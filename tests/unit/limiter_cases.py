"""Builders for limiter tests: principals with limits and budgets, and estimates."""

from __future__ import annotations

import itertools

from fleetserve.tenancy.limiter import Admission, Estimate, Rejection
from fleetserve.tenancy.model import (
    MICRO_USD,
    ApiKey,
    BudgetPeriod,
    BudgetSpec,
    Limits,
    Principal,
    Tenant,
)

_ids = itertools.count()


def principal(
    tenant: str = "acme",
    key: str = "key00001",
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    concurrent: int | None = None,
    key_rpm: int | None = None,
    key_tpm: int | None = None,
    key_concurrent: int | None = None,
    budget_usd: float | None = None,
    period: BudgetPeriod = BudgetPeriod.MONTH,
) -> Principal:
    budget = None
    if budget_usd is not None:
        budget = BudgetSpec(round(budget_usd * MICRO_USD), period)
    return Principal(
        Tenant(tenant, limits=Limits(rpm, tpm, concurrent), budget=budget),
        ApiKey(key, tenant, digest="0" * 64, limits=Limits(key_rpm, key_tpm, key_concurrent)),
    )


def estimate(
    request_id: str | None = None,
    *,
    prompt: int = 10,
    max_tokens: int = 90,
    given: bool = True,
    input_per_mtok_usd: float = 0.0,
    output_per_mtok_usd: float = 0.0,
) -> Estimate:
    """An estimate; the prices are USD per million tokens (= micro-dollars per token)."""
    return Estimate(
        request_id or f"req-{next(_ids)}",
        prompt,
        max_tokens,
        given,
        input_per_mtok_usd,
        output_per_mtok_usd,
    )


def admitted(result: Admission | Rejection) -> Admission:
    assert isinstance(result, Admission), result
    return result


def rejected(result: Admission | Rejection) -> Rejection:
    assert isinstance(result, Rejection), result
    return result
