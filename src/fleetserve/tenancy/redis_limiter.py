"""`RedisLimiter`: the `Limiter` contract exact across every worker and gateway replica.

Admissions go to lua/admit.lua and settlements to lua/settle.lua: the script checks and
records all of a request's limits atomically, on the Redis server's clock (`TIME`; Redis 7
replicates scripts by their effects, so reading it is allowed), so no replica's clock matters
and two replicas cannot both take the last slot. The calls a process makes in one event-loop
iteration for the same tenant and key go as one EVALSHA (`_Batches`): the script takes them
one after the other, as if they had come one by one, and the gateway pays one call's CPU for
all of them (benchmarks/tenancy_overhead.py). A lone request waits for nothing but the end of
its loop iteration, when the RESP client writes anyway. The semantics are LocalLimiter's
(tenancy/local_limiter.py); tests/integration/test_limiter_contract.py runs one suite against
both.

Keys (`<prefix>:{t:<tenant>}:...`) all carry the tenant's hash tag, so one script touches one
Redis Cluster slot; a key's own limits live under its tenant's tag too:

    {t:T}:rpm, {t:T}:k:K:rpm           ZSET request id -> admission time (us): the RPM log
    {t:T}:tpm + :tpm:n, {t:T}:k:K:...  ZSET id -> time, HASH 'r:'id -> tokens and 'sum'
    {t:T}:conc, {t:T}:k:K:conc         ZSET id -> lease expiry (us)
    {t:T}:budget                       HASH 's:'period spent, 'h:'period reserved,
                                       'r:'id -> 'period amount', 'cur'/'prev' periods kept
    {t:T}:budget:exp                   ZSET id -> reservation expiry (us)

Window and lease keys expire on their own once idle (garbage collection only: the scripts
trim by score); a budget hash lives until a day past its period's end (`total`: forever).

Errors from Redis (refused connection, timeout) propagate as `redis.exceptions.RedisError`:
`SharedLimiter` turns them into fail-closed rejections or the local fallback.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError

from fleetserve.clock import Clock, RealClock
from fleetserve.tenancy.limiter import Admission, Estimate, Quota, Rejection, RejectReason
from fleetserve.tenancy.local_limiter import (
    BUDGET_BUSY_RETRY_S,
    CONCURRENCY_RETRY_S,
    DEFAULT_LEASE_TTL_S,
    DEFAULT_WINDOW_S,
    KEY,
    NEVER_RETRY_S,
    TENANT,
    budget_state,
)
from fleetserve.tenancy.model import ApiKey, BudgetPeriod, Limits, Principal, Tenant
from fleetserve.tenancy.periods import DAY_S, Period, period_name, period_of
from fleetserve.tenancy.reservations import prompt_cost, worst_case_micro_usd
from fleetserve.tenancy.scripts import LuaScript, ScriptRunner, refused, script
from fleetserve.transport.resp import RespClient

DEFAULT_PREFIX = "fleetserve"
DEFAULT_TIMEOUT_S = 0.5
DEFAULT_CONNECT_TIMEOUT_S = 1.0
DEFAULT_MAX_CONNECTIONS = 64
_US = 1_000_000
_DUPLICATE = 2  # admit.lua: the request id is already admitted
_KEY_CACHE = 10_000  # key-name tuples kept; cleared past this
MAX_BATCH = 64  # requests in one script call (the script blocks Redis while it runs)


def connect(
    url: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> Redis:
    """A client on a bounded pool with short timeouts and no retries: a limiter must answer
    at once, and an admission retried after a timeout could be recorded twice. Connecting
    (once per pooled connection, with its handshake) may take longer than a command: a burst
    of requests opens the whole pool at once, and a busy event loop reads the handshakes
    late; a refused connection fails at once either way."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,  # waiting for a free connection
        socket_timeout=timeout_s,
        socket_connect_timeout=connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)  # the client owns the pool: closing it closes the pool


@dataclass(slots=True)
class _Batch:
    keys: list[str]
    args: list[str | int]  # the shared arguments, then each request's
    futures: list[asyncio.Future[Any]] = field(default_factory=list)


