"""`SharedLimiter`: the Redis limiter, and what it does while Redis is out. Never silent.

When a Redis call fails (refused, reset, timed out), an outage begins: one warning line, and
`on_outage(True)` for the gateway's metric. Until a probe (a PING at most every
`probe_interval_s`, from a background task) answers, admissions do not touch Redis:

- `fail_closed`: every request that has a limit or a budget to check is refused with
  `RejectReason.UNAVAILABLE` (the gateway answers 503); requests with none still go (they
  never needed Redis).
- `local`: each process enforces each limit divided by `processes` (rounded up, at least
  1) on its own `LocalLimiter`, so that the replicas together stay near the limit. Budgets
  cannot be divided safely (each process would need to know what the others spent), so a
  priced request of a tenant with a budget is refused as UNAVAILABLE: spend never passes a
  budget, even during an outage. Free models and tenants without budgets go on.

When the probe answers, the outage ends: one line, `on_outage(False)`. Admissions made on
either side are settled and renewed on that side. A Redis admission whose settlement falls
inside an outage is not retried: its leases and reservations expire on their own (its budget
reservation then counts at its worst case, never less). Local leases are not carried over
into Redis, so just after an outage a replica may briefly hold more than its share.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from redis.exceptions import RedisError

from fleetserve.clock import Clock, RealClock
from fleetserve.config.tenancy import RedisFailure
from fleetserve.tenancy.limiter import Admission, Estimate, Rejection, RejectReason
from fleetserve.tenancy.local_limiter import TENANT, LocalLimiter
from fleetserve.tenancy.model import Limits, Principal, Tenant
from fleetserve.tenancy.redis_limiter import RedisLimiter
from fleetserve.tenancy.reservations import worst_case_micro_usd

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0
UNAVAILABLE_RETRY_S = 1.0
# What a Redis outage looks like from redis-py: its own errors, and a socket's.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)


def divided(limits: Limits, processes: int) -> Limits:
    """Each limit's share of one of `processes` processes (rounded up, at least 1)."""

    def share(value: int | None) -> int | None:
        return None if value is None else max(1, math.ceil(value / processes))

    return Limits(share(limits.rpm), share(limits.tpm), share(limits.max_concurrent))


