"""Per-tenant metrics of the gateway, with their cardinality bounded by construction.

A tenant gets its own label value only while fewer than `top_n` tenants have one in this
process (first come, first named); every later tenant counts as `other`. Requests refused
before a key was known (401) are counted once, as `fleetserve_tenant_rejections{tenant="-",
reason="invalid_key"}` (and by status in `fleetserve_requests`): a flood of junk keys adds no
series. A tenant's children are resolved once, when it is named, so its token and cost
series start at zero and the hot path pays a dict lookup.
"""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge

from fleetserve.telemetry import names as n
from fleetserve.telemetry.batched import FlushFirst
from fleetserve.telemetry.names import NO_TENANT, OTHER_TENANT, MetricDef

OTHER = OTHER_TENANT
UNKNOWN = NO_TENANT


class TenantLabels:
    def __init__(self, top_n: int) -> None:
        self.top_n = top_n
        self._named: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self._named:
            return tenant
        if len(self._named) < self.top_n:
            self._named.add(tenant)
            return tenant
        return OTHER


def _counter(d: MetricDef, reg: CollectorRegistry | None) -> Counter:
    return Counter(d.name, d.help, d.labels, registry=reg)


def _gauge(d: MetricDef, reg: CollectorRegistry | None, mode: str) -> Gauge:
    return Gauge(d.name, d.help, d.labels, registry=reg, multiprocess_mode=mode)  # type: ignore[arg-type]


class _TenantChildren:
    """One tenant label's figures since the last flush (telemetry/batched.py says why)."""

    __slots__ = ("_children", "_requests", "cost", "input_tokens", "output_tokens", "requests")

    def __init__(self, metrics: TenantMetrics, tenant: str) -> None:
        self.requests: dict[int, int] = {}
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost = 0.0
        self._requests = functools.partial(metrics.requests.labels, tenant)
        self._children = (
            metrics.tokens.labels(tenant, "input"), metrics.tokens.labels(tenant, "output"),
            metrics.cost.labels(tenant),
        )  # fmt: skip

    def flush(self) -> None:
        input_tokens, output_tokens, cost = self._children
        if self.input_tokens:
            input_tokens.inc(self.input_tokens)
            self.input_tokens = 0
        if self.output_tokens:
            output_tokens.inc(self.output_tokens)
            self.output_tokens = 0
        if self.cost:
            cost.inc(self.cost)
            self.cost = 0.0
        for status, count in self.requests.items():
            if count:
                self._requests(str(status)).inc(count)
                self.requests[status] = 0


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry | None, top_n: int) -> None:
        reg = registry
        self.label = TenantLabels(top_n)
        if reg is not None:  # with workers, GatewayMetrics.also_flush(self.flush) instead
            reg.register(FlushFirst(self.flush))
        self.requests = _counter(n.TENANT_REQUESTS, reg)
        self.tokens = _counter(n.TENANT_TOKENS, reg)
        self.cost = _counter(n.TENANT_COST, reg)
        self.rejections = _counter(n.TENANT_REJECTIONS, reg)
        self.budget_left = _gauge(n.TENANT_BUDGET_REMAINING, reg, "mostrecent")
        self.budget_spent = _gauge(n.TENANT_BUDGET_SPENT, reg, "mostrecent")
        self.budget_soft = _gauge(n.TENANT_BUDGET_SOFT, reg, "mostrecent")
        self.limiter_up = _gauge(n.LIMITER_UP, reg, "min")
        self.ledger_spooled = _counter(n.LEDGER_SPOOLED, reg)
        self.ledger_lost = _counter(n.LEDGER_LOST, reg)
        self.ledger_db_up = _gauge(n.LEDGER_DB_UP, reg, "min")
        self._tenants: dict[str, _TenantChildren] = {}
        self._rejections: dict[tuple[str, str], Counter] = {}
        self._budgets: dict[str, tuple[float, float | None, float | None]] = {}

    def _of(self, tenant: str) -> _TenantChildren:
        """`tenant` is a label (from `self.label`), so this cache is bounded by top_n + 1."""
        children = self._tenants.get(tenant)
        if children is None:
            children = self._tenants[tenant] = _TenantChildren(self, tenant)
        return children

    def flush(self) -> None:
        for children in self._tenants.values():
            children.flush()
        budgets, self._budgets = self._budgets, {}
        for tenant, (left_usd, spent_frac, soft_frac) in budgets.items():
            self.budget_left.labels(tenant).set(left_usd)
            if spent_frac is not None:
                self.budget_spent.labels(tenant).set(spent_frac)
            if soft_frac is not None:
                self.budget_soft.labels(tenant).set(soft_frac)

    def counted(self, tenant: str, status: int) -> None:
        """A request of `tenant` (a label) answered with `status`."""
        requests = self._of(tenant).requests
        requests[status] = requests.get(status, 0) + 1

    def rejected(self, tenant: str, reason: str) -> None:
        """A refusal at admission (`tenant` is a label, or UNKNOWN for a bad key)."""
        key = (tenant, reason)
        child = self._rejections.get(key)
        if child is None:  # reasons are a fixed set (tenancy.model.RejectReason and two more)
            child = self._rejections[key] = self.rejections.labels(tenant, reason)
        child.inc()

    def answered(self, tenant: str, status: int, prompt: int, completion: int, usd: float) -> None:
        """One admitted request's accounting (`tenant` is its label)."""
        children = self._of(tenant)
        requests = children.requests
        requests[status] = requests.get(status, 0) + 1
        children.input_tokens += prompt
        children.output_tokens += completion
        children.cost += usd

    def budget(
        self, tenant: str, left_usd: float, spent_frac: float | None = None,
        soft_frac: float | None = None,
    ) -> None:  # fmt: skip
        """The tenant's budget as of its latest admission (`tenant` is a label): kept here and
        set on the gauges at the next flush, as the counters are (one dict write per
        admission of a tenant with a budget)."""
        self._budgets[tenant] = (left_usd, spent_frac, soft_frac)
