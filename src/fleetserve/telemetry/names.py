"""Every metric the gateway exports, named once: the metric objects, the Grafana dashboard and
the Prometheus alert rules all take their names, labels and help from here.

A `MetricDef.name` is what prometheus_client is given; `series` is what a scrape shows (a
counter gains `_total`), and `bucket`/`count`/`sum` are a histogram's series. Label values
are bounded by construction: `model` is a served model, `OTHER_MODEL` for a model the fleet
does not serve and `NO_MODEL` before a request named one; `tenant` is one of the first
`metrics_top_tenants` tenants a process sees, else `OTHER_TENANT`.

Buckets in seconds. TTFT, ITL and e2e are vLLM's own lists (vllm/v1/metrics/loggers.py), a
superset of the OpenTelemetry GenAI semantic conventions' buckets, so the gateway's figures
line up with the engines'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

# The label values of the upstream-error and retry counters (gateway/proxy.py's `_error_kind`
# and `_phase`; a unit test keeps them in step). Each served model's children start at zero:
# a counter that appears at 1 loses that first increment in rate() and increase().
UPSTREAM_ERROR_LABELS = (
    ("connect", "connect"), ("timeout_connect", "connect"),
    ("timeout_first_byte", "first_byte"), ("status_5xx", "first_byte"),
    ("closed", "first_byte"), ("closed", "stream"), ("timeout_idle", "stream"),
)  # fmt: skip
RETRY_REASONS = ("connect", "timeout_connect", "timeout_first_byte", "status_5xx", "closed")

OTHER_MODEL = "other"  # a model name the fleet does not serve
NO_MODEL = "-"  # the request was refused before it named a model (bad body, bad key)
OTHER_TENANT = "other"
NO_TENANT = "-"  # refused before a key was known

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5,
               5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
               1920.0, 7680.0)  # fmt: skip
# Holds last from a request's wait for a warm replica (ms) to a cold start (tens of seconds)
# up to the hold timeout (120 s by default). vLLM has no such histogram; its queue-time one
# (vllm:request_queue_time_seconds) uses the e2e list, which is too coarse below 1 s here.
HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0,
                90.0, 120.0, 180.0, 300.0, 600.0)  # fmt: skip


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()

    @property
    def series(self) -> str:
        """The name a scrape shows: counters end in `_total`."""
        return f"{self.name}_total" if self.kind == "counter" else self.name

    @property
    def bucket(self) -> str:
        return self._histogram("_bucket")

    @property
    def count(self) -> str:
        return self._histogram("_count")

    @property
    def sum(self) -> str:
        return self._histogram("_sum")

    def _histogram(self, suffix: str) -> str:
        if self.kind != "histogram":
            raise ValueError(f"{self.name} is a {self.kind}, not a histogram")
        return self.name + suffix


def _m(name: str, kind: Kind, help_: str, *labels: str) -> MetricDef:
    return MetricDef(name, kind, help_, labels)


# -- requests -------------------------------------------------------------------------------
REQUESTS = _m(
    "fleetserve_requests", "counter",
    "Requests answered, by model and HTTP status; stream_error: a stream that started (200) "
    "and ended with an error event.",
    "model", "status",
)  # fmt: skip
TTFT = _m(
    "fleetserve_ttft_seconds", "histogram",
    "Time to first token of streams at the gateway, from the end of the request body.",
    "model",
)  # fmt: skip
ITL = _m(
    "fleetserve_itl_seconds", "histogram",
    "Inter-token latency at the gateway: the gap between stream events that carry generated "
    "output (content, reasoning, tool calls, text).",
    "model",
)  # fmt: skip
# Served requests only (2xx from a replica, stream not cut), so its quantiles describe
# serving; rejections and failures are counted in fleetserve_requests by status.
E2E = _m(
    "fleetserve_e2e_seconds", "histogram",
    "End of the request body to the last byte of the answer, for served requests.",
    "model",
)  # fmt: skip
TOKENS = _m(
    "fleetserve_tokens", "counter",
    "Tokens in the engines' usage of answers the gateway read it from, by model and kind "
    "(input, output): every non-stream answer, and streams while tenancy, traces or the "
    "access log are on (the gateway then asks for their usage); other streams are not counted.",
    "model", "kind",
)  # fmt: skip
IN_FLIGHT = _m("fleetserve_in_flight", "gauge", "Requests being proxied now.", "model")
RETRIES = _m(
    "fleetserve_retries", "counter",
    "Attempts retried on another replica, by the reason the previous attempt failed.",
    "model", "reason",
)  # fmt: skip
FAILOVERS = _m(
    "fleetserve_failovers", "counter",
    "Requests answered by another replica after an attempt failed.", "model",
)  # fmt: skip
UPSTREAM_ERRORS = _m(
    "fleetserve_upstream_errors", "counter",
    "Failed attempts against replicas, by kind and phase: connect, first_byte (before "
    "anything reached the client; retried), stream (a stream cut mid-way).",
    "model", "kind", "phase",
)  # fmt: skip
CLIENT_TIMEOUTS = _m(
    "fleetserve_client_timeouts", "counter",
    "Clients cut off for being slow: kind header_read and body_read (answered 408), "
    "write_stall (a stream the client stopped reading).",
    "kind",
)  # fmt: skip

# -- the hold queue ---------------------------------------------------------------------------
HELD = _m(
    "fleetserve_held_requests", "gauge",
    "Requests held now, waiting for a replica of their model.", "model",
)  # fmt: skip
HOLD_CAPACITY = _m(
    "fleetserve_hold_queue_capacity", "gauge",
    "Requests the gateway may hold per model (hold.max_held, summed over worker processes).",
)  # fmt: skip
HOLD = _m(
    "fleetserve_hold_seconds", "histogram",
    "Time a held request waited at the gateway for a replica, all its holds together.",
    "model",
)  # fmt: skip

# -- the fleet (read from the live Fleet at scrape time) ----------------------------------------
REPLICAS = _m("fleetserve_replicas", "gauge", "Replicas by model and state.", "model", "state")
REPLICA_IN_FLIGHT = _m(
    "fleetserve_replica_in_flight", "gauge",
    "Requests this gateway process has in flight on the replica.", "model", "replica",
)  # fmt: skip
REPLICA_RUNNING = _m(
    "fleetserve_replica_running", "gauge",
    "Requests the replica's engine runs, from its last metrics scrape.", "model", "replica",
)  # fmt: skip
REPLICA_WAITING = _m(
    "fleetserve_replica_waiting", "gauge",
    "Requests waiting in the replica's engine, from its last metrics scrape.",
    "model", "replica",
)  # fmt: skip
REPLICA_KV_USAGE = _m(
    "fleetserve_replica_kv_usage_ratio", "gauge",
    "KV cache in use on the replica (0-1), from its last metrics scrape.", "model", "replica",
)  # fmt: skip
REPLICA_SCRAPE_AGE = _m(
    "fleetserve_replica_scrape_age_seconds", "gauge",
    "Seconds since the gateway last read a ready replica's /metrics (counted from when it "
    "turned ready if it was never read since).",
    "model", "replica",
)  # fmt: skip

# -- the autoscaler ---------------------------------------------------------------------------
DESIRED_REPLICAS = _m(
    "fleetserve_desired_replicas", "gauge", "Replicas the autoscaler wants, by model.", "model"
)
MAX_REPLICAS = _m(
    "fleetserve_autoscaler_max_replicas", "gauge",
    "The autoscaler's ceiling (max_replicas), by model.", "model",
)  # fmt: skip
DECISIONS = _m(
    "fleetserve_autoscaler_decisions", "counter",
    "Autoscaler decisions, by direction (up, down, hold) and the signal that decided (load, "
    "queue, kv_cache, ttft, arrival; none when no signal was measured).",
    "model", "direction", "signal",
)  # fmt: skip

# -- background services (read from the supervisor at scrape time) ------------------------------
SERVICE_UP = _m(
    "fleetserve_service_up", "gauge",
    "Whether a background service (health checks, autoscaler, discovery) is running.",
    "service",
)  # fmt: skip
SERVICE_RESTARTS = _m(
    "fleetserve_service_restarts", "counter",
    "Restarts of a background service after an unexpected failure.", "service",
)  # fmt: skip

# -- tenants (auth = keys) ----------------------------------------------------------------------
TENANT_REQUESTS = _m(
    "fleetserve_tenant_requests", "counter",
    "Requests of authenticated tenants answered, by tenant and HTTP status.",
    "tenant", "status",
)  # fmt: skip
TENANT_TOKENS = _m(
    "fleetserve_tenant_tokens", "counter",
    "Tokens used, by tenant and kind (input, output), from the engines' usage.",
    "tenant", "kind",
)  # fmt: skip
TENANT_COST = _m(
    "fleetserve_tenant_cost_usd", "counter", "Chargeback cost of the tokens used, USD.", "tenant"
)
TENANT_REJECTIONS = _m(
    "fleetserve_tenant_rejections", "counter",
    "Requests refused at admission, by reason: invalid_key (tenant -), model_not_allowed, "
    "rpm, tpm, concurrency, budget, unavailable.",
    "tenant", "reason",
)  # fmt: skip
TENANT_BUDGET_REMAINING = _m(
    "fleetserve_tenant_budget_remaining_usd", "gauge",
    "What is left of the tenant's budget this period, as of its latest admission.", "tenant",
)  # fmt: skip
TENANT_BUDGET_SPENT = _m(
    "fleetserve_tenant_budget_spent_ratio", "gauge",
    "Share of the tenant's budget spent this period (0-1), as of its latest admission.",
    "tenant",
)  # fmt: skip
TENANT_BUDGET_SOFT = _m(
    "fleetserve_tenant_budget_soft_limit_ratio", "gauge",
    "The share of its budget past which the tenant is warned (its soft_alert_frac).", "tenant",
)  # fmt: skip
LIMITER_UP = _m(
    "fleetserve_limiter_shared_up", "gauge",
    "1 while the shared limit counters (Redis) answer, 0 during an outage.",
)  # fmt: skip
LEDGER_SPOOLED = _m(
    "fleetserve_ledger_spooled_rows", "counter",
    "Usage rows written to the spool file while the database was unreachable.",
)  # fmt: skip
LEDGER_LOST = _m(
    "fleetserve_ledger_lost_rows", "counter",
    "Usage rows in neither the database nor the spool (the spool could not be written).",
)  # fmt: skip
LEDGER_DB_UP = _m(
    "fleetserve_ledger_database_up", "gauge",
    "1 while the usage ledger's database accepts writes, 0 while rows are spooled.",
)  # fmt: skip

# -- GPUs: NVIDIA's dcgm-exporter, not the gateway ----------------------------------------------
DCGM_GPU_UTIL = _m("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilisation (%), dcgm-exporter.", "gpu")
DCGM_FB_USED = _m("DCGM_FI_DEV_FB_USED", "gauge", "GPU memory used (MiB), dcgm-exporter.", "gpu")

GATEWAY_METRICS: tuple[MetricDef, ...] = (
    REQUESTS, TTFT, ITL, E2E, TOKENS, IN_FLIGHT, RETRIES, FAILOVERS, UPSTREAM_ERRORS,
    CLIENT_TIMEOUTS, HELD, HOLD_CAPACITY, HOLD, REPLICAS, REPLICA_IN_FLIGHT, REPLICA_RUNNING,
    REPLICA_WAITING, REPLICA_KV_USAGE, REPLICA_SCRAPE_AGE, DESIRED_REPLICAS, MAX_REPLICAS,
    DECISIONS, SERVICE_UP, SERVICE_RESTARTS,
)  # fmt: skip
TENANT_METRICS: tuple[MetricDef, ...] = (
    TENANT_REQUESTS, TENANT_TOKENS, TENANT_COST, TENANT_REJECTIONS, TENANT_BUDGET_REMAINING,
    TENANT_BUDGET_SPENT, TENANT_BUDGET_SOFT, LIMITER_UP, LEDGER_SPOOLED, LEDGER_LOST,
    LEDGER_DB_UP,
)  # fmt: skip
DCGM_METRICS: tuple[MetricDef, ...] = (DCGM_GPU_UTIL, DCGM_FB_USED)
