"""The tenancy parts one gateway worker runs with auth = keys, as one background service:
the store (opened and migrated at start), the limiter (in-process, or shared in Redis), the
usage ledger (flushed at stop, after the last request), and the revocation feed."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from fleetserve.clock import Clock
from fleetserve.config import GatewaySettings, TenancySettings
from fleetserve.fleet.fleet import Fleet
from fleetserve.gateway.tenancy import KeyCache, PromptCounter, TenantGate
from fleetserve.gateway.upstream import UpstreamClient
from fleetserve.supervisor import Supervisor, cancel_all
from fleetserve.telemetry.tenant_metrics import TenantMetrics
from fleetserve.tenancy.admin import TenancyAdmin
from fleetserve.tenancy.keys import load_pepper
from fleetserve.tenancy.ledger import LedgerState, UsageLedger
from fleetserve.tenancy.limiter import Admission, Estimate, Limiter, Rejection
from fleetserve.tenancy.local_limiter import LocalLimiter
from fleetserve.tenancy.model import (
    ApiKey,
    BudgetPeriod,
    BudgetSpec,
    Price,
    Principal,
    Tenant,
    UsageRow,
)
from fleetserve.tenancy.periods import period_of
from fleetserve.tenancy.redis_limiter import RedisLimiter
from fleetserve.tenancy.revocations import Revocations
from fleetserve.tenancy.shared_limiter import SharedLimiter, divided
from fleetserve.tenancy.store import TenancyStore

log = logging.getLogger("fleetserve.gateway.tenancy")

LEDGER_METRICS_S = 1.0


class WorkerShare:
    """Limits without Redis in one of `workers` gateway worker processes: each enforces its
    share of every limit and budget (divided, rounded up), so together they never pass
    them. Exact only with one worker; with Redis they are exact across all."""

    def __init__(self, local: LocalLimiter, workers: int) -> None:
        self.local = local
        self.workers = workers

    def _share(self, principal: Principal) -> Principal:
        tenant, key = principal.tenant, principal.key
        budget = tenant.budget
        if budget is not None:
            budget = replace(budget, limit_micro_usd=budget.limit_micro_usd // self.workers)
        return Principal(
            replace(tenant, limits=divided(tenant.limits, self.workers), budget=budget),
            replace(key, limits=divided(key.limits, self.workers)),
        )

    async def admit(self, principal: Principal, estimate: Estimate) -> Admission | Rejection:
        return await self.local.admit(self._share(principal), estimate)

    async def settle(self, admission: Admission, tokens_used: int, cost_micro_usd: int) -> None:
        await self.local.settle(admission, tokens_used, cost_micro_usd)

    async def renew(self, admissions: Sequence[Admission]) -> None:
        await self.local.renew(admissions)

    async def state(self, principal: Principal) -> dict[str, object]:
        return await self.local.state(self._share(principal))

    async def seed_spend(self, tenant: Tenant, period_start_s: int, micro_usd: int) -> bool:
        return await self.local.seed_spend(tenant, period_start_s, micro_usd // self.workers)

    async def close(self) -> None:
        await self.local.close()


def build_limiter(
    tenancy: TenancySettings,
    clock: Clock,
    workers: int,
    on_outage: Callable[[bool], None] | None = None,
) -> Limiter:
    """Redis when FLEETSERVE_REDIS_URL is set (exact across workers and gateway replicas;
    what happens when it is out is `tenancy.redis_failure`), else in this process (each of
    several workers with its share)."""
    local = LocalLimiter(clock, lease_ttl_s=tenancy.lease_ttl_s)
    if tenancy.redis_url is None:
        if workers == 1:
            return local
        log.warning(
            "no FLEETSERVE_REDIS_URL: each of the %d workers enforces 1/%d of every limit and "
            "budget; set it for limits exact across workers", workers, workers,
        )  # fmt: skip
        return WorkerShare(local, workers)
    redis = RedisLimiter.from_url(
        tenancy.redis_url.get_secret_value(), prefix=tenancy.redis_prefix,
        lease_ttl_s=tenancy.lease_ttl_s,
    )  # fmt: skip
    processes = tenancy.gateway_processes or workers
    return SharedLimiter(redis, local, tenancy.redis_failure, processes, on_outage, clock=clock)


class _StoreSink:
    """The ledger's sink: the store, once it is open."""

    def __init__(self, runtime: TenancyRuntime) -> None:
        self._runtime = runtime

    async def insert_usage(self, rows: Sequence[UsageRow]) -> int:
        store = self._runtime.store
        if store is None:
            raise ConnectionError("the tenant store is not open")
        return await store.insert_usage(rows)


