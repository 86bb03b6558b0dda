"""Tenant and key administration as JSON in, JSON out: what the admin API serves and what the
CLI runs directly against the database. One set of checks for both.

Inputs are validated here (400 `invalid_request_error` naming the field); the store checks
again what it writes. A key's token appears once, in the answer that created it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleetserve.clock import Clock
from fleetserve.errors import InvalidRequestError, NotFoundError
from fleetserve.tenancy.changes import TenantChanges
from fleetserve.tenancy.fairness import Priority
from fleetserve.tenancy.model import (
    MICRO_USD,
    NAME_PATTERN,
    ApiKey,
    BudgetPeriod,
    BudgetSpec,
    Limits,
    Tenant,
    UsageGroupBy,
)
from fleetserve.tenancy.store import TenancyStore

PriorityName = Literal["interactive", "standard", "batch"]
DEFAULT_GRACE_S = 3600.0  # a rotated key stays valid this long unless told otherwise
MAX_NAME = 63
MAX_LIMIT = 10**12

_Limit = Field(None, ge=1, le=MAX_LIMIT)


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantFields(_Input):
    weight: float = Field(1.0, gt=0, le=1000)
    priority: PriorityName = "standard"
    models: list[str] | None = Field(None, max_length=1000)
    rpm: int | None = _Limit
    tpm: int | None = _Limit
    max_concurrent: int | None = _Limit
    budget_usd: float | None = Field(None, ge=0, le=1e9)
    budget_period: BudgetPeriod = BudgetPeriod.MONTH
    soft_alert_frac: float = Field(0.8, gt=0, le=1)


class TenantIn(TenantFields):
    name: str = Field(min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN.pattern)


class TenantPatch(_Input):
    """Only the fields given change; null clears a limit, the budget, or the model list."""

    weight: float | None = Field(None, gt=0, le=1000)
    priority: PriorityName | None = None
    models: list[str] | None = Field(None, max_length=1000)
    rpm: int | None = _Limit
    tpm: int | None = _Limit
    max_concurrent: int | None = _Limit
    budget_usd: float | None = Field(None, ge=0, le=1e9)
    budget_period: BudgetPeriod | None = None
    soft_alert_frac: float | None = Field(None, gt=0, le=1)


class KeyIn(_Input):
    tenant: str = Field(min_length=1, max_length=MAX_NAME)
    label: str | None = Field(None, max_length=200)
    expires_in_s: float | None = Field(None, gt=0, le=100 * 365 * 86400)
    rpm: int | None = _Limit
    tpm: int | None = _Limit
    max_concurrent: int | None = _Limit


class RotateIn(_Input):
    grace_s: float = Field(DEFAULT_GRACE_S, ge=0, le=365 * 86400)
    expires_in_s: float | None = Field(None, gt=0, le=100 * 365 * 86400)


def parse(model: type[_Input], data: object) -> Any:
    """`data` as `model`, or InvalidRequestError naming the first bad field (one line)."""
    if not isinstance(data, Mapping):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequestError(f"{where}: {first['msg']}", param=where) from None


def _micro(usd: float) -> int:
    return round(usd * MICRO_USD)


def tenant_json(tenant: Tenant) -> dict[str, object]:
    budget = tenant.budget
    return {
        "name": tenant.name,
        "weight": tenant.weight,
        "priority": tenant.priority.name.lower(),
        "models": None if tenant.models is None else sorted(tenant.models),
        "rpm": tenant.limits.rpm,
        "tpm": tenant.limits.tpm,
        "max_concurrent": tenant.limits.max_concurrent,
        "budget": None
        if budget is None
        else {
            "usd": budget.limit_micro_usd / MICRO_USD,
            "period": budget.period.value,
            "soft_alert_frac": budget.soft_alert_frac,
        },
        "created_at": tenant.created_at,
    }


def key_state(key: ApiKey, now: float) -> str:
    if key.revoked_at is not None and key.revoked_at <= now:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def key_json(key: ApiKey, now: float) -> dict[str, object]:
    return {
        "id": f"fs-{key.prefix}",
        "prefix": key.prefix,
        "tenant": key.tenant,
        "label": key.label,
        "rpm": key.limits.rpm,
        "tpm": key.limits.tpm,
        "max_concurrent": key.limits.max_concurrent,
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "state": key_state(key, now),
    }


def _tenant_from(spec: TenantIn) -> Tenant:
    budget = None
    if spec.budget_usd is not None:
        budget = BudgetSpec(_micro(spec.budget_usd), spec.budget_period, spec.soft_alert_frac)
    return Tenant(
        name=spec.name,
        weight=spec.weight,
        priority=Priority[spec.priority.upper()],
        models=None if spec.models is None else frozenset(spec.models),
        limits=Limits(spec.rpm, spec.tpm, spec.max_concurrent),
        budget=budget,
    )


def _changes(patch: TenantPatch, current: Tenant) -> TenantChanges:
    given = patch.model_fields_set
    fields: dict[str, Any] = {}
    for name in ("rpm", "tpm", "max_concurrent"):
        if name in given:
            fields[name] = getattr(patch, name)
    if "weight" in given:
        if patch.weight is None:
            raise InvalidRequestError("weight: cannot be null", param="weight")
        fields["weight"] = patch.weight
    if "priority" in given:
        if patch.priority is None:
            raise InvalidRequestError("priority: cannot be null", param="priority")
        fields["priority"] = Priority[patch.priority.upper()]
    if "models" in given:
        fields["models"] = None if patch.models is None else frozenset(patch.models)
    budget_fields = {"budget_usd", "budget_period", "soft_alert_frac"} & given
    if budget_fields:
        if "budget_usd" in given and patch.budget_usd is None:
            fields["budget"] = None
        else:
            old = current.budget
            usd = patch.budget_usd
            if usd is None and old is None:
                raise InvalidRequestError(
                    "budget_usd: the tenant has no budget; give budget_usd", param="budget_usd"
                )
            fields["budget"] = BudgetSpec(
                _micro(usd) if usd is not None else old.limit_micro_usd,  # type: ignore[union-attr]
                patch.budget_period or (old.period if old else BudgetPeriod.MONTH),
                patch.soft_alert_frac or (old.soft_alert_frac if old else 0.8),
            )
    return TenantChanges(**fields)


class TenancyAdmin:
    """The admin operations over one store. `on_key_change(prefix)` is told of every key
    revoked, rotated or deleted with its tenant, so gateways drop it from their caches."""

    def __init__(
        self,
        store: TenancyStore,
        pepper: bytes,
        clock: Clock,
        on_key_change: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.pepper = pepper
        self.clock = clock
        self._changed = on_key_change or (lambda _prefix: None)

    # -- tenants ---------------------------------------------------------------------------
    async def create_tenant(self, body: object) -> dict[str, object]:
        tenant = await self.store.create_tenant(_tenant_from(parse(TenantIn, body)))
        return tenant_json(tenant)

    async def list_tenants(self) -> list[dict[str, object]]:
        return [tenant_json(t) for t in await self.store.list_tenants()]

    async def get_tenant(self, name: str) -> dict[str, object]:
        return tenant_json(await self._tenant(name))

    async def update_tenant(self, name: str, body: object) -> dict[str, object]:
        patch = parse(TenantPatch, body)
        current = await self._tenant(name)
        changes = _changes(patch, current)
        updated = await self.store.update_tenant(name, changes)
        for key in await self.store.list_keys(name):
            self._changed(key.prefix)  # cached principals carry the tenant's limits
        return tenant_json(updated)

    async def delete_tenant(self, name: str) -> dict[str, object]:
        keys = await self.store.list_keys(name)
        if not await self.store.delete_tenant(name):
            raise NotFoundError(f"no tenant {name!r}", param="name")
        for key in keys:
            self._changed(key.prefix)
        return {"name": name, "deleted": True, "keys_deleted": len(keys)}

    async def _tenant(self, name: str) -> Tenant:
        tenant = await self.store.get_tenant(name)
        if tenant is None:
            raise NotFoundError(f"no tenant {name!r}", param="name")
        return tenant

    # -- keys ------------------------------------------------------------------------------
    async def create_key(self, body: object) -> dict[str, object]:
        spec: KeyIn = parse(KeyIn, body)
        now = self.clock.wall()
        expires = None if spec.expires_in_s is None else now + spec.expires_in_s
        key, token = await self.store.create_key(
            spec.tenant, self.pepper, label=spec.label, expires_at=expires,
            limits=Limits(spec.rpm, spec.tpm, spec.max_concurrent), now=now,
        )  # fmt: skip
        return {**key_json(key, now), "key": token}

    async def list_keys(self, tenant: str | None = None) -> list[dict[str, object]]:
        now = self.clock.wall()
        return [key_json(k, now) for k in await self.store.list_keys(tenant)]

    async def rotate_key(self, prefix: str, body: object) -> dict[str, object]:
        spec: RotateIn = parse(RotateIn, body or {})
        now = self.clock.wall()
        expires = None if spec.expires_in_s is None else now + spec.expires_in_s
        key, token = await self.store.rotate_key(
            _prefix(prefix), self.pepper, grace_s=spec.grace_s, now=now, expires_at=expires
        )
        self._changed(_prefix(prefix))
        return {**key_json(key, now), "key": token, "replaces": f"fs-{_prefix(prefix)}",
                "old_valid_until": now + spec.grace_s}  # fmt: skip

    async def revoke_key(self, prefix: str) -> dict[str, object]:
        now = self.clock.wall()
        key = await self.store.revoke_key(_prefix(prefix), now=now)
        self._changed(key.prefix)
        return key_json(key, now)

    # -- usage -----------------------------------------------------------------------------
    async def usage(
        self,
        *,
        since_s: float | None = None,
        tenant: str | None = None,
        by: UsageGroupBy = "tenant",
    ) -> list[dict[str, object]]:
        since = None if since_s is None else self.clock.wall() - since_s
        groups = await self.store.usage(since=since, tenant=tenant, by=by)
        return [
            {
                "group": g.group,
                "requests": g.requests,
                "errors": g.errors,
                "prompt_tokens": g.prompt_tokens,
                "completion_tokens": g.completion_tokens,
                "cost_usd": g.cost_micro_usd / MICRO_USD,
                "ttft_p95_s": _number(g.ttft_p95_s),
            }
            for g in groups
        ]


def _number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _prefix(key_id: str) -> str:
    """A key's id as users give it: `fs-PREFIX`, the prefix alone, or the whole key."""
    parts = key_id.split("-")
    if len(parts) >= 2 and parts[0] == "fs":
        return parts[1]
    return key_id
