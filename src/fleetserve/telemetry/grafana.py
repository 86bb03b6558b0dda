"""The Grafana dashboard fleetserve ships (deploy/grafana/fleetserve.json), built from the
metric names in telemetry/names.py as plain JSON data.

Plain dicts rather than grafana-foundation-sdk: the release pip resolves as the newest
(`1769699998!10.1.0`) is generated for Grafana 10.1 and marked alpha, while the schema the
tests validate against is Grafana 12.3's; two dozen time-series panels are a few small
functions, and the schema check catches what a typed builder would.

Rows, top to bottom: fleet, traffic, latency (with SLO attainment), engines per replica,
tenants (top N), gateway, GPUs (dcgm-exporter; collapsed, empty where it is not deployed).
Panels query through the `datasource` variable and filter on `model`; rates use Grafana's
`$__rate_interval`. `queries(dashboard)` lists every expression, for the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import utils

from fleetserve.telemetry import names as n
from fleetserve.telemetry.alerts import TTFT_SLO_S

UID = "fleetserve"
SCHEMA_VERSION = 41  # Grafana 11.6's; the 12.3 schema accepts it, and so does Grafana >= 10
TOP_TENANTS = 10
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'
RATE = "$__rate_interval"
PANEL_W, PANEL_H, COLUMNS = 8, 8, 3
QUANTILES = (0.5, 0.95, 0.99)
# How prometheus_client writes a bucket's `le` (2.5 -> "2.5", 1 -> "1.0"): the SLO variable's
# values must be those strings for `le="$ttft_slo"` to match.
le_label: Callable[[float], str] = utils.floatToGoString
ALL = {"text": "All", "value": "$__all"}


@dataclass(frozen=True, slots=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True, slots=True)
class PanelSpec:
    title: str
    queries: Sequence[Query]
    unit: str = "short"
    description: str = ""
    stack: bool = False


def _q(expr: str, legend: str) -> Query:
    return Query(expr, legend)


def _quantiles(metric: n.MetricDef, what: str) -> PanelSpec:
    rate = f"rate({metric.bucket}{{{M}}}[{RATE}])"
    p = QUANTILES
    return PanelSpec(
        f"{what} p50 / p95 / p99",
        [_q(f"histogram_quantile({q:g}, sum by (le) ({rate}))", f"p{100 * q:g}") for q in p],
        unit="s",
        description=metric.help,
    )


def _rows() -> list[tuple[str, bool, list[PanelSpec]]]:
    """(title, collapsed, panels) of each row."""
    sel = f"{{{M}}}"
    fleet = [
        PanelSpec(
            "Replicas by state",
            [_q(f"sum by (state) (max by (model, state) ({n.REPLICAS.series}{sel}))", "{{state}}")],
            stack=True, description=n.REPLICAS.help,
        ),
        PanelSpec(
            "Desired vs ready replicas",
            [
                _q(f"max by (model) ({n.DESIRED_REPLICAS.series}{sel})", "desired {{model}}"),
                _q(f'max by (model) ({n.REPLICAS.series}{{{M},state="ready"}})',
                   "ready {{model}}"),
                _q(f"max by (model) ({n.MAX_REPLICAS.series}{sel})", "max {{model}}"),
            ],
            description="The autoscaler's target and ceiling against the ready replicas; "
            "each scaling decision is an annotation (its full reason: /admin/autoscaler).",
        ),
        PanelSpec(
            "Autoscaler decisions by direction and signal",
            [_q(f"sum by (direction, signal) (increase({n.DECISIONS.series}{sel}[{RATE}]))",
                "{{direction}} ({{signal}})")],
            stack=True, description=n.DECISIONS.help,
        ),
    ]  # fmt: skip
    traffic = [
        PanelSpec(
            "Requests/s by status",
            [_q(f"sum by (status) (rate({n.REQUESTS.series}{sel}[{RATE}]))", "{{status}}")],
            unit="reqps", stack=True, description=n.REQUESTS.help,
        ),
        PanelSpec(
            "Requests/s by model",
            [_q(f"sum by (model) (rate({n.REQUESTS.series}{sel}[{RATE}]))", "{{model}}")],
            unit="reqps", description="`other`: models the fleet does not serve; `-`: "
            "refused before a model was named.",
        ),
        PanelSpec(
            "Tokens/s in and out",
            [_q(f"sum by (kind) (rate({n.TOKENS.series}{sel}[{RATE}]))", "{{kind}}")],
            description=n.TOKENS.help,
        ),
    ]  # fmt: skip
    slo = "$ttft_slo"
    latency = [
        _quantiles(n.TTFT, "TTFT"),
        _quantiles(n.ITL, "Inter-token latency"),
        _quantiles(n.E2E, "End-to-end latency"),
        PanelSpec(
            "SLO attainment: share of streams with TTFT <= $ttft_slo s",
            [_q(f'sum(rate({n.TTFT.bucket}{{{M},le="{slo}"}}[{RATE}])) / '
                f"sum(rate({n.TTFT.count}{sel}[{RATE}]))", "TTFT <= $ttft_slo s")],
            unit="percentunit",
            description="The objective is the `ttft_slo` variable (one of the TTFT buckets).",
        ),
    ]  # fmt: skip
    engines = [
        PanelSpec(
            title,
            [_q(f"max by (replica) ({metric.series}{sel})", "{{replica}}")],
            unit=unit, description=metric.help,
        )
        for title, metric, unit in (
            ("Running per replica", n.REPLICA_RUNNING, "short"),
            ("Waiting per replica", n.REPLICA_WAITING, "short"),
            ("KV cache use per replica", n.REPLICA_KV_USAGE, "percentunit"),
        )
    ]  # fmt: skip
    top = TOP_TENANTS
    tenants = [
        PanelSpec(
            f"Tokens/s, top {top} tenants",
            [_q(f"topk({top}, sum by (tenant) (rate({n.TENANT_TOKENS.series}[{RATE}])))",
                "{{tenant}}")],
            description=n.TENANT_TOKENS.help,
        ),
        PanelSpec(
            f"Cost, USD/hour, top {top} tenants",
            [_q(f"3600 * topk({top}, sum by (tenant) (rate({n.TENANT_COST.series}[{RATE}])))",
                "{{tenant}}")],
            unit="currencyUSD", description=n.TENANT_COST.help,
        ),
        PanelSpec(
            f"Rejections/s, top {top} tenants",
            [_q(f"topk({top}, sum by (tenant, reason) "
                f"(rate({n.TENANT_REJECTIONS.series}[{RATE}])))", "{{tenant}} {{reason}}")],
            unit="reqps", description=n.TENANT_REJECTIONS.help,
        ),
        PanelSpec(
            f"Budget spent, top {top} tenants",
            [_q(f"topk({top}, max by (tenant) ({n.TENANT_BUDGET_SPENT.series}))", "{{tenant}}")],
            unit="percentunit", description=n.TENANT_BUDGET_SPENT.help,
        ),
    ]  # fmt: skip
    gateway = [
        PanelSpec(
            "In flight",
            [_q(f"sum by (model) ({n.IN_FLIGHT.series}{sel})", "{{model}}")],
            description=n.IN_FLIGHT.help,
        ),
        PanelSpec(
            "Hold queue",
            [_q(f"sum by (model) ({n.HELD.series}{sel})", "held {{model}}"),
             _q(f"max({n.HOLD_CAPACITY.series})", "bound per model")],
            description=n.HELD.help,
        ),
        PanelSpec(
            "Hold time p95",
            [_q(f"histogram_quantile(0.95, sum by (le) (rate({n.HOLD.bucket}{sel}[{RATE}])))",
                "p95")],
            unit="s", description=n.HOLD.help,
        ),
        PanelSpec(
            "Retries and failovers/s",
            [_q(f"sum by (reason) (rate({n.RETRIES.series}{sel}[{RATE}]))", "retry: {{reason}}"),
             _q(f"sum(rate({n.FAILOVERS.series}{sel}[{RATE}]))", "failovers")],
            unit="reqps", description=n.RETRIES.help,
        ),
        PanelSpec(
            "Upstream errors/s by phase",
            [_q(f"sum by (phase, kind) (rate({n.UPSTREAM_ERRORS.series}{sel}[{RATE}]))",
                "{{phase}} {{kind}}")],
            unit="reqps", description=n.UPSTREAM_ERRORS.help,
        ),
        PanelSpec(
            "Background services up",
            [_q(f"min by (service) ({n.SERVICE_UP.series})", "{{service}}")],
            description=n.SERVICE_UP.help,
        ),
    ]  # fmt: skip
    gpus = [
        PanelSpec(
            "GPU utilisation",
            [_q(f'{n.DCGM_GPU_UTIL.series}{{gpu=~"$gpu"}}', "{{Hostname}} GPU {{gpu}}")],
            unit="percent", description=n.DCGM_GPU_UTIL.help,
        ),
        PanelSpec(
            "GPU memory used",
            [_q(f'{n.DCGM_FB_USED.series}{{gpu=~"$gpu"}}', "{{Hostname}} GPU {{gpu}}")],
            unit="decmbytes", description=n.DCGM_FB_USED.help,
        ),
    ]  # fmt: skip
    return [
        ("Fleet", False, fleet),
        ("Traffic", False, traffic),
        ("Latency", False, latency),
        ("Engines (per replica)", False, engines),
        (f"Tenants (top {top})", False, tenants),
        ("Gateway", False, gateway),
        ("GPUs (dcgm-exporter; empty where it is not deployed)", True, gpus),
    ]


def _panel(spec: PanelSpec, panel_id: int, x: int, y: int) -> dict[str, object]:
    custom: dict[str, object] = {"fillOpacity": 10, "showPoints": "never"}
    if spec.stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": "timeseries",
        "id": panel_id,
        "title": spec.title,
        "description": spec.description,
        "datasource": DS,
        "gridPos": {"h": PANEL_H, "w": PANEL_W, "x": x, "y": y},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": q.expr, "legendFormat": q.legend}
            for i, q in enumerate(spec.queries)
        ],
        "fieldConfig": {"defaults": {"unit": spec.unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }  # fmt: skip


def _variables() -> list[dict[str, object]]:
    slo = le_label(TTFT_SLO_S)
    return [
        {"type": "datasource", "name": "datasource", "label": "Prometheus",
         "query": "prometheus", "current": {"text": "default", "value": "default"}, "hide": 0},
        {"type": "query", "name": "model", "label": "Model", "datasource": DS,
         "query": f"label_values({n.REQUESTS.series}, model)",
         "definition": f"label_values({n.REQUESTS.series}, model)", "refresh": 2,
         "includeAll": True, "multi": True, "allValue": ".*", "current": ALL, "sort": 1},
        {"type": "custom", "name": "ttft_slo", "label": "TTFT objective (s)",
         "query": ",".join(le_label(b) for b in n.TTFT_BUCKETS),
         "current": {"text": slo, "value": slo}, "hide": 0,
         "description": "TTFT bucket edges: attainment reads a bucket exactly."},
        {"type": "query", "name": "gpu", "label": "GPU", "datasource": DS,
         "query": f"label_values({n.DCGM_GPU_UTIL.series}, gpu)",
         "definition": f"label_values({n.DCGM_GPU_UTIL.series}, gpu)", "refresh": 2,
         "includeAll": True, "multi": True, "allValue": ".*", "current": ALL, "hide": 0},
    ]  # fmt: skip


def _annotations() -> list[dict[str, object]]:
    return [
        {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
         "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
         "name": "Annotations & Alerts", "type": "dashboard"},
        {"name": "Scaling decisions", "datasource": DS, "enable": True, "iconColor": "orange",
         "expr": f'sum by (model, direction, signal) (increase({n.DECISIONS.series}'
                 f'{{{M},direction!="hold"}}[1m])) > 0',
         "step": "60s", "titleFormat": "scale {{direction}}",
         "textFormat": "{{model}}: decided by the {{signal}} signal",
         "tagKeys": "model,direction,signal"},
    ]  # fmt: skip


def dashboard() -> dict[str, object]:
    """The dashboard as Grafana's JSON model (classic, schemaVersion 41)."""
    panels: list[dict[str, object]] = []
    ids = iter(range(1, 1000))
    y = 0
    for title, collapsed, specs in _rows():
        inner = []
        row_y = y
        y += 1
        for i, spec in enumerate(specs):
            x = (i % COLUMNS) * PANEL_W
            if i and i % COLUMNS == 0:
                y += PANEL_H
            inner.append(_panel(spec, next(ids), x, y))
        y += PANEL_H
        row = {"type": "row", "id": next(ids), "title": title, "collapsed": collapsed,
               "gridPos": {"h": 1, "w": PANEL_W * COLUMNS, "x": 0, "y": row_y},
               "panels": inner if collapsed else []}  # fmt: skip
        panels.append(row)
        if not collapsed:
            panels.extend(inner)
    return {
        "uid": UID,
        "title": "fleetserve",
        "description": "fleetserve's gateway, autoscaler and tenants; generated by "
        "`python -m fleetserve.telemetry.deploy_files` (do not edit by hand).",
        "tags": ["fleetserve", "llm"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "panels": panels,
        "templating": {"list": _variables()},
        "annotations": {"list": _annotations()},
        "links": [],
    }


def queries(board: dict[str, object]) -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every panel target, collapsed rows included, and of the
    annotations that query Prometheus."""
    panels = board["panels"]
    assert isinstance(panels, list)
    for panel in panels:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield inner["title"], target["expr"]
    annotations = board["annotations"]
    assert isinstance(annotations, dict)
    for annotation in annotations["list"]:
        if "expr" in annotation:
            yield f"annotation: {annotation['name']}", annotation["expr"]