class TenancyRuntime:
    def __init__(
        self,
        settings: GatewaySettings,
        state_dir: Path,
        prices: Mapping[str, Price],
        engines: Mapping[str, str],
        clock: Clock,
        metrics: TenantMetrics,
        fleet: Fleet,
        upstream: UpstreamClient,
        supervisor: Supervisor,
        *,
        workers: int = 1,
        limiter: Limiter | None = None,
    ) -> None:
        tenancy: TenancySettings = settings.tenancy
        self.settings = tenancy
        self.state_dir = state_dir
        self.clock = clock
        self.metrics = metrics
        pepper_env = tenancy.key_pepper.get_secret_value() if tenancy.key_pepper else None
        self.pepper = load_pepper(state_dir, pepper_env)
        self.store: TenancyStore | None = None
        self._admin: TenancyAdmin | None = None
        self.limiter: Limiter = limiter or build_limiter(
            tenancy, clock, workers, lambda out: metrics.limiter_up.set(0 if out else 1)
        )
        metrics.limiter_up.set(1)
        self.ledger = UsageLedger(
            _StoreSink(self), state_dir, clock,
            batch_s=tenancy.ledger_batch_s, batch_rows=tenancy.ledger_batch_rows,
            on_state=self._ledger_state, supervisor=supervisor,
        )  # fmt: skip
        self.keys = KeyCache(self._find_key, self.pepper, clock, tenancy.key_cache_ttl_s)
        self.gate = TenantGate(
            self.keys, self.limiter, self.ledger.record, prices, tenancy, clock, metrics,
            PromptCounter(fleet, upstream, engines), seed=self._seed_budget,
        )  # fmt: skip
        # (tenant, period kind) -> when the seeded period ends: until then, nothing to do
        self._seeded: dict[tuple[str, BudgetPeriod], float] = {}
        self._supervisor = supervisor
        url = tenancy.redis_url
        self.revocations = None if url is None else Revocations.from_url(url.get_secret_value())
        self._feed: asyncio.Task[None] | None = None
        self._stats: asyncio.Task[None] | None = None
        self._spooled_seen = 0
        self._lost_seen = 0
        self._published: set[asyncio.Task[int]] = set()

    # -- the background service ------------------------------------------------------------
    async def start(self) -> None:
        url = self.settings.database_url
        self.store = await TenancyStore.open(
            url.get_secret_value() if url else None, self.state_dir, clock=self.clock
        )
        self._admin = TenancyAdmin(self.store, self.pepper, self.clock, self.key_changed)
        self.metrics.ledger_db_up.set(1)
        await self.ledger.start()
        await self.gate.start()
        revocations = self.revocations
        if revocations is not None:
            keys = self.keys

            async def feed() -> None:
                await revocations.run(keys.forget, on_subscribed=keys.clear)

            self._feed = self._supervisor.spawn("tenancy/revocations", feed)
        self._stats = self._supervisor.spawn("tenancy/ledger-metrics", self._count_ledger)

    async def stop(self) -> None:
        await cancel_all([self._feed, self._stats])
        if self.revocations is not None:
            await asyncio.gather(*self._published, return_exceptions=True)
            await self.revocations.close()
        await self.gate.stop()
        await self.ledger.stop()  # after the last request: the server has drained by now
        await self.limiter.close()
        if self.store is not None:
            await self.store.close()
            self.store = None

    # -- what the admin routes use ---------------------------------------------------------
    @property
    def admin(self) -> TenancyAdmin | None:
        return self._admin

    async def limit_state(self, principal: Principal) -> dict[str, object]:
        return await self.limiter.state(principal)

    def key_changed(self, prefix: str) -> None:
        """A key was revoked, rotated or its tenant changed: this process forgets it now,
        and every other gateway process too (pushed over Redis; else within the cache TTL)."""
        self.keys.forget(prefix)
        if self.revocations is not None:
            task = asyncio.get_running_loop().create_task(self._publish(prefix))
            self._published.add(task)
            task.add_done_callback(self._published.discard)

    async def _publish(self, prefix: str) -> int:
        assert self.revocations is not None
        try:
            return await self.revocations.publish(prefix)
        except Exception:  # noqa: BLE001 - the cache TTL still bounds it; never fail the caller
            log.warning("could not push the change of key fs-%s to other gateways", prefix)
            return 0

    # -- internals -------------------------------------------------------------------------
    async def _find_key(self, prefix: str) -> tuple[ApiKey, Tenant] | None:
        store = self.store
        if store is None:
            return None
        return await store.find_key(prefix)

    def _seed_budget(self, tenant: Tenant) -> Awaitable[None] | None:
        """Once per period: the tenant's spend so far, from the ledger, into the limiter's
        counter (which keeps it if it already has one: Redis outlives gateways). None when
        this period is seeded already: the hot path, one lookup per admission."""
        budget = tenant.budget
        if budget is None or self.store is None:
            return None
        key = (tenant.name, budget.period)
        now = self.clock.wall()
        if now < self._seeded.get(key, -math.inf):
            return None
        return self._seed(tenant, budget, key, now)

    async def _seed(
        self, tenant: Tenant, budget: BudgetSpec, key: tuple[str, BudgetPeriod], now: float
    ) -> None:
        store = self.store
        if store is None:
            return
        period = period_of(budget.period, now)
        await self.ledger.flush()
        spent = await store.spend_micro_usd(tenant.name, float(period.start_s) or None)
        await self.limiter.seed_spend(tenant, period.start_s, spent)
        self._seeded[key] = math.inf if period.end_s is None else float(period.end_s)

    async def _count_ledger(self) -> None:
        """The ledger's spooled and lost rows into their counters, once a second."""
        while True:
            stats = self.ledger.stats
            self.metrics.ledger_spooled.inc(stats.spooled - self._spooled_seen)
            self.metrics.ledger_lost.inc(stats.lost - self._lost_seen)
            self._spooled_seen, self._lost_seen = stats.spooled, stats.lost
            await self.clock.sleep(LEDGER_METRICS_S)

    def _ledger_state(self, state: LedgerState) -> None:
        self.metrics.ledger_db_up.set(1 if state is LedgerState.UP else 0)
