"""`LocalLimiter`: the `Limiter` contract exact within one process, on in-memory counters.

Used when no Redis is configured (one gateway process), and by `SharedLimiter` as the
fallback while Redis is out (with each limit divided by the processes sharing it). Every
admission is checked and recorded without an await in between, so the event loop makes it
atomic. The counters are those of tenancy/windows.py, one set per tenant (every request of
the tenant) and one per key (that key's requests only).

Time: windows, leases and reservation expiries run on the clock's monotonic `now()`; budget
periods on its `wall()` (UTC calendar). Both come from the injected `Clock`.

Choices shared with `RedisLimiter` (the contract test holds both to them):
- checks go in this order, and the first that refuses names the rejection: tenant RPM, key
  RPM, tenant TPM, key TPM, tenant concurrency, key concurrency, tenant budget;
- the budget is consulted only for a priced request (worst case > 0): a free model is never
  refused for money, even with the budget spent;
- a budget reservation expires with the lease TTL unless `renew()`ed; expired, it counts as
  spent at its reserved worst case (a crashed gateway's requests may have used it all);
- Retry-After: RPM, when the oldest admission leaves the window; TPM, when enough reserved
  tokens leave it; concurrency, the soonest lease expiry, at most `CONCURRENCY_RETRY_S`
  (leases are usually given back well before they expire); budget, the end of the period
  (`NEVER_RETRY_S` for `total`) when even without the reservations in flight it could not go,
  else `BUDGET_BUSY_RETRY_S` (reservations in flight may settle below their worst case).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fleetserve.clock import Clock, RealClock
from fleetserve.tenancy.limiter import (
    Admission,
    Estimate,
    Quota,
    Rejection,
    RejectReason,
)
from fleetserve.tenancy.model import BudgetSpec, Limits, Principal, Tenant
from fleetserve.tenancy.periods import Period, period_name, period_of
from fleetserve.tenancy.reservations import BudgetFit, fit_budget, worst_case_micro_usd
from fleetserve.tenancy.windows import Budget, Leases, RequestLog, TokenLog

DEFAULT_WINDOW_S = 60.0
DEFAULT_LEASE_TTL_S = 15.0
CONCURRENCY_RETRY_S = 1.0
BUDGET_BUSY_RETRY_S = 1.0
NEVER_RETRY_S = 86_400.0  # a spent `total` budget: retrying will not help; say a day
KEPT_PERIODS = 2  # the current budget period and the one before (late settlements)

TENANT = "tenant"
KEY = "key"


@dataclass(slots=True)
class _Scope:
    """The counters of one tenant or one key; a window exists once its limit was set."""

    label: str  # TENANT or KEY
    rpm: RequestLog | None = None
    tpm: TokenLog | None = None
    leases: Leases | None = None
    limits: Limits = field(default_factory=Limits)

    def sync(self, limits: Limits, window_s: float, ttl_s: float) -> None:
        """Follow the current limits (an admin may change them at any time)."""
        self.limits = limits
        if limits.rpm is not None:
            if self.rpm is None:
                self.rpm = RequestLog(limits.rpm, window_s)
            self.rpm.limit = limits.rpm
        if limits.tpm is not None:
            if self.tpm is None:
                self.tpm = TokenLog(limits.tpm, window_s)
            self.tpm.limit = limits.tpm
        if limits.max_concurrent is not None:
            if self.leases is None:
                self.leases = Leases(limits.max_concurrent, ttl_s)
            self.leases.limit = limits.max_concurrent

    def active_rpm(self) -> RequestLog | None:
        return self.rpm if self.limits.rpm is not None else None

    def active_tpm(self) -> TokenLog | None:
        return self.tpm if self.limits.tpm is not None else None

    def active_leases(self) -> Leases | None:
        return self.leases if self.limits.max_concurrent is not None else None

    def holds(self, request_id: str, now: float) -> bool:
        """Whether an active window already counts `request_id`."""
        rpm, tpm, leases = self.active_rpm(), self.active_tpm(), self.active_leases()
        return bool(
            (rpm is not None and rpm.holds(request_id, now))
            or (tpm is not None and tpm.holds(request_id))
            or (leases is not None and leases.holds(request_id))
        )


@dataclass(slots=True)
class _Budgets:
    """A tenant's budget counters by period (the current one and the one before)."""

    by_period: dict[str, tuple[int, Budget]] = field(default_factory=dict)  # name -> (start, …)

    def get(self, name: str) -> Budget | None:
        found = self.by_period.get(name)
        return None if found is None else found[1]

    def add(self, name: str, start_s: int, budget: Budget) -> None:
        self.by_period[name] = (start_s, budget)
        while len(self.by_period) > KEPT_PERIODS:
            oldest = min(self.by_period, key=lambda n: self.by_period[n][0])
            del self.by_period[oldest]

    def all(self) -> list[Budget]:
        return [budget for _, budget in self.by_period.values()]