class _Batches:
    """Script calls for the same KEYS and shared arguments, gathered over one event-loop
    iteration and sent as one call; each caller's future gets its part of the reply."""

    def __init__(self, runner: ScriptRunner, lua: LuaScript, one_reply_each: bool) -> None:
        self._runner = runner
        self._lua = lua
        self._one_reply_each = one_reply_each  # else every caller gets None
        self._pending: dict[Hashable, _Batch] = {}
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def submit(
        self, group: Hashable, keys: list[str], shared: Sequence[str | int],
        own: Sequence[str | int],
    ) -> asyncio.Future[Any]:  # fmt: skip
        loop = asyncio.get_running_loop()
        batch = self._pending.get(group)
        if batch is None:
            batch = self._pending[group] = _Batch(keys, list(shared))
        batch.args.extend(own)
        future: asyncio.Future[Any] = loop.create_future()
        batch.futures.append(future)
        if len(batch.futures) >= MAX_BATCH:
            del self._pending[group]
            self._send(batch)
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for batch in pending.values():
            self._send(batch)

    def _send(self, batch: _Batch) -> None:
        task = asyncio.get_running_loop().create_task(self._call(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _call(self, batch: _Batch) -> None:
        futures = batch.futures
        try:
            reply = await self._runner.run(self._lua, batch.keys, batch.args)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else ConnectionError("the limiter stopped")
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        if self._one_reply_each and (not isinstance(reply, list) or len(reply) != len(futures)):
            wrong = ResponseError(f"{self._lua.name}: {len(futures)} calls, reply {reply!r:.80}")
            for future in futures:
                if not future.done():
                    future.set_exception(wrong)
            return
        for i, future in enumerate(futures):
            if not future.done():  # its caller may have gone
                future.set_result(reply[i] if self._one_reply_each else None)


def _us(seconds: float) -> int:
    return round(seconds * _US)


def _limit(value: int | None) -> int:
    return 0 if value is None else value


def _quota(limit: int, remaining: int, reset_us: int) -> Quota | None:
    return None if limit == 0 else Quota(int(limit), int(remaining), int(reset_us) / _US)


class RedisLimiter:
    """Limits and budgets shared by every process that uses the same Redis and prefix."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        window_s: float = DEFAULT_WINDOW_S,
        owns_client: bool = False,
        clock: Clock | None = None,
        test_clock: Clock | None = None,
        scripts: RespClient | None = None,
    ) -> None:
        """`clock` only times the expiry of seeded counters; `test_clock` (tests only)
        replaces the server's TIME in the scripts with its `wall()`; `scripts`, when given,
        runs the scripts (the hot path) instead of `redis`, which keeps PING and the
        pipelined renewals."""
        if lease_ttl_s <= 0 or window_s <= 0:
            raise ValueError(f"need lease_ttl_s > 0 and window_s > 0: {lease_ttl_s}, {window_s}")
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix may not hold braces (hash tags): {prefix!r}")
        self._redis = redis
        self._scripts = scripts
        self._runner = ScriptRunner(scripts if scripts is not None else redis)
        self.prefix = prefix
        self.lease_ttl_s = lease_ttl_s
        self.window_s = window_s
        self._owns_client = owns_client
        self._clock = clock or RealClock()
        self._test_clock = test_clock
        self._window_us = _us(window_s)
        self._ttl_us = _us(lease_ttl_s)
        self._keys: dict[tuple[str, str], tuple[str, ...]] = {}
        # (tenant, key) -> (Tenant, ApiKey, shared arguments, batch group, KEYS) of admit.lua
        self._admit_cache: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._admit = script("admit.lua")
        self._settle = script("settle.lua")
        self._admits = _Batches(self._runner, self._admit, one_reply_each=True)
        self._settles = _Batches(self._runner, self._settle, one_reply_each=False)
        self._renew = script("renew.lua")
        self._state = script("state.lua")
        self._seed = script("seed.lua")

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        prefix: str = DEFAULT_PREFIX,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        window_s: float = DEFAULT_WINDOW_S,
    ) -> RedisLimiter:
        """A limiter on its own connection pool (closed with it); on plain TCP its scripts
        go over a `RespClient` (one pipelined connection, a third of redis-py's CPU)."""
        client = connect(
            url,
            timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s,
            max_connections=max_connections,
        )
        fast = RespClient(url, timeout_s=timeout_s) if RespClient.supports(url) else None
        return cls(
            client, prefix=prefix, lease_ttl_s=lease_ttl_s, window_s=window_s, owns_client=True,
            scripts=fast,
        )  # fmt: skip

    @property
    def eval_only(self) -> bool:
        """Whether SCRIPT/EVALSHA were refused and scripts go with EVAL."""
        return self._runner.eval_only

    # -- the Limiter protocol ----------------------------------------------------------
    async def admit(self, principal: Principal, estimate: Estimate) -> Admission | Rejection:
        tenant, key = principal.tenant, principal.key
        worst = worst_case_micro_usd(estimate)
        spec = tenant.budget if worst > 0 else None
        if spec is None and not tenant.limits.any and not key.limits.any:
            return Admission(
                estimate.request_id, tenant.name, key.prefix, estimate.tokens, 0, recorded=False
            )
        shared, group, keys = self._admit_args(tenant, key)
        own = (
            estimate.request_id,
            estimate.prompt_tokens,
            estimate.max_tokens,
            "1" if estimate.max_tokens_given else "0",
            worst,
            repr(prompt_cost(estimate)),  # repr round-trips: Lua reads the very same double
            repr(float(estimate.output_micro_usd_per_token)),
        )
        reply = await self._admits.submit(group, keys, shared, own)
        if reply[0] == _DUPLICATE:
            raise ValueError(f"request {estimate.request_id!r} is already admitted")
        (ok, reason, scope, retry_us, capped, tokens, cost, left, *quotas) = reply
        requests = _quota(*quotas[0:3])
        tokens_quota = _quota(*quotas[3:6])
        if not ok:
            return Rejection(
                RejectReason(reason.decode()),
                int(retry_us) / _US,
                scope.decode(),
                requests=requests,
                tokens=tokens_quota,
            )
        return Admission(
            estimate.request_id,
            tenant.name,
            key.prefix,
            tokens_reserved=int(tokens),
            cost_reserved_micro_usd=int(cost),
            max_tokens=int(capped) if int(capped) > 0 else None,
            requests=requests,
            tokens=tokens_quota,
            budget_left_micro_usd=int(left) if left else None,
        )

    async def settle(self, admission: Admission, tokens_used: int, cost_micro_usd: int) -> None:
        if not admission.recorded:
            return
        keys = self._keys_of(admission.tenant, admission.key_prefix)
        shared = (self._now_override(), self._window_us)
        own = (admission.request_id, max(0, tokens_used), max(0, cost_micro_usd))
        await self._settles.submit((keys, shared), list(keys[2:]), shared, own)

    async def renew(self, admissions: Sequence[Admission]) -> None:
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for admission in admissions:
            if admission.recorded:
                groups[(admission.tenant, admission.key_prefix)].append(admission.request_id)
        if not groups:
            return
        calls: list[tuple[list[str], list[str | int]]] = [
            (list(self._keys_of(tenant, key)[6:]), [self._now_override(), self._ttl_us, *ids])
            for (tenant, key), ids in groups.items()
        ]
        if len(calls) == 1:
            await self._runner.run(self._renew, *calls[0])
            return
        await self._run_pipelined(calls)

    async def state(self, principal: Principal) -> dict[str, object]:
        tenant, key = principal.tenant, principal.key
        tl, kl = tenant.limits, key.limits
        args: list[str | int] = [
            self._now_override(),
            self._window_us,
            _limit(tl.rpm),
            _limit(kl.rpm),
            _limit(tl.tpm),
            _limit(kl.tpm),
            _limit(tl.max_concurrent),
            _limit(kl.max_concurrent),
            "" if tenant.budget is None else tenant.budget.period.value,
        ]
        reply = await self._runner.run(
            self._state, list(self._keys_of(tenant.name, key.prefix)), args
        )
        counts = [int(n) for n in reply]
        scopes: dict[str, dict[str, object]] = {
            TENANT: {"name": tenant.name, **_scope_state(tl, counts[0:6:2])},
            KEY: {"prefix": key.prefix, **_scope_state(kl, counts[1:6:2])},
        }
        if tenant.budget is not None:
            start, end, spent, reserved = counts[6:10]
            period = Period(tenant.budget.period, start, None if end < 0 else end)
            scopes[TENANT]["budget"] = budget_state(
                period, tenant.budget.limit_micro_usd, spent, reserved
            )
        return dict(scopes)

    async def seed_spend(self, tenant: Tenant, period_start_s: int, micro_usd: int) -> bool:
        """Start the tenant's spend counter of the period beginning `period_start_s` at
        `micro_usd` (from the ledger, after a Redis or gateway restart), unless it exists
        (SET NX semantics). True if it was set."""
        if tenant.budget is None:
            raise ValueError(f"tenant {tenant.name!r} has no budget to seed")
        if micro_usd < 0:
            raise ValueError(f"spend cannot be negative: {micro_usd}")
        kind = tenant.budget.period
        keep = ""
        if kind is not BudgetPeriod.TOTAL:
            end = period_of(kind, period_start_s).end_s
            assert end is not None
            left_s = end + DAY_S - self._clock.wall()
            keep = str(max(60_000, round(left_s * 1000)))
        name = period_name(kind, period_start_s)
        keys = self._keys_of(tenant.name, "")
        set_ = await self._runner.run(self._seed, [keys[8]], [name, micro_usd, keep])
        return bool(set_)

    async def ping(self) -> None:
        """Raise unless Redis answers."""
        await self._redis.ping()

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()
            if self._scripts is not None:
                await self._scripts.aclose()

    # -- internals ----------------------------------------------------------------------
    def _admit_args(
        self, tenant: Tenant, key: ApiKey
    ) -> tuple[tuple[str | int, ...], Hashable, list[str]]:
        """admit.lua's shared arguments, the batch they group by, and the KEYS: the same for
        every request of a tenant and key (the key cache hands out the same objects, so
        while they stay the same this is one lookup)."""
        found = self._admit_cache.get((tenant.name, key.prefix))
        if found is not None and found[0] is tenant and found[1] is key:
            return found[2], found[3], found[4]
        tl, kl, budget = tenant.limits, key.limits, tenant.budget
        shared: tuple[str | int, ...] = (
            self._now_override(),
            self._window_us,
            self._ttl_us,
            _limit(tl.rpm),
            _limit(kl.rpm),
            _limit(tl.tpm),
            _limit(kl.tpm),
            _limit(tl.max_concurrent),
            _limit(kl.max_concurrent),
            "" if budget is None else budget.limit_micro_usd,
            "" if budget is None else budget.period.value,
            _us(CONCURRENCY_RETRY_S),
            _us(BUDGET_BUSY_RETRY_S),
            _us(NEVER_RETRY_S),
        )
        names = self._keys_of(tenant.name, key.prefix)
        group = (names, shared)
        keys = list(names)
        if self._test_clock is None:  # a test clock's time changes the shared arguments
            if len(self._admit_cache) >= _KEY_CACHE:
                self._admit_cache.clear()
            self._admit_cache[(tenant.name, key.prefix)] = (tenant, key, shared, group, keys)
        return shared, group, keys

    def _now_override(self) -> str:
        return "" if self._test_clock is None else str(_us(self._test_clock.wall()))

    def _keys_of(self, tenant: str, key: str) -> tuple[str, ...]:
        """admit.lua's KEYS: tenant and key RPM, TPM (zset, hash), leases; budget."""
        found = self._keys.get((tenant, key))
        if found is not None:
            return found
        if len(self._keys) >= _KEY_CACHE:
            self._keys.clear()
        t = f"{self.prefix}:{{t:{tenant}}}"
        k = f"{t}:k:{key}"
        found = (
            f"{t}:rpm",
            f"{k}:rpm",
            f"{t}:tpm",
            f"{t}:tpm:n",
            f"{k}:tpm",
            f"{k}:tpm:n",
            f"{t}:conc",
            f"{k}:conc",
            f"{t}:budget",
            f"{t}:budget:exp",
        )
        self._keys[(tenant, key)] = found
        return found

    async def _run_pipelined(self, calls: list[tuple[list[str], list[str | int]]]) -> None:
        """Several renew calls (one per tenant and key) in one round trip."""
        lua = self._renew
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                if self._runner.eval_only:
                    pipe.eval(lua.source, len(keys), *keys, *args)
                else:
                    pipe.evalsha(lua.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
        for (keys, args), result in zip(calls, results, strict=True):
            if isinstance(result, NoScriptError) or (
                isinstance(result, ResponseError) and refused(result)
            ):
                await self._runner.run(lua, keys, args)  # loads it, or switches to EVAL
            elif isinstance(result, Exception):
                raise result


def _scope_state(limits: Limits, counts: list[int]) -> dict[str, object]:
    state: dict[str, object] = {}
    for name, limit, used in zip(
        ("rpm", "tpm", "concurrent"),
        (limits.rpm, limits.tpm, limits.max_concurrent),
        counts,
        strict=True,
    ):
        if limit is not None:
            state[name] = {"used": used, "limit": limit}
    return state
