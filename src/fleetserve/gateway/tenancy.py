"""The gateway's tenancy steps (auth = keys): auth, admission, and accounting.

1. **Auth**: `Authorization: Bearer fs-...` -> the key's tenant (`KeyCache`: looked up by
   prefix, checked by HMAC under the pepper, trusted for `key_cache_ttl_s`; a revocation
   pushed over Redis drops it at once).
2. **Admission**: the model must be one the tenant may use (403), then the limiter checks
   every limit and the budget in one atomic step (429 `rate_limit_exceeded` or
   `insufficient_quota`, 503 when the shared counters are out and fail_closed is set).
   Streams ask the engine for usage (`stream_options.include_usage`) when the client did
   not; the gateway strips that usage chunk on the way back.
3. **Accounting**: the limiter settles to the engine's usage, one row goes to the usage
   ledger, and the tenant's metrics count it. A stream the client cancels is charged its
   prompt (counted by the replica's /tokenize) plus the tokens it was actually sent.

With auth `none` none of this is built, and the hot path costs nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping

import orjson

from fleetserve.clock import Clock
from fleetserve.config import TenancySettings
from fleetserve.errors import (
    ApiError,
    AuthenticationError,
    FleetserveError,
    InsufficientQuotaError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from fleetserve.fleet.fleet import Fleet
from fleetserve.gateway.ticket import Ticket
from fleetserve.gateway.upstream import UpstreamClient
from fleetserve.protocol.inspect import RequestInfo, rewrite_body
from fleetserve.protocol.sse import UsageTap
from fleetserve.telemetry.tenant_metrics import UNKNOWN, TenantMetrics
from fleetserve.tenancy.keys import matches, parse_bearer
from fleetserve.tenancy.limiter import Admission, Estimate, Limiter, Quota, Rejection, RejectReason
from fleetserve.tenancy.model import (
    MICRO_USD,
    ApiKey,
    FinishReason,
    Price,
    Principal,
    Tenant,
    UsageRow,
    cost_micro_usd,
)

log = logging.getLogger("fleetserve.gateway.tenancy")

FindKey = Callable[[str], Awaitable[tuple[ApiKey, Tenant] | None]]
"""The store's lookup of a key by its public prefix."""
CountPrompt = Callable[[str, bytes], Awaitable[int | None]]
"""(replica id, request body) -> the prompt's tokens as that replica counts them, or None."""
RecordUsage = Callable[[UsageRow], None]
SeedBudget = Callable[[Tenant], Awaitable[None] | None]
"""Seeds a tenant's budget counter when its period is new to this process: an awaitable to
wait for, or None when there is nothing to do (the hot path: no coroutine is made)."""
"""Before a budgeted tenant's first admission in a period: its spend so far into the limiter."""

REQUEST_ID_HEADER = b"x-request-id"  # the ledger row's id, for a client to match its answers
BYTES_PER_TOKEN = 4  # a rough prompt size for fair queueing, before the engine tells


_Entry = tuple[float, tuple[ApiKey, Tenant] | None]
"""When a prefix was looked up, and what the store had for it."""


