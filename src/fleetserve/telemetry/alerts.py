"""The Prometheus alert rules fleetserve ships (deploy/prometheus/rules.yaml), built from the
metric names in telemetry/names.py.

Each alert is `value OP threshold` (optionally `unless` a condition): `value` is the figure
the alert watches, and on a live gateway it returns data whether or not the alert fires,
which tests/integration/test_prometheus.py checks against a real Prometheus. Every alert
has a `runbook_url` to its section of docs/runbooks.md (`runbook_anchor`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fleetserve.telemetry import names as n

Severity = Literal["critical", "warning"]

TTFT_SLO_S = 2.5  # the default TTFT p95 objective; a TTFT bucket edge, so attainment is exact
ERROR_RATE_MAX = 0.05
HOLD_QUEUE_NEAR_FRAC = 0.8
SCRAPE_STALE_S = 30
FLAP_WINDOW = "30m"
FLAP_EXTRA_CHANGES = 2
RUNBOOKS = "docs/runbooks.md"
GROUP = "fleetserve"

ERROR_STATUSES = '{status=~"5..|stream_error"}'  # the gateway's and replicas' failures, not 4xx


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    value: str
    op: str
    threshold: str
    for_: str
    severity: Severity
    summary: str
    description: str
    unless: str | None = None

    @property
    def expr(self) -> str:
        expr = f"{self.value} {self.op} {self.threshold}"
        return f"({expr}) unless on (model) ({self.unless})" if self.unless else expr

    @property
    def runbook_anchor(self) -> str:
        return github_anchor(self.name)


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _rate(metric: str, selector: str = "", window: str = "5m") -> str:
    return f"rate({metric}{selector}[{window}])"


def alerts(ttft_slo_s: float = TTFT_SLO_S) -> list[Alert]:
    """The eight alerts of issue 11, in the order docs/runbooks.md has them."""
    total = f"sum by (model) ({_rate(n.REQUESTS.series)})"
    errors = f"sum by (model) ({_rate(n.REQUESTS.series, ERROR_STATUSES)})"
    desired = n.DESIRED_REPLICAS.series
    return [
        Alert(
            "FleetserveNoReadyReplica",
            value=f'max by (model) ({n.REPLICAS.series}{{state="ready"}})',
            op="==", threshold="0", for_="1m", severity="critical",
            unless=f"max by (model) ({desired}) == 0",
            summary="Model {{ $labels.model }} has no ready replica",
            description="No replica of {{ $labels.model }} is ready, and the autoscaler (if "
            "any) did not scale it to zero: requests are held or answered 503.",
        ),
        Alert(
            "FleetserveTTFTOverSLO",
            value="histogram_quantile(0.95, sum by (model, le) "
            f"({_rate(n.TTFT.bucket)}))",
            op=">", threshold=f"{ttft_slo_s:g}", for_="5m", severity="warning",
            summary="TTFT p95 of {{ $labels.model }} is over its objective",
            description=f"TTFT p95 of {{{{ $labels.model }}}} has been "
            f"{{{{ $value | humanizeDuration }}}}, over {ttft_slo_s:g} s, for 5 minutes.",
        ),
        Alert(
            "FleetserveHighErrorRate",
            value=f"(({errors}) or ({total} * 0)) / {total}",
            op=">", threshold=f"{ERROR_RATE_MAX:g}", for_="5m", severity="critical",
            summary="More than 5% of requests for {{ $labels.model }} fail",
            description="{{ $value | humanizePercentage }} of the requests for "
            "{{ $labels.model }} ended with a 5xx or a failed stream over 5 minutes.",
        ),
        Alert(
            "FleetserveHoldQueueNearFull",
            value=f"max by (model) ({n.HELD.series} / on (instance, job) group_left () "
            f"{n.HOLD_CAPACITY.series})",
            op=">", threshold=f"{HOLD_QUEUE_NEAR_FRAC:g}", for_="1m", severity="warning",
            summary="The hold queue of {{ $labels.model }} is near its bound",
            description="{{ $value | humanizePercentage }} of the hold queue of "
            "{{ $labels.model }} is taken; when it is full, requests get 503 at once.",
        ),
        Alert(
            "FleetserveReplicasFlapping",
            value=f"max by (model) (changes({desired}[{FLAP_WINDOW}]) - "
            f"(max_over_time({desired}[{FLAP_WINDOW}]) - min_over_time({desired}[{FLAP_WINDOW}])))",
            op=">=", threshold=str(FLAP_EXTRA_CHANGES), for_="0m", severity="warning",
            summary="The autoscaler of {{ $labels.model }} scales back and forth",
            description="The desired replica count of {{ $labels.model }} changed "
            "{{ $value }} times more in 30 minutes than a one-way ramp would need.",
        ),
        Alert(
            "FleetserveAutoscalerPinnedAtMax",
            value=f"max by (model) ({desired}) - max by (model) ({n.MAX_REPLICAS.series})",
            op=">=", threshold="0", for_="10m", severity="warning",
            summary="The autoscaler of {{ $labels.model }} is pinned at max_replicas",
            description="{{ $labels.model }} has wanted max_replicas for 10 minutes: the "
            "ceiling, not demand, sets its capacity.",
        ),
        Alert(
            "FleetserveReplicaScrapeFailing",
            value=f"max by (model, replica) ({n.REPLICA_SCRAPE_AGE.series})",
            op=">", threshold=str(SCRAPE_STALE_S), for_="1m", severity="warning",
            summary="The gateway cannot read the metrics of replica {{ $labels.replica }}",
            description="Replica {{ $labels.replica }} of {{ $labels.model }} is ready but its "
            "/metrics has not been read for {{ $value | humanizeDuration }}: the router and "
            "the autoscaler work without its engine signals.",
        ),
        Alert(
            "FleetserveTenantBudgetSoftLimit",
            value=f"max by (tenant) ({n.TENANT_BUDGET_SPENT.series})",
            op=">=",
            threshold=f"on (tenant) max by (tenant) ({n.TENANT_BUDGET_SOFT.series})",
            for_="1m", severity="warning",
            summary="Tenant {{ $labels.tenant }} is past its budget's soft limit",
            description="Tenant {{ $labels.tenant }} has spent "
            "{{ $value | humanizePercentage }} of its budget this period.",
        ),
    ]  # fmt: skip


def rules_document(ttft_slo_s: float = TTFT_SLO_S, runbooks: str = RUNBOOKS) -> dict[str, object]:
    """The rules file as data (`groups:`), for yaml.safe_dump."""
    rules = [
        {
            "alert": a.name,
            "expr": a.expr,
            "for": a.for_,
            "labels": {"severity": a.severity},
            "annotations": {
                "summary": a.summary,
                "description": a.description,
                "runbook_url": f"{runbooks}#{a.runbook_anchor}",
            },
        }
        for a in alerts(ttft_slo_s)
    ]
    return {"groups": [{"name": GROUP, "rules": rules}]}
