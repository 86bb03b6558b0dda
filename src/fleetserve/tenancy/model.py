"""What tenancy is made of: tenants, their keys, limits and budgets, and one usage row.

Plain frozen data shared by the store (tenancy/store.py), the limiters (tenancy/limiter.py),
the ledger (tenancy/ledger.py) and the gateway's auth, admission and accounting steps. Money
is integer micro-dollars everywhere (`MICRO_USD` to the dollar); times are Unix seconds.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Literal, get_args

from fleetserve.tenancy.fairness import Priority
from fleetserve.tenancy.windows import MICRO_USD

__all__ = [
    "MICRO_USD",
    "NAME_PATTERN",
    "USAGE_GROUPS",
    "ApiKey",
    "BudgetPeriod",
    "BudgetSpec",
    "FinishReason",
    "Limits",
    "Price",
    "Principal",
    "Priority",
    "Tenant",
    "UsageGroupBy",
    "UsageRow",
    "cost_micro_usd",
    "valid_name",
]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
"""Tenant names: 1-63 characters, letters, digits, `.`, `_`, `-`, not starting with a mark
(they appear in metric labels, URLs and file names as they are)."""


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.fullmatch(name))


UsageGroupBy = Literal["tenant", "key", "model", "day"]
"""How usage is summed: per tenant, key prefix, model, or UTC day."""
USAGE_GROUPS: tuple[UsageGroupBy, ...] = get_args(UsageGroupBy)


class BudgetPeriod(enum.StrEnum):
    DAY = "day"
    WEEK = "week"  # ISO weeks: Monday 00:00 UTC
    MONTH = "month"  # calendar months, UTC
    TOTAL = "total"  # never resets


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"  # the client left (or the gateway ended it) before the end
    ERROR = "error"  # refused, failed upstream, or failed mid-stream


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-minute and concurrency limits; None: no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None  # input plus output tokens per rolling minute
    max_concurrent: int | None = None

    def tighter(self, other: Limits) -> Limits:
        """Each limit the smaller of the two (a key's limits narrow its tenant's)."""

        def low(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return Limits(
            low(self.rpm, other.rpm),
            low(self.tpm, other.tpm),
            low(self.max_concurrent, other.max_concurrent),
        )

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    limit_micro_usd: int
    period: BudgetPeriod = BudgetPeriod.MONTH
    soft_alert_frac: float = 0.8  # the remaining-budget gauge and a log line warn past this


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    weight: float = 1.0  # fair share under saturation (VTC)
    priority: Priority = Priority.STANDARD
    models: frozenset[str] | None = None  # None: every model the fleet serves
    limits: Limits = Limits()
    budget: BudgetSpec | None = None
    created_at: float = 0.0

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: its public prefix is its id; `digest` is HMAC-SHA256 under the pepper."""

    prefix: str
    tenant: str
    digest: str = field(repr=False)
    label: str | None = None
    limits: Limits = Limits()  # tighter limits of its own, on top of the tenant's
    created_at: float = 0.0
    expires_at: float | None = None  # rotation sets the old key's to the grace deadline
    revoked_at: float | None = None

    def usable(self, now: float) -> bool:
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated request's tenant and key, and the limits that apply to it."""

    tenant: Tenant
    key: ApiKey


@dataclass(frozen=True, slots=True)
class Price:
    """A model's internal chargeback rate, in USD per million tokens."""

    input_per_mtok_usd: float = 0.0
    output_per_mtok_usd: float = 0.0

    @property
    def free(self) -> bool:
        return self.input_per_mtok_usd == 0 and self.output_per_mtok_usd == 0


def cost_micro_usd(price: Price | None, input_tokens: int, output_tokens: int) -> int:
    """What the tokens cost, in micro-dollars, rounded up ($/Mtok x tokens = micro-dollars)."""
    if price is None:
        return 0
    exact = input_tokens * price.input_per_mtok_usd + output_tokens * price.output_per_mtok_usd
    return math.ceil(exact - 1e-9)  # float noise must not add a micro-dollar


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One request in the usage ledger (append-only; `request_id` makes a write idempotent)."""

    request_id: str
    tenant: str
    key_prefix: str | None
    model: str
    replica: str | None
    status: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int
    queue_s: float
    ttft_s: float | None
    e2e_s: float
    started_at: float
    ended_at: float
    finish_reason: FinishReason
    usage_estimated: bool = False  # the engine gave no usage: counted from content chunks