class KeyCache:
    """Keys by prefix, as the store had them at most `ttl_s` ago; misses for one prefix
    wait on one lookup; unknown prefixes are remembered too (bounded), so junk keys cost
    no database query each."""

    def __init__(
        self, find: FindKey, pepper: bytes, clock: Clock, ttl_s: float, max_entries: int = 65536
    ) -> None:
        self._find = find
        self._pepper = pepper
        self._clock = clock
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[float, tuple[ApiKey, Tenant] | None]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[tuple[ApiKey, Tenant] | None]] = {}
        # Headers whose key matched its digest, with the prefix entry they matched: a repeat
        # costs one lookup, no parse and no HMAC, while that entry is current.
        self._verified: dict[bytes, tuple[str, _Entry, Principal]] = {}
        self._store_down = False  # one log line per outage of the store

    def _store_failed(
        self, prefix: str, entry: _Entry | None, exc: Exception
    ) -> tuple[ApiKey, Tenant] | ServiceUnavailableError | None:
        """The store could not be read: a key read before keeps its last answer (asked
        again after another TTL), so a database outage does not refuse known keys; an
        unknown one gets a 503 that names nothing of the database."""
        if not self._store_down:
            self._store_down = True
            log.warning(
                "the tenant store cannot be read (%s): known keys are served as last read",
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
            )
        if entry is None:
            return ServiceUnavailableError(
                "API keys cannot be checked now (the tenant store is unreachable); retry soon",
                headers={"Retry-After": "1"},
            )
        self._entries[prefix] = (self._clock.now(), entry[1])
        return entry[1]

    def forget(self, prefix: str) -> None:
        self._entries.pop(prefix, None)  # verified headers of it no longer match an entry

    def clear(self) -> None:
        self._entries.clear()
        self._verified.clear()

    async def principal(self, authorization: bytes | None) -> Principal:
        """The request's tenant and key, or AuthenticationError (401 invalid_api_key)."""
        if authorization is not None:
            seen = self._verified.get(authorization)
            if seen is not None:
                prefix, entry, principal = seen
                if (
                    self._entries.get(prefix) is entry
                    and self._clock.now() - entry[0] < self._ttl_s
                    and principal.key.usable(self._clock.wall())
                ):
                    return principal
        principal = await self._verify(authorization)
        current = self._entries.get(principal.key.prefix)
        if authorization is not None and current is not None:
            if len(self._verified) >= self._max:
                self._verified.clear()
            self._verified[authorization] = (principal.key.prefix, current, principal)
        return principal

    async def _verify(self, authorization: bytes | None) -> Principal:
        given = None if authorization is None else authorization.decode("latin-1")
        parsed = parse_bearer(given)
        if parsed is None:
            raise AuthenticationError(
                "missing API key: send `Authorization: Bearer fs-...`"
                if not given
                else "malformed API key: expected `Authorization: Bearer fs-<prefix>-<secret>`"
            )
        found = await self._lookup(parsed.prefix)
        shown = f"fs-{parsed.prefix}-…"
        if found is None or not matches(self._pepper, parsed, found[0].digest):
            raise AuthenticationError(f"invalid API key {shown}")
        key, tenant = found
        now = self._clock.wall()
        if key.revoked_at is not None and key.revoked_at <= now:
            raise AuthenticationError(f"the API key {shown} was revoked")
        if not key.usable(now):
            raise AuthenticationError(f"the API key {shown} has expired")
        return Principal(tenant, key)

    async def _lookup(self, prefix: str) -> tuple[ApiKey, Tenant] | None:
        now = self._clock.now()
        entry = self._entries.get(prefix)
        if entry is not None and now - entry[0] < self._ttl_s:
            return entry[1]
        pending = self._pending.get(prefix)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[tuple[ApiKey, Tenant] | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[prefix] = future
        found: tuple[ApiKey, Tenant] | None
        try:
            found = await self._find(prefix)
        except Exception as exc:  # noqa: BLE001 - any store failure is an outage here
            fallback = self._store_failed(prefix, entry, exc)
            if isinstance(fallback, ServiceUnavailableError):
                future.set_exception(fallback)
                future.exception()  # retrieved: waiters re-raise it, no "never retrieved"
                raise fallback from None
            found = fallback
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        else:
            if self._store_down:
                self._store_down = False
                log.warning("the tenant store answers again: keys are read from it")
        finally:
            del self._pending[prefix]
        future.set_result(found)
        self._entries[prefix] = (now, found)
        self._entries.move_to_end(prefix)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        return found


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


_RATELIMIT_NAMES = {
    what: tuple(f"x-ratelimit-{part}-{what}".encode() for part in ("limit", "remaining", "reset"))
    for what in ("requests", "tokens")
}


def ratelimit_headers(requests: Quota | None, tokens: Quota | None) -> list[tuple[bytes, bytes]]:
    """OpenAI's `x-ratelimit-*` headers for the limits that apply."""
    out: list[tuple[bytes, bytes]] = []
    for what, quota in (("requests", requests), ("tokens", tokens)):
        if quota is None:
            continue
        limit, remaining, reset = _RATELIMIT_NAMES[what]
        out += [
            (limit, b"%d" % quota.limit),
            (remaining, b"%d" % max(0, quota.remaining)),
            (reset, _duration(quota.reset_s).encode()),
        ]
    return out


def _as_headers(pairs: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in pairs}


class TenantGate:
    """Auth, admission and accounting for one gateway worker."""

    def __init__(
        self,
        keys: KeyCache,
        limiter: Limiter,
        record: RecordUsage,
        prices: Mapping[str, Price],
        settings: TenancySettings,
        clock: Clock,
        metrics: TenantMetrics,
        count_prompt: CountPrompt | None = None,
        *,
        seed: SeedBudget | None = None,
    ) -> None:
        self.keys = keys
        self.limiter = limiter
        self.record = record
        self.prices = dict(prices)
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.count_prompt = count_prompt
        self.seed = seed
        self._leased: dict[str, Admission] = {}  # admissions holding concurrency leases
        self._alerted: set[str] = set()  # tenants told about their budget's soft alert
        self._renewer: asyncio.Task[None] | None = None

    # -- lifecycle: the lease renewer ------------------------------------------------------
    async def start(self) -> None:
        self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None

    async def _renew_leases(self) -> None:
        period = self.settings.lease_ttl_s / 3
        while True:
            await self.clock.sleep(period)
            if self._leased:
                try:
                    await self.limiter.renew(list(self._leased.values()))
                except Exception:  # the limiter logs its own outages; try again next period
                    log.debug("lease renewal failed", exc_info=True)

    # -- auth and admission ----------------------------------------------------------------
    def rejected_key(self) -> None:
        """A request refused at auth (401): a rejection of tenant `-` (no tenant's request)."""
        self.metrics.rejected(UNKNOWN, "invalid_key")

    async def admit(
        self, principal: Principal, info: RequestInfo, body: bytes, request_id: str
    ) -> Ticket:
        """The authenticated request's ticket, or the ApiError to answer with (nothing is
        consumed by a refusal)."""
        tenant = principal.tenant
        label = self.metrics.label(tenant.name)
        if not tenant.may_use(info.model):
            self.metrics.rejected(label, "model_not_allowed")
            self.metrics.counted(label, 403)
            raise PermissionDeniedError(
                f"tenant {tenant.name!r} may not use model {info.model!r}", param="model"
            )
        price = self.prices.get(info.model)
        max_tokens = info.max_tokens
        estimate = Estimate(
            request_id=request_id,
            prompt_tokens=len(body),  # an upper bound: a token is at least a byte of JSON
            max_tokens=self.settings.default_max_tokens if max_tokens is None else max_tokens,
            max_tokens_given=max_tokens is not None,
            input_micro_usd_per_token=price.input_per_mtok_usd if price else 0.0,
            output_micro_usd_per_token=price.output_per_mtok_usd if price else 0.0,
        )
        if tenant.budget is not None and self.seed is not None:
            seeding = self.seed(tenant)
            if seeding is not None:
                await seeding
        verdict = await self.limiter.admit(principal, estimate)
        if isinstance(verdict, Rejection):
            self.metrics.rejected(label, verdict.reason.value)
            refusal = _refusal(verdict, principal)
            self.metrics.counted(label, refusal.status)
            raise refusal
        self._budget_seen(principal, verdict, label)
        add_usage = info.stream and not info.include_usage
        sent = rewrite_body(body, info, include_usage=add_usage, max_tokens=verdict.max_tokens)
        ticket = Ticket(
            principal, verdict, request_id, sent, price,
            prompt_estimate=max(1, len(body) // BYTES_PER_TOKEN),
            started_at=self.clock.wall(),
            max_tokens=verdict.max_tokens if verdict.max_tokens is not None else max_tokens,
            tap=UsageTap(strip=add_usage) if info.stream else None,
        )  # fmt: skip
        if verdict.recorded:  # leases and reservations to keep alive while it runs
            self._leased[request_id] = verdict
        return ticket

    def headers(self, ticket: Ticket) -> list[tuple[bytes, bytes]]:
        """The answer's `x-request-id` (its ledger row's id) and rate-limit headers."""
        limits = ratelimit_headers(ticket.admission.requests, ticket.admission.tokens)
        return [(REQUEST_ID_HEADER, ticket.request_id.encode()), *limits]

    def _budget_seen(self, principal: Principal, admission: Admission, label: str) -> None:
        budget = principal.tenant.budget
        left = admission.budget_left_micro_usd
        if budget is None or left is None:
            return
        name = principal.tenant.name
        spent_frac = 1 - left / budget.limit_micro_usd if budget.limit_micro_usd else 1.0
        self.metrics.budget(label, left / MICRO_USD, spent_frac, budget.soft_alert_frac)
        if spent_frac >= budget.soft_alert_frac and name not in self._alerted:
            self._alerted.add(name)
            log.warning(
                "tenant %r has used %.0f%% of its %s budget of $%.2f",
                name, 100 * spent_frac, budget.period.value, budget.limit_micro_usd / MICRO_USD,
            )  # fmt: skip

    # -- accounting ------------------------------------------------------------------------
    async def finish(
        self,
        ticket: Ticket,
        *,
        model: str,
        replica: str | None,
        status: int,
        cancelled: bool,
        failed: bool,
        queue_s: float,
        ttft_s: float | None,
        e2e_s: float,
    ) -> None:
        """Settle the request's reservations, write its ledger row, count it."""
        estimated = False
        engine_usage = ticket.usage if ticket.tap is None else ticket.tap.usage
        if engine_usage is not None:
            prompt, completion = engine_usage
        elif replica is None or (status >= 400 and not cancelled and not ticket.output_events):
            prompt, completion = 0, 0  # never sent, or refused before the engine did any work
        else:
            counted = None
            if self.count_prompt is not None:
                counted = await self.count_prompt(replica, ticket.body)
            prompt = counted if counted is not None else ticket.prompt_estimate
            completion = ticket.output_events
            estimated = counted is None or not cancelled  # the engine's own usage is missing
        cost = cost_micro_usd(ticket.price, prompt, completion)
        admission = ticket.admission
        if self._leased.pop(ticket.request_id, None) is not None:
            try:
                await self.limiter.settle(admission, prompt + completion, cost)
            except Exception:  # the limiter logs its outages; reservations expire on their own
                log.debug("settlement failed", exc_info=True)
        if cancelled:
            reason = FinishReason.CANCELLED
        elif failed or status >= 400:
            reason = FinishReason.ERROR
        elif ticket.max_tokens is not None and completion >= ticket.max_tokens:
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.STOP
        now = self.clock.wall()
        row = UsageRow(
            request_id=ticket.request_id, tenant=ticket.tenant,
            key_prefix=ticket.principal.key.prefix, model=model, replica=replica, status=status,
            prompt_tokens=prompt, completion_tokens=completion, cost_micro_usd=cost,
            queue_s=queue_s, ttft_s=ttft_s, e2e_s=e2e_s, started_at=ticket.started_at,
            ended_at=now, finish_reason=reason, usage_estimated=estimated,
        )  # fmt: skip
        self.record(row)
        metrics = self.metrics
        metrics.answered(metrics.label(ticket.tenant), status, prompt, completion,
                         cost / MICRO_USD)  # fmt: skip


def _refusal(rejection: Rejection, principal: Principal) -> ApiError:
    headers = _as_headers(ratelimit_headers(rejection.requests, rejection.tokens))
    retry = str(max(1, math.ceil(rejection.retry_after_s)))
    whose = (
        f"tenant {principal.tenant.name!r}"
        if rejection.scope == "tenant"
        else f"key fs-{principal.key.prefix}-…"
    )
    reason = rejection.reason
    if reason is RejectReason.BUDGET:
        return InsufficientQuotaError(
            f"{whose} has spent its budget for this period; retry after {retry} s or raise it",
            headers={"Retry-After": retry, **headers},
        )
    if reason is RejectReason.UNAVAILABLE:
        return ServiceUnavailableError(
            "rate limits cannot be checked now (their shared store is unreachable); retry soon",
            headers={"Retry-After": retry},
        )
    what = {
        RejectReason.RPM: "requests per minute",
        RejectReason.TPM: "tokens per minute",
        RejectReason.CONCURRENCY: "concurrent requests",
    }[reason]
    return RateLimitError(
        f"rate limit reached for {whose}: {what}; retry after {retry} s",
        headers={"Retry-After": retry, **headers},
    )


TOKENIZE_TIMEOUT_S = 2.0
TOKENIZING_ENGINES = frozenset({"vllm", "sim"})  # those with vLLM's POST /tokenize


class PromptCounter:
    """A cancelled stream's prompt tokens, as the replica that served it counts them (vLLM's
    POST /tokenize, which applies the chat template). Off the hot path: only cancelled
    streams and answers without usage ask."""

    def __init__(self, fleet: Fleet, upstream: UpstreamClient, engines: Mapping[str, str]) -> None:
        self.fleet = fleet
        self.upstream = upstream
        self.engines = dict(engines)

    async def __call__(self, replica_id: str, body: bytes) -> int | None:
        replica = self.fleet.get(replica_id)
        if replica is None or self.engines.get(replica.model) not in TOKENIZING_ENGINES:
            return None
        try:
            request = orjson.loads(body)
            ask = {k: request[k] for k in ("model", "messages", "prompt") if k in request}
            response = await self.upstream.send(
                replica.url + "/tokenize", orjson.dumps(ask), "tokenize", TOKENIZE_TIMEOUT_S
            )
            count = orjson.loads(response.body).get("count")
        except (FleetserveError, orjson.JSONDecodeError, AttributeError):
            return None
        return count if type(count) is int and response.status == 200 else None