class LocalLimiter:
    """Exact limits and budgets for the requests of this process."""

    def __init__(
        self,
        clock: Clock | None = None,
        *,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> None:
        if lease_ttl_s <= 0 or window_s <= 0:
            raise ValueError(f"need lease_ttl_s > 0 and window_s > 0: {lease_ttl_s}, {window_s}")
        self._clock = clock or RealClock()
        self.lease_ttl_s = lease_ttl_s
        self.window_s = window_s
        self._tenants: dict[str, _Scope] = {}
        self._keys: dict[tuple[str, str], _Scope] = {}
        self._budgets: dict[str, _Budgets] = {}

    # -- the Limiter protocol ----------------------------------------------------------
    async def admit(self, principal: Principal, estimate: Estimate) -> Admission | Rejection:
        return self.admit_now(principal, estimate)

    async def settle(self, admission: Admission, tokens_used: int, cost_micro_usd: int) -> None:
        self.settle_now(admission, tokens_used, cost_micro_usd)

    async def renew(self, admissions: Sequence[Admission]) -> None:
        self.renew_now(admissions)

    async def state(self, principal: Principal) -> dict[str, object]:
        return self.state_now(principal)

    async def seed_spend(self, tenant: Tenant, period_start_s: int, micro_usd: int) -> bool:
        """Start the tenant's spend counter of the period beginning `period_start_s` at
        `micro_usd` (from the ledger, after a restart), unless the counter exists already.
        True if it was set."""
        return self.seed_spend_now(tenant, period_start_s, micro_usd)

    async def close(self) -> None:
        return None

    # -- the same, synchronously (atomic on the event loop) ------------------------------
    def admit_now(self, principal: Principal, estimate: Estimate) -> Admission | Rejection:
        tenant, key = principal.tenant, principal.key
        worst = worst_case_micro_usd(estimate)
        spec = tenant.budget if worst > 0 else None
        if spec is None and not tenant.limits.any and not key.limits.any:
            return Admission(
                estimate.request_id, tenant.name, key.prefix, estimate.tokens, 0, recorded=False
            )
        now = self._clock.now()
        scopes = (self._tenant_scope(tenant.name, tenant.limits), self._key_scope(principal))
        budget: Budget | None = None
        period: Period | None = None
        fit: BudgetFit | None = None
        if spec is not None:
            period, budget = self._budget(tenant.name, spec)
            budget.expire(now)
            fit = fit_budget(estimate, worst, budget.left())
        max_tokens = estimate.max_tokens
        if fit is not None and fit.max_tokens is not None:
            max_tokens = fit.max_tokens
        tokens = estimate.prompt_tokens + max_tokens

        refusal = self._refusal(scopes, tokens, now)
        if refusal is None and fit is None and budget is not None and period is not None:
            refusal = (
                RejectReason.BUDGET,
                TENANT,
                self._budget_retry_s(estimate, worst, budget, period),
            )
        if refusal is not None:
            reason, scope, retry_after_s = refusal
            return Rejection(
                reason,
                max(0.0, retry_after_s),
                scope,
                requests=self._requests_quota(scopes, now),
                tokens=self._tokens_quota(scopes, now),
            )

        rid = estimate.request_id
        if any(s.holds(rid, now) for s in scopes) or (budget is not None and budget.holds(rid)):
            raise ValueError(f"request {rid!r} is already admitted")
        for s in scopes:
            if (log := s.active_rpm()) is not None:
                log.admit(now, rid)
            if (tpm := s.active_tpm()) is not None:
                tpm.reserve(rid, tokens, now)
            if (leases := s.active_leases()) is not None:
                leases.acquire(rid, now)
        cost = 0
        if budget is not None and fit is not None:
            cost = fit.cost_micro_usd
            budget.reserve(rid, cost, expires_at=now + self.lease_ttl_s)
        return Admission(
            rid,
            tenant.name,
            key.prefix,
            tokens_reserved=tokens,
            cost_reserved_micro_usd=cost,
            max_tokens=fit.max_tokens if fit is not None else None,
            requests=self._requests_quota(scopes, now),
            tokens=self._tokens_quota(scopes, now),
            budget_left_micro_usd=budget.left() if budget is not None else None,
        )

    def settle_now(self, admission: Admission, tokens_used: int, cost_micro_usd: int) -> None:
        if not admission.recorded:
            return
        now = self._clock.now()
        rid = admission.request_id
        for s in self._scopes_of(admission):
            if s.tpm is not None:
                s.tpm.settle(rid, max(0, tokens_used), now)
            if s.leases is not None:
                s.leases.release(rid)
        budgets = self._budgets.get(admission.tenant)
        if budgets is not None:
            for budget in budgets.all():
                budget.expire(now)
                if budget.holds(rid):
                    budget.settle(rid, cost_micro_usd)
                    break

    def renew_now(self, admissions: Sequence[Admission]) -> None:
        now = self._clock.now()
        for admission in admissions:
            if not admission.recorded:
                continue
            rid = admission.request_id
            for s in self._scopes_of(admission):
                if s.leases is not None:
                    s.leases.renew(rid, now)
            budgets = self._budgets.get(admission.tenant)
            if budgets is not None:
                for budget in budgets.all():
                    budget.expire(now)
                    budget.renew(rid, now + self.lease_ttl_s)

    def state_now(self, principal: Principal) -> dict[str, object]:
        tenant, key = principal.tenant, principal.key
        now = self._clock.now()
        tenant_scope = self._tenant_scope(tenant.name, tenant.limits)
        key_scope = self._key_scope(principal)
        state: dict[str, object] = {
            TENANT: {"name": tenant.name, **_scope_state(tenant_scope, now)},
            KEY: {"prefix": key.prefix, **_scope_state(key_scope, now)},
        }
        if tenant.budget is not None:
            period, budget = self._budget(tenant.name, tenant.budget)
            budget.expire(now)
            tenant_state = state[TENANT]
            assert isinstance(tenant_state, dict)
            tenant_state["budget"] = budget_state(
                period, budget.limit, budget.spent, budget.reserved
            )
        return state

    def seed_spend_now(self, tenant: Tenant, period_start_s: int, micro_usd: int) -> bool:
        if tenant.budget is None:
            raise ValueError(f"tenant {tenant.name!r} has no budget to seed")
        if micro_usd < 0:
            raise ValueError(f"spend cannot be negative: {micro_usd}")
        name = period_name(tenant.budget.period, period_start_s)
        budgets = self._budgets.setdefault(tenant.name, _Budgets())
        if budgets.get(name) is not None:
            return False
        budgets.add(name, int(period_start_s), Budget(tenant.budget.limit_micro_usd, micro_usd))
        return True

    # -- internals ----------------------------------------------------------------------
    def _tenant_scope(self, tenant: str, limits: Limits) -> _Scope:
        scope = self._tenants.get(tenant)
        if scope is None:
            scope = self._tenants[tenant] = _Scope(TENANT)
        scope.sync(limits, self.window_s, self.lease_ttl_s)
        return scope

    def _key_scope(self, principal: Principal) -> _Scope:
        ident = (principal.tenant.name, principal.key.prefix)
        scope = self._keys.get(ident)
        if scope is None:
            scope = self._keys[ident] = _Scope(KEY)
        scope.sync(principal.key.limits, self.window_s, self.lease_ttl_s)
        return scope

    def _scopes_of(self, admission: Admission) -> list[_Scope]:
        found = [
            self._tenants.get(admission.tenant),
            self._keys.get((admission.tenant, admission.key_prefix)),
        ]
        return [s for s in found if s is not None]

    def _budget(self, tenant: str, spec: BudgetSpec) -> tuple[Period, Budget]:
        period = period_of(spec.period, self._clock.wall())
        budgets = self._budgets.setdefault(tenant, _Budgets())
        budget = budgets.get(period.name)
        if budget is None:
            budget = Budget(spec.limit_micro_usd)
            budgets.add(period.name, period.start_s, budget)
        budget.limit = spec.limit_micro_usd
        return period, budget

    def _refusal(
        self, scopes: tuple[_Scope, _Scope], tokens: int, now: float
    ) -> tuple[RejectReason, str, float] | None:
        for s in scopes:
            log = s.active_rpm()
            if log is not None and log.count(now) >= log.limit:
                oldest = log.oldest(now)
                return (
                    RejectReason.RPM,
                    s.label,
                    0.0 if oldest is None else (oldest + self.window_s - now),
                )
        for s in scopes:
            tpm = s.active_tpm()
            if tpm is not None and tpm.used(now) + tokens > tpm.limit:
                return RejectReason.TPM, s.label, tpm.room_at(tokens, now)
        for s in scopes:
            leases = s.active_leases()
            if leases is not None and leases.held(now) >= leases.limit:
                soonest = leases.soonest(now)
                wait = CONCURRENCY_RETRY_S if soonest is None else soonest - now
                return RejectReason.CONCURRENCY, s.label, min(wait, CONCURRENCY_RETRY_S)
        return None

    def _budget_retry_s(
        self, estimate: Estimate, worst: int, budget: Budget, period: Period
    ) -> float:
        if fit_budget(estimate, worst, budget.limit - budget.spent) is not None:
            return BUDGET_BUSY_RETRY_S  # it fits once the reservations in flight settle
        left = period.left_s(self._clock.wall())
        return NEVER_RETRY_S if left is None else left

    def _requests_quota(self, scopes: tuple[_Scope, _Scope], now: float) -> Quota | None:
        quotas = []
        for s in scopes:
            log = s.active_rpm()
            if log is None:
                continue
            remaining = max(0, log.limit - log.count(now))
            oldest = log.oldest(now)
            reset = 0.0 if remaining or oldest is None else oldest + self.window_s - now
            quotas.append(Quota(log.limit, remaining, max(0.0, reset)))
        return tightest(quotas)

    def _tokens_quota(self, scopes: tuple[_Scope, _Scope], now: float) -> Quota | None:
        quotas = []
        for s in scopes:
            tpm = s.active_tpm()
            if tpm is None:
                continue
            remaining = max(0, tpm.limit - tpm.used(now))
            reset = 0.0 if remaining else tpm.room_at(1, now)
            quotas.append(Quota(tpm.limit, remaining, max(0.0, reset)))
        return tightest(quotas)


def tightest(quotas: list[Quota]) -> Quota | None:
    """The scope with the least room (the tenant's on a tie): what the headers report."""
    return min(quotas, key=lambda q: q.remaining) if quotas else None


def budget_state(period: Period, limit: int, spent: int, reserved: int) -> dict[str, object]:
    return {
        "period": period.kind.value,
        "period_start": period.start_s,
        "period_end": period.end_s,
        "limit_micro_usd": limit,
        "spent_micro_usd": spent,
        "reserved_micro_usd": reserved,
        "left_micro_usd": limit - spent - reserved,
    }


def _scope_state(scope: _Scope, now: float) -> dict[str, object]:
    state: dict[str, object] = {}
    if (log := scope.active_rpm()) is not None:
        state["rpm"] = {"used": log.count(now), "limit": log.limit}
    if (tpm := scope.active_tpm()) is not None:
        state["tpm"] = {"used": tpm.used(now), "limit": tpm.limit}
    if (leases := scope.active_leases()) is not None:
        state["concurrent"] = {"used": leases.held(now), "limit": leases.limit}
    return state
