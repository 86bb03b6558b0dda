"""Per-tenant metrics of the gateway, with their cardinality bounded by construction.

A tenant gets its own label value only while fewer than `top_n` tenants have one in this
process (first come, first named); every later tenant counts as `other`. Requests refused
before a key was known (401) count as tenant `-`. So a flood of junk keys adds no series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase

OTHER = "other"
UNKNOWN = "-"


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


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry | None, top_n: int) -> None:
        reg = registry
        self.label = TenantLabels(top_n)
        self.requests = Counter(
            "fleetserve_tenant_requests", "Requests answered, by tenant and HTTP status.",
            ["tenant", "status"], registry=reg,
        )  # fmt: skip
        self.tokens = Counter(
            "fleetserve_tenant_tokens",
            "Tokens used, by tenant and kind (input, output), from the engines' usage.",
            ["tenant", "kind"], registry=reg,
        )  # fmt: skip
        self.cost = Counter(
            "fleetserve_tenant_cost_usd", "Chargeback cost of the tokens used, USD.",
            ["tenant"], registry=reg,
        )  # fmt: skip
        self.rejections = Counter(
            "fleetserve_tenant_rejections",
            "Requests refused at admission, by reason: invalid_key, model_not_allowed, rpm, "
            "tpm, concurrency, budget, unavailable.",
            ["tenant", "reason"], registry=reg,
        )  # fmt: skip
        self.budget_left = Gauge(
            "fleetserve_tenant_budget_remaining_usd",
            "What is left of the tenant's budget this period, as of its latest admission.",
            ["tenant"], registry=reg, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.limiter_up = Gauge(
            "fleetserve_limiter_shared_up",
            "1 while the shared limit counters (Redis) answer, 0 during an outage.",
            registry=reg, multiprocess_mode="min",
        )  # fmt: skip
        self.ledger_spooled = Counter(
            "fleetserve_ledger_spooled_rows",
            "Usage rows written to the spool file while the database was unreachable.",
            registry=reg,
        )  # fmt: skip
        self.ledger_lost = Counter(
            "fleetserve_ledger_lost_rows",
            "Usage rows in neither the database nor the spool (the spool could not be written).",
            registry=reg,
        )  # fmt: skip
        self.ledger_db_up = Gauge(
            "fleetserve_ledger_database_up",
            "1 while the usage ledger's database accepts writes, 0 while rows are spooled.",
            registry=reg, multiprocess_mode="min",
        )  # fmt: skip
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}

    def _child(self, metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
        """`metric.labels(*labels)`, cached: the hot path pays a dict lookup."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def answered(self, tenant: str, status: int, prompt: int, completion: int, usd: float) -> None:
        """One admitted request's accounting (`tenant` is its label)."""
        self._child(self.requests, tenant, str(status)).inc()  # type: ignore[attr-defined]
        if prompt:
            self._child(self.tokens, tenant, "input").inc(prompt)  # type: ignore[attr-defined]
        if completion:
            self._child(self.tokens, tenant, "output").inc(completion)  # type: ignore[attr-defined]
        if usd:
            self._child(self.cost, tenant).inc(usd)  # type: ignore[attr-defined]

    def budget(self, tenant: str, left_usd: float) -> None:
        self._child(self.budget_left, tenant).set(left_usd)  # type: ignore[attr-defined]
