"""A change to a tenant: which fields `TenancyStore.update_tenant` sets, and which it leaves.

Every field defaults to `UNSET` (leave it). None is a value of its own for the fields that
may be absent: it clears the limit, removes the budget, or allows every model. So
`TenantChanges(rpm=None, weight=2.0)` removes the RPM limit, sets the weight and keeps the
rest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from typing import Final

from fleetserve.tenancy.model import BudgetSpec, Limits, Priority, Tenant

__all__ = ["UNSET", "TenantChanges", "Unset"]


class Unset(enum.Enum):
    """The type of `UNSET`: a field of TenantChanges that leaves the tenant's value alone."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET


@dataclass(frozen=True, slots=True)
class TenantChanges:
    """What `update_tenant` changes. A field left `UNSET` keeps the tenant's value; any other
    value replaces it. For the optional fields None is a value: it clears the limit
    (`rpm=None`: no RPM limit), removes the budget (`budget=None`) or allows every model
    (`models=None`)."""

    weight: float | Unset = UNSET
    priority: Priority | Unset = UNSET
    models: frozenset[str] | Unset | None = UNSET
    rpm: int | Unset | None = UNSET
    tpm: int | Unset | None = UNSET
    max_concurrent: int | Unset | None = UNSET
    budget: BudgetSpec | Unset | None = UNSET

    @property
    def empty(self) -> bool:
        return all(getattr(self, f.name) is UNSET for f in fields(self))

    def apply(self, tenant: Tenant) -> Tenant:
        """`tenant` with these changes (unchecked: the store checks what it writes)."""
        limits = tenant.limits
        limits = Limits(
            rpm=limits.rpm if isinstance(self.rpm, Unset) else self.rpm,
            tpm=limits.tpm if isinstance(self.tpm, Unset) else self.tpm,
            max_concurrent=limits.max_concurrent
            if isinstance(self.max_concurrent, Unset)
            else self.max_concurrent,
        )
        return replace(
            tenant,
            weight=tenant.weight if isinstance(self.weight, Unset) else self.weight,
            priority=tenant.priority if isinstance(self.priority, Unset) else self.priority,
            models=tenant.models if isinstance(self.models, Unset) else self.models,
            limits=limits,
            budget=tenant.budget if isinstance(self.budget, Unset) else self.budget,
        )
