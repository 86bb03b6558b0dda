"""Between the store's rows and tenancy's model: what a row holds for a Tenant, an ApiKey or
a UsageRow and back, and the checks a tenant or key passes before it is written.

A check that fails is InvalidRequestError (400) naming the field; every value reaches the
database as a bound parameter, never as SQL text, so a name that looks like SQL is only a
bad name.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sqlalchemy.engine import RowMapping

from fleetserve.errors import InvalidRequestError
from fleetserve.tenancy.model import (
    ApiKey,
    BudgetPeriod,
    BudgetSpec,
    FinishReason,
    Limits,
    Priority,
    Tenant,
    UsageRow,
    valid_name,
)

MAX_WEIGHT = 1e6
MAX_RPM = 10**9
MAX_TPM = 10**12
MAX_CONCURRENT = 10**6
MAX_BUDGET_MICRO_USD = 10**15  # a billion dollars
MAX_MODELS = 1000
MAX_MODEL_NAME = 255
MAX_LABEL = 200
_SHOWN = 40  # characters of a bad value quoted back in an error

USAGE_FIELDS = (
    "request_id", "tenant", "key_prefix", "model", "replica", "status", "prompt_tokens",
    "completion_tokens", "cost_micro_usd", "queue_s", "ttft_s", "e2e_s", "started_at",
    "ended_at", "finish_reason", "usage_estimated",
)  # fmt: skip


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "...")


def check_name(name: object, what: str = "tenant name") -> str:
    if not isinstance(name, str) or not valid_name(name):
        shown = _shown(name) if isinstance(name, str) else type(name).__name__
        raise InvalidRequestError(
            f"invalid {what} {shown}: 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            param="name",
        )
    return name


def _check_int(value: int | None, name: str, low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(
            f"invalid {name} {value!r}: an integer from {low} to {high:,}, or none", param=name
        )


def check_limits(limits: Limits) -> None:
    _check_int(limits.rpm, "rpm", 1, MAX_RPM)
    _check_int(limits.tpm, "tpm", 1, MAX_TPM)
    _check_int(limits.max_concurrent, "max_concurrent", 1, MAX_CONCURRENT)


def check_tenant(tenant: Tenant) -> None:
    """InvalidRequestError unless every field of `tenant` can be stored and makes sense."""
    check_name(tenant.name)
    weight = tenant.weight
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not math.isfinite(weight)
        or not 0 < weight <= MAX_WEIGHT
    ):
        raise InvalidRequestError(
            f"invalid weight {weight!r}: a number above 0, at most {MAX_WEIGHT:g}", param="weight"
        )
    if not isinstance(tenant.priority, Priority):
        raise InvalidRequestError(
            f"invalid priority {tenant.priority!r}: one of {_priorities()}", param="priority"
        )
    if tenant.models is not None:
        _check_models(tenant.models)
    check_limits(tenant.limits)
    if tenant.budget is not None:
        _check_budget(tenant.budget)
    if not math.isfinite(tenant.created_at):
        raise InvalidRequestError("invalid created_at: not a finite time", param="created_at")


def _priorities() -> str:
    return ", ".join(p.name.lower() for p in Priority)


def _check_models(models: frozenset[str]) -> None:
    if len(models) > MAX_MODELS:
        raise InvalidRequestError(
            f"too many models ({len(models)}): at most {MAX_MODELS}", param="models"
        )
    for model in models:
        if (
            not isinstance(model, str)
            or not 0 < len(model) <= MAX_MODEL_NAME
            or not model.isprintable()
        ):
            shown = _shown(model) if isinstance(model, str) else type(model).__name__
            raise InvalidRequestError(
                f"invalid model name {shown}: 1-{MAX_MODEL_NAME} printable characters",
                param="models",
            )


def _check_budget(budget: BudgetSpec) -> None:
    _check_int(budget.limit_micro_usd, "budget", 0, MAX_BUDGET_MICRO_USD)
    try:
        BudgetPeriod(budget.period)
    except ValueError as exc:
        periods = ", ".join(p.value for p in BudgetPeriod)
        raise InvalidRequestError(
            f"invalid budget period {budget.period!r}: one of {periods}", param="budget_period"
        ) from exc
    frac = budget.soft_alert_frac
    if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac <= 1:
        raise InvalidRequestError(
            f"invalid soft alert fraction {frac!r}: from 0 to 1", param="soft_alert_frac"
        )


def check_label(label: str | None) -> None:
    if label is None:
        return
    if not isinstance(label, str) or len(label) > MAX_LABEL or not label.isprintable():
        shown = _shown(label) if isinstance(label, str) else type(label).__name__
        raise InvalidRequestError(
            f"invalid key label {shown}: at most {MAX_LABEL} printable characters",
            param="label",
        )


def tenant_values(tenant: Tenant) -> dict[str, Any]:
    """The `tenants` row of a (checked) tenant."""
    budget = tenant.budget
    return {
        "name": tenant.name,
        "weight": float(tenant.weight),
        "priority": tenant.priority.name.lower(),
        "models": None if tenant.models is None else json.dumps(sorted(tenant.models)),
        "rpm": tenant.limits.rpm,
        "tpm": tenant.limits.tpm,
        "max_concurrent": tenant.limits.max_concurrent,
        "budget_micro_usd": None if budget is None else budget.limit_micro_usd,
        "budget_period": None if budget is None else BudgetPeriod(budget.period).value,
        "budget_soft_alert_frac": None if budget is None else float(budget.soft_alert_frac),
        "created_at": float(tenant.created_at),
    }


def tenant_from(row: RowMapping, prefix: str = "") -> Tenant:
    """A Tenant from a `tenants` row whose columns are named `prefix + column`."""

    def col(name: str) -> Any:
        return row[prefix + name]

    models = col("models")
    budget = None
    if col("budget_micro_usd") is not None:
        budget = BudgetSpec(
            limit_micro_usd=int(col("budget_micro_usd")),
            period=BudgetPeriod(col("budget_period")),
            soft_alert_frac=float(col("budget_soft_alert_frac")),
        )
    return Tenant(
        name=col("name"),
        weight=float(col("weight")),
        priority=Priority[str(col("priority")).upper()],
        models=None if models is None else frozenset(json.loads(models)),
        limits=_limits(col("rpm"), col("tpm"), col("max_concurrent")),
        budget=budget,
        created_at=float(col("created_at")),
    )


def _limits(rpm: int | None, tpm: int | None, max_concurrent: int | None) -> Limits:
    def whole(value: int | None) -> int | None:
        return None if value is None else int(value)

    return Limits(rpm=whole(rpm), tpm=whole(tpm), max_concurrent=whole(max_concurrent))


def key_values(key: ApiKey) -> dict[str, Any]:
    return {
        "prefix": key.prefix,
        "tenant": key.tenant,
        "digest": key.digest,
        "label": key.label,
        "rpm": key.limits.rpm,
        "tpm": key.limits.tpm,
        "max_concurrent": key.limits.max_concurrent,
        "created_at": float(key.created_at),
        "expires_at": None if key.expires_at is None else float(key.expires_at),
        "revoked_at": None if key.revoked_at is None else float(key.revoked_at),
    }


def key_from(row: RowMapping, prefix: str = "") -> ApiKey:
    """An ApiKey from an `api_keys` row whose columns are named `prefix + column`."""

    def col(name: str) -> Any:
        return row[prefix + name]

    def when(name: str) -> float | None:
        value = col(name)
        return None if value is None else float(value)

    return ApiKey(
        prefix=col("prefix"),
        tenant=col("tenant"),
        digest=col("digest"),
        label=col("label"),
        limits=_limits(col("rpm"), col("tpm"), col("max_concurrent")),
        created_at=float(col("created_at")),
        expires_at=when("expires_at"),
        revoked_at=when("revoked_at"),
    )


def _text(value: str) -> str:
    """Text that both databases store: valid UTF-8 (lone surrogates replaced), no NUL
    (PostgreSQL refuses it). One bad model name must not fail a batch of the ledger."""
    if value.isascii() and "\x00" not in value:
        return value
    return value.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


_USAGE_TEXT = ("request_id", "tenant", "key_prefix", "model", "replica")


def usage_tuple(row: UsageRow) -> tuple[Any, ...]:
    """A row's values in USAGE_FIELDS order (text made storable), for the ledger's insert."""
    replica = row.replica
    return (
        _text(row.request_id), _text(row.tenant),
        None if row.key_prefix is None else _text(row.key_prefix), _text(row.model),
        None if replica is None else _text(replica), row.status, row.prompt_tokens,
        row.completion_tokens, row.cost_micro_usd, row.queue_s, row.ttft_s, row.e2e_s,
        row.started_at, row.ended_at, FinishReason(row.finish_reason).value,
        bool(row.usage_estimated),
    )  # fmt: skip


def usage_from(row: RowMapping) -> UsageRow:
    ttft = row["ttft_s"]
    return UsageRow(
        request_id=row["request_id"],
        tenant=row["tenant"],
        key_prefix=row["key_prefix"],
        model=row["model"],
        replica=row["replica"],
        status=int(row["status"]),
        prompt_tokens=int(row["prompt_tokens"]),
        completion_tokens=int(row["completion_tokens"]),
        cost_micro_usd=int(row["cost_micro_usd"]),
        queue_s=float(row["queue_s"]),
        ttft_s=None if ttft is None else float(ttft),
        e2e_s=float(row["e2e_s"]),
        started_at=float(row["started_at"]),
        ended_at=float(row["ended_at"]),
        finish_reason=FinishReason(row["finish_reason"]),
        usage_estimated=bool(row["usage_estimated"]),
    )
