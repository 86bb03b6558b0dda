"""The shipped dashboard and alert rules: generated from code, valid, and tested with promtool.

- the committed deploy/ files are what `python -m fleetserve.telemetry.deploy_files` writes
  (run as a process, as a user would);
- the dashboard validates against Grafana's dashboard JSON schema (a copy in
  tests/fixtures/grafana, with its SOURCES.md) and has the rows issue 11 lists;
- every metric a panel or a rule uses is defined in telemetry/names.py;
- every alert has its section in docs/runbooks.md;
- `promtool check rules` is clean and `promtool test rules` passes a firing and a quiet case
  per alert (tests/fixtures/prometheus/rules_test.yaml).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from fleetserve.telemetry import names
from fleetserve.telemetry.alerts import alerts, github_anchor
from fleetserve.telemetry.deploy_files import DASHBOARD_PATH, RULES_PATH, files
from fleetserve.telemetry.grafana import dashboard, queries

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SCHEMA = FIXTURES / "grafana" / "dashboard.jsonschema.json"
RULE_TESTS = FIXTURES / "prometheus" / "rules_test.yaml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
METRIC = re.compile(r"\b(fleetserve_[a-z0-9_]+|DCGM_[A-Z0-9_]+)\b")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")
ROWS = [
    "Fleet", "Traffic", "Latency", "Engines (per replica)", "Tenants (top 10)", "Gateway",
    "GPUs (dcgm-exporter; empty where it is not deployed)",
]  # fmt: skip


def _run(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("Debian's prometheus is not installed (make prometheus installs it as root)")
    return path


def metric_families(expr: str) -> set[str]:
    """The metric definitions' names an expression uses (`_bucket`, `_total`... stripped)."""
    found = set()
    for series in METRIC.findall(expr):
        suffix = next((s for s in SUFFIXES if series.endswith(s)), "")
        found.add(series.removesuffix(suffix))
    return found


def all_expressions() -> list[tuple[str, str]]:
    board = [(f"panel {title}", expr) for title, expr in queries(dashboard())]
    rules = [(f"alert {a.name}", a.expr) for a in alerts()]
    return board + rules


def test_committed_files_are_generated() -> None:
    answer = _run(sys.executable, "-m", "fleetserve.telemetry.deploy_files", "--check",
                  "--root", str(ROOT))  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    for relative, text in files().items():
        assert (ROOT / relative).read_text() == text, relative


def test_check_names_a_stale_file_and_regenerates_it(tmp_path: Path) -> None:
    argv = (sys.executable, "-m", "fleetserve.telemetry.deploy_files", "--root", str(tmp_path))
    stale = _run(*argv, "--check")
    assert stale.returncode == 1
    assert "out of date: deploy/grafana/fleetserve.json, deploy/prometheus/rules.yaml" in (
        stale.stderr
    )
    assert _run(*argv).returncode == 0
    assert _run(*argv, "--check").returncode == 0
    assert json.loads((tmp_path / DASHBOARD_PATH).read_text()) == dashboard()
    custom = _run(*argv, "--ttft-slo-s", "1", "--runbooks", "https://x.test/runbooks.md")
    assert custom.returncode == 0
    rules = (tmp_path / RULES_PATH).read_text()
    assert "rate(fleetserve_ttft_seconds_bucket[5m]))) > 1\n" in rules
    assert "runbook_url: https://x.test/runbooks.md#fleetservenoreadyreplica" in rules


def test_help_and_bad_values_are_one_line() -> None:
    shown = _run(sys.executable, "-m", "fleetserve.telemetry.deploy_files", "--help")
    assert shown.returncode == 0
    assert "example: python -m fleetserve.telemetry.deploy_files --check" in shown.stdout
    bad = _run(sys.executable, "-m", "fleetserve.telemetry.deploy_files", "--ttft-slo-s", "0")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "--ttft-slo-s must be > 0"


def test_dashboard_validates_against_grafanas_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    board = json.loads((ROOT / DASHBOARD_PATH).read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(board)]
    assert errors == []
    broken = {**board, "panels": [{"title": "no type"}]}
    assert list(validator.iter_errors(broken)), "the schema must catch a panel without a type"


def test_dashboard_has_the_rows_of_issue_11() -> None:
    board = dashboard()
    panels = board["panels"]
    assert isinstance(panels, list)
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS
    ids = [p["id"] for p in panels] + [q["id"] for p in panels for q in p.get("panels", [])]
    assert len(ids) == len(set(ids))
    gpu_row = panels[-1]
    assert gpu_row["collapsed"] is True
    gpu_exprs = " ".join(t["expr"] for p in gpu_row["panels"] for t in p["targets"])
    assert "DCGM_FI_DEV_GPU_UTIL" in gpu_exprs
    assert "DCGM_FI_DEV_FB_USED" in gpu_exprs
    slo = [p for p in panels if p["title"].startswith("SLO attainment")]
    assert len(slo) == 1


def test_every_metric_used_is_defined_once_in_names() -> None:
    defined = {d.name for d in (*names.GATEWAY_METRICS, *names.TENANT_METRICS,
                                *names.DCGM_METRICS)}  # fmt: skip
    assert len(defined) == len(names.GATEWAY_METRICS) + len(names.TENANT_METRICS) + 2
    for where, expr in all_expressions():
        used = metric_families(expr)
        assert used, where
        assert used <= defined, (where, used - defined)


def test_every_alert_has_a_runbook_section() -> None:
    headings = {
        github_anchor(line.removeprefix("## "))
        for line in RUNBOOKS.read_text().splitlines()
        if line.startswith("## ")
    }
    rules = yaml.safe_load((ROOT / RULES_PATH).read_text())["groups"][0]["rules"]
    assert len(rules) == 8
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        path, anchor = url.split("#")
        assert path == "docs/runbooks.md"
        assert anchor in headings, rule["alert"]


def test_promtool_check_rules_is_clean() -> None:
    answer = _run(_promtool(), "check", "rules", str(ROOT / RULES_PATH))
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "SUCCESS: 8 rules found" in answer.stdout
    assert "WARNING" not in answer.stdout + answer.stderr


def test_promtool_unit_tests_fire_and_stay_quiet() -> None:
    tested = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    cases: dict[str, list[bool]] = {}
    for group in tested:
        for case in group["alert_rule_test"]:
            cases.setdefault(case["alertname"], []).append(bool(case["exp_alerts"]))
    assert set(cases) == {a.name for a in alerts()}
    assert all(True in fired and False in fired for fired in cases.values()), cases
    answer = _run(_promtool(), "test", "rules", str(RULE_TESTS))
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "SUCCESS" in answer.stdout