class SharedLimiter:
    """A `Limiter`: `RedisLimiter` while Redis answers, the configured fallback while not."""

    def __init__(
        self,
        redis: RedisLimiter,
        local: LocalLimiter,
        mode: RedisFailure = "fail_closed",
        processes: int = 1,
        on_outage: Callable[[bool], None] | None = None,
        *,
        clock: Clock | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, not {processes}")
        if mode not in ("fail_closed", "local"):
            raise ValueError(f"mode must be fail_closed or local, not {mode!r}")
        self.redis = redis
        self.local = local
        self.mode = mode
        self.processes = processes
        self._on_outage = on_outage
        self._clock = clock or RealClock()
        self.probe_interval_s = probe_interval_s
        self._out_since: float | None = None
        self._probe: asyncio.Task[None] | None = None
        # Local admissions (request id -> last admitted or renewed), settled locally too.
        self._local_ids: dict[str, float] = {}
        self._pruned_at = self._clock.now()

    @property
    def out(self) -> bool:
        """Whether Redis is out (the fallback answers)."""
        return self._out_since is not None

    # -- the Limiter protocol ----------------------------------------------------------
    async def admit(self, principal: Principal, estimate: Estimate) -> Admission | Rejection:
        if self._out_since is None:
            try:
                return await self.redis.admit(principal, estimate)
            except OUTAGE_ERRORS as exc:
                self._outage_began(exc)
        return self._fallback(principal, estimate)

    async def settle(self, admission: Admission, tokens_used: int, cost_micro_usd: int) -> None:
        if self._local_ids.pop(admission.request_id, None) is not None:
            self.local.settle_now(admission, tokens_used, cost_micro_usd)
            return
        if not admission.recorded or self._out_since is not None:
            return  # out: its leases and reservation expire on their own
        try:
            await self.redis.settle(admission, tokens_used, cost_micro_usd)
        except OUTAGE_ERRORS as exc:
            self._outage_began(exc)

    async def renew(self, admissions: Sequence[Admission]) -> None:
        now = self._clock.now()
        mine = [a for a in admissions if a.request_id in self._local_ids]
        for admission in mine:
            self._local_ids[admission.request_id] = now
        self.local.renew_now(mine)
        shared = [a for a in admissions if a.recorded and a.request_id not in self._local_ids]
        if not shared or self._out_since is not None:
            return
        try:
            await self.redis.renew(shared)
        except OUTAGE_ERRORS as exc:
            self._outage_began(exc)

    async def state(self, principal: Principal) -> dict[str, object]:
        """Redis's counters (`shared: True`), or this process's during an outage."""
        if self._out_since is None:
            try:
                return {"shared": True, **await self.redis.state(principal)}
            except OUTAGE_ERRORS as exc:
                self._outage_began(exc)
        return {"shared": False, **self.local.state_now(self.share(principal))}

    async def seed_spend(self, tenant: Tenant, period_start_s: int, micro_usd: int) -> bool:
        """As RedisLimiter.seed_spend; raises the Redis error during an outage (seed again
        when `on_outage(False)` says it is over)."""
        try:
            return await self.redis.seed_spend(tenant, period_start_s, micro_usd)
        except OUTAGE_ERRORS as exc:
            self._outage_began(exc)
            raise

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        await self.redis.close()
        await self.local.close()

    def share(self, principal: Principal) -> Principal:
        """The principal with this process's share of each limit, and no budget."""
        tenant, key = principal.tenant, principal.key
        return Principal(
            replace(tenant, limits=divided(tenant.limits, self.processes), budget=None),
            replace(key, limits=divided(key.limits, self.processes)),
        )

    # -- internals ----------------------------------------------------------------------
    def _fallback(self, principal: Principal, estimate: Estimate) -> Admission | Rejection:
        tenant, key = principal.tenant, principal.key
        worst = worst_case_micro_usd(estimate)
        priced_budget = tenant.budget is not None and worst > 0
        if not priced_budget and not tenant.limits.any and not key.limits.any:
            return Admission(
                estimate.request_id, tenant.name, key.prefix, estimate.tokens, 0, recorded=False
            )
        if self.mode == "fail_closed" or priced_budget:
            return Rejection(RejectReason.UNAVAILABLE, UNAVAILABLE_RETRY_S, TENANT)
        result = self.local.admit_now(self.share(principal), estimate)
        if isinstance(result, Admission) and result.recorded:
            now = self._clock.now()
            self._local_ids[result.request_id] = now
            self._prune(now)
        return result

    def _prune(self, now: float) -> None:
        """Forget local admissions never settled: past a lease TTL without renewal and a
        window, the local counters hold nothing of them either."""
        horizon = self.local.lease_ttl_s + self.local.window_s
        if now - self._pruned_at < horizon:
            return
        self._pruned_at = now
        for request_id, touched in list(self._local_ids.items()):
            if now - touched > horizon:
                del self._local_ids[request_id]

    def _outage_began(self, exc: BaseException) -> None:
        if self._out_since is not None:
            return
        self._out_since = self._clock.now()
        what = (
            "requests with limits or budgets are refused (503)"
            if self.mode == "fail_closed"
            else f"each process enforces its share of every limit (1/{self.processes}) and "
            "refuses priced requests of tenants with budgets"
        )
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        log.warning("Redis is unreachable (%s): %s until it answers", reason, what)
        if self._on_outage is not None:
            self._on_outage(True)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while True:
            await self._clock.sleep(self.probe_interval_s)
            try:
                await self.redis.ping()
            except OUTAGE_ERRORS:
                continue
            break
        began = self._out_since
        self._out_since = None
        self._probe = None
        lasted = 0.0 if began is None else self._clock.now() - began
        log.warning("Redis answers again after %.1f s: limits are shared again", lasted)
        if self._on_outage is not None:
            self._on_outage(False)
