"""Admission against a tenant's limits and budget: one atomic step in, one step out.

`Limiter.admit` checks, all at once, every limit that applies to a request (the tenant's and
its key's RPM, TPM and concurrency, and the tenant's budget) and records the request against
all of them only if every one has room: a rejected request consumes nothing. `settle` turns
the reservations into what the request really used and gives back its concurrency leases.

Two implementations keep the same contract (tests/integration/test_limiter_contract.py):
`LocalLimiter` (tenancy/local_limiter.py), exact within one process, and `RedisLimiter`
(tenancy/redis_limiter.py), exact across every worker and gateway replica: one Lua script per
admission and one per settlement, on the Redis server's clock.

Reservations:
- TPM reserves `prompt_tokens + max_tokens` (an upper bound of the prompt and the output
  cap) and settles to the engine's usage.
- The budget reserves the worst-case cost and settles to the real cost (never above the
  reservation, so spend never passes the budget). When the client gave no `max_tokens` and
  the budget cannot cover the default cap, the admission caps `max_tokens` at what the
  budget still covers (`Admission.max_tokens`): the gateway writes it into the body.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetserve.tenancy.model import Principal, Tenant


@dataclass(frozen=True, slots=True)
class Estimate:
    """What one request may use, known before it is sent."""

    request_id: str
    prompt_tokens: int  # an upper bound (the gateway does not tokenize)
    max_tokens: int  # the client's max_tokens, else the configured cap
    max_tokens_given: bool  # False: the limiter may lower max_tokens to fit the budget
    input_micro_usd_per_token: float = 0.0  # = the model's input $ per million tokens
    output_micro_usd_per_token: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True, slots=True)
class Quota:
    """One limit as OpenAI's `x-ratelimit-{limit,remaining,reset}-*` headers report it."""

    limit: int
    remaining: int
    reset_s: float  # until the window has room again (0: it has room now)


@dataclass(frozen=True, slots=True)
class Admission:
    request_id: str
    tenant: str
    key_prefix: str
    tokens_reserved: int
    cost_reserved_micro_usd: int
    max_tokens: int | None = None  # set: the budget capped the request's max_tokens to this
    requests: Quota | None = None  # the tightest RPM scope after this admission
    tokens: Quota | None = None  # the tightest TPM scope after this admission
    budget_left_micro_usd: int | None = None  # None: no budget applied (none, or free model)
    recorded: bool = True  # False: no counter holds the request (no limits, no budget, or a
    # free model), so settle() and renew() have nothing to do for it (no Redis round trip)


class RejectReason(enum.StrEnum):
    RPM = "rpm"
    TPM = "tpm"
    CONCURRENCY = "concurrency"
    BUDGET = "budget"
    UNAVAILABLE = "unavailable"  # the shared counters are unreachable and fail_closed is set


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    retry_after_s: float
    scope: str  # "tenant" or "key": whose limit refused it
    requests: Quota | None = None
    tokens: Quota | None = None


class Limiter(Protocol):
    async def admit(self, principal: Principal, estimate: Estimate) -> Admission | Rejection:
        """All of the principal's limits and budget in one atomic step."""
        ...

    async def settle(self, admission: Admission, tokens_used: int, cost_micro_usd: int) -> None:
        """The request is over: reservations become what it used; its leases are freed."""
        ...

    async def renew(self, admissions: Sequence[Admission]) -> None:
        """Keep the concurrency leases of requests still running (a gateway loop calls this
        well inside the lease TTL; a gateway that dies stops, and its leases expire)."""
        ...

    async def state(self, principal: Principal) -> dict[str, object]:
        """The live limit state of a tenant and key: used and limit of each counter."""
        ...

    async def seed_spend(self, tenant: Tenant, period_start_s: int, micro_usd: int) -> bool:
        """Start the tenant's spend counter of the period beginning `period_start_s` at
        `micro_usd` (from the ledger), unless it exists already; True if it was set."""
        ...

    async def close(self) -> None: ...
