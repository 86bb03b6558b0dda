"""The shipped dashboard and alert rules against a real Prometheus (Debian's `prometheus`).

One autoscaled stack, `fleetserve up --engine sim --replicas 2:4` (a gateway process that
runs the autoscaler and starts its sim engines, so the autoscaler's series exist too), with
auth = keys and two tenants (one with a budget, one with an rpm limit that refuses some of
its requests). Prometheus, on 127.0.0.1 with a temporary directory and stopped by PID,
scrapes the gateway and the engines every second and evaluates deploy/prometheus/rules.yaml.
A bounded load runs for LOAD_S: streams and non-streams, and one engine is SIGKILLed half-way
so that retries, failovers and upstream errors happen for real (the actuator replaces it).

Then every dashboard expression and every alert's watched value, evaluated through
Prometheus' HTTP API, returns data with finite values; every alert's full expression is
empty and every rule is healthy and inactive (a healthy fleet: all quiet); and every metric a
panel or a rule uses appears in the gateway's own /metrics (the metric contract).

Exempt, with the reason: the GPU row (DCGM_FI_DEV_*: it is dcgm-exporter's, and there is no
GPU here). Nothing else: the tenants' series exist because auth is on, the hold histogram
because requests wait for a slot while the fleet is at `--max-concurrency`.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2 as httpx
import pytest
import yaml

from fleetserve.fleet.processes import free_port
from fleetserve.telemetry.alerts import alerts
from fleetserve.telemetry.grafana import dashboard, queries
from fleetserve.telemetry.names import DCGM_METRICS
from fleetserve.testing.processes import ManagedProcess
from fleetserve.testing.stack import FAST_HEALTH_ENV, Service, fleetserve_argv, services

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
PROMETHEUS = "/usr/bin/prometheus"
MODEL = "sim-prom"
LOAD_S = 20.0
BURST_S = 6.0  # CLIENTS + BURST_CLIENTS at first: more than 2 replicas take, some are held
KILL_AT_S = 10.0  # then CLIENTS alone, with room for retries on the other replicas
CLIENTS = 8
BURST_CLIENTS = 8
MAX_CONCURRENCY = 7  # per replica
EXEMPT = {d.name for d in DCGM_METRICS}
GRAFANA_VARIABLES = {
    "$__rate_interval": "15s", "$model": ".*", "$ttft_slo": "2.5", "$gpu": ".*",
}  # fmt: skip
METRIC = re.compile(r"\b(fleetserve_[a-z0-9_]+|DCGM_[A-Z0-9_]+)\b")
MESSAGES = [{"role": "user", "content": "Say something about fleets."}]


@dataclass
class Stack:
    gateway: Service
    prometheus_url: str
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return self.gateway.url


def _admin(url: str, path: str, body: object) -> dict[str, Any]:
    answer = httpx.post(url + path, json=body, timeout=10)
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


def _prometheus_config(gateway: str, engines: list[str]) -> dict[str, object]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "fleetserve", "static_configs": [{"targets": [gateway]}]},
            {"job_name": "engines", "static_configs": [{"targets": engines}]},
        ],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not os.access(PROMETHEUS, os.X_OK):
        pytest.skip("Debian's prometheus is not installed (make prometheus installs it as root)")
    state = tmp_path_factory.mktemp("state")
    prom_dir = tmp_path_factory.mktemp("prometheus")
    with services() as started:
        port = free_port()
        fleet = state / "fleet.yaml"  # prices, so that costs and budgets apply
        fleet.write_text(yaml.safe_dump({"models": [{
            "name": MODEL, "engine": "sim", "autoscale": {},
            "pricing": {"input_per_mtok_usd": 1000, "output_per_mtok_usd": 2000},
        }]}))  # fmt: skip
        argv = fleetserve_argv(
            "up", "--engine", "sim", "--profile", "a10g", "--model", MODEL, "--replicas", "2:4",
            "--cold-start-s", "0", "--max-concurrency", str(MAX_CONCURRENCY),
            "--port", str(port), "--fleet-file", str(fleet),
        )  # fmt: skip
        env = {**FAST_HEALTH_ENV, "FLEETSERVE_STATE_DIR": str(state),
               "FLEETSERVE_TENANCY__AUTH": "keys"}  # fmt: skip
        gateway = started.start("up", argv, port, env)
        gateway.wait_ok("/ready", 60)
        keys = {}
        for name, fields in (("alpha", {"budget_usd": 1000}), ("beta", {"rpm": 20})):
            _admin(gateway.url, "/admin/tenants", {"name": name, **fields})
            keys[name] = str(_admin(gateway.url, "/admin/keys", {"tenant": name})["key"])
        fleet = httpx.get(gateway.url + "/admin/fleet", timeout=10).json()
        engines = [r["url"].removeprefix("http://") for r in fleet["replicas"]]
        prom_port = free_port()
        config = prom_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(_prometheus_config(f"127.0.0.1:{port}", engines)))
        prometheus = ManagedProcess(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={prom_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            log_path=started.log_dir / "prometheus.log",
        )  # fmt: skip
        with prometheus:
            prom_url = f"http://127.0.0.1:{prom_port}"
            prometheus.wait_ready(prom_url + "/-/ready", 30)
            yield Stack(gateway, prom_url, keys)


async def _client(http: aiohttp.ClientSession, url: str, key: str, stream: bool,
                  until: float, statuses: list[int], pause_s: float = 0.0) -> None:  # fmt: skip
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    while time.monotonic() < until:
        try:
            async with http.post(url + "/v1/chat/completions", json=body,
                                 headers=headers) as answer:  # fmt: skip
                await answer.read()
                statuses.append(answer.status)
        except aiohttp.ClientError:
            statuses.append(-1)
        if pause_s:
            await asyncio.sleep(pause_s)


def _kill_busiest_engine(url: str) -> int:
    """SIGKILL the process of the ready replica with the most requests in flight (one that
    `up` started); its PID. Its non-stream requests in flight are retried elsewhere."""
    fleet = httpx.get(url + "/admin/fleet", timeout=10).json()["replicas"]
    busiest = max((r for r in fleet if r["state"] == "ready"), key=lambda r: r["in_flight"])
    view = httpx.get(url + "/admin/autoscaler", timeout=10).json()
    pids = [r["pid"] for r in view["actuator"]["replicas"] if r["url"] == busiest["url"]]
    assert pids, (busiest, view["actuator"])
    assert pids[0], view["actuator"]
    os.kill(int(pids[0]), signal.SIGKILL)
    return int(pids[0])


async def _load(stack: Stack) -> list[int]:
    statuses: list[int] = []
    start = time.monotonic()
    until, burst_until = start + LOAD_S, start + BURST_S
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=CLIENTS + BURST_CLIENTS + 2)
    alpha = stack.keys["alpha"]
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        clients = [
            asyncio.create_task(_client(http, stack.url, alpha, i % 2 == 0,
                                        until if i < CLIENTS else burst_until, statuses))
            for i in range(CLIENTS + BURST_CLIENTS)
        ]  # fmt: skip
        clients.append(asyncio.create_task(
            _client(http, stack.url, stack.keys["beta"], False, until, statuses, pause_s=0.2)
        ))  # fmt: skip
        await asyncio.sleep(KILL_AT_S)
        await asyncio.to_thread(_kill_busiest_engine, stack.url)
        async with asyncio.timeout(LOAD_S + 30):
            await asyncio.gather(*clients)
    return statuses


def _query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(stack.prometheus_url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = answer.json()
    assert answer.status_code == 200, (expr, body)
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _with_variables(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def _uses_exempt(expr: str) -> bool:
    return any(name in EXEMPT for name in METRIC.findall(expr))


@pytest.fixture(scope="module")
def loaded(stack: Stack) -> Stack:
    statuses = asyncio.run(_load(stack))
    assert statuses.count(200) > 100, sorted(set(statuses))
    assert 429 in statuses  # beta's rpm limit refused some: rejections have data
    # Prometheus has scraped past the end of the load (its evaluation trails by a scrape).
    deadline = time.monotonic() + 10
    while not _query(stack, "fleetserve_upstream_errors_total"):
        assert time.monotonic() < deadline, "no upstream error recorded after the engine kill"
        time.sleep(0.2)
    stamp = time.time()
    while _query(stack, f"timestamp(up{{job='fleetserve'}}) > {stamp + 1}") == []:
        assert time.monotonic() < deadline + 5
        time.sleep(0.2)
    return stack


def _values(result: list[dict[str, Any]]) -> list[float]:
    return [float(sample["value"][1]) for sample in result]


def test_every_dashboard_expression_returns_data(loaded: Stack) -> None:
    empty, not_finite = [], []
    checked = 0
    for title, expr in queries(dashboard()):
        if _uses_exempt(expr):
            continue
        result = _query(loaded, _with_variables(expr))
        checked += 1
        if not result:
            empty.append((title, expr))
        elif not all(math.isfinite(v) for v in _values(result)) and "annotation" not in title:
            not_finite.append((title, expr, _values(result)))
    assert checked >= 30
    assert empty == []
    assert not_finite == []


def test_every_alert_watches_data_and_is_quiet(loaded: Stack) -> None:
    for alert in alerts():
        watched = _query(loaded, alert.value)
        assert watched, f"{alert.name}: no data for {alert.value}"
        assert all(math.isfinite(v) for v in _values(watched)), (alert.name, watched)
        assert _query(loaded, alert.expr) == [], f"{alert.name} fires on a healthy fleet"
    rules = httpx.get(loaded.prometheus_url + "/api/v1/rules", timeout=10).json()
    loaded_rules = [r for g in rules["data"]["groups"] for r in g["rules"]]
    assert {r["name"] for r in loaded_rules} == {a.name for a in alerts()}
    assert all(r["health"] == "ok" for r in loaded_rules), loaded_rules
    assert all(r["state"] == "inactive" for r in loaded_rules), loaded_rules


def test_every_metric_used_is_in_the_gateways_metrics(loaded: Stack) -> None:
    text = httpx.get(loaded.url + "/metrics", timeout=10).text
    shown = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}  # fmt: skip
    exprs = [expr for _, expr in queries(dashboard())] + [a.expr for a in alerts()]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    missing = sorted(used - shown - EXEMPT)
    assert missing == []
    assert "fleetserve_autoscaler_decisions_total" in used
