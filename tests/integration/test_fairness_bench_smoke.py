"""benchmarks/tenancy_fairness.py at its smallest settings, as a process: every scenario runs
against a real gateway and sim engine and reports each tenant's share, so it cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SMALLEST = ["--quick", "--window-s", "2", "--warmup-s", "1", "--idle-s", "2"]


def bench(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.tenancy_fairness", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


@pytest.mark.timeout(150)
def test_every_scenario_reports_shares_and_ttft() -> None:
    done = bench(*SMALLEST, timeout_s=140)
    out = done.stdout
    assert done.returncode == 0, f"{out}\n{done.stderr}"
    for header in ("1. equal weights", "2. weights 1:2:3:4", "3. equal weights, a new spell",
                   "4. priority"):  # fmt: skip
        assert header in out
    # One row per tenant and window with served tokens, its share and target.
    rows = re.findall(r"^\s+0-2 s\s+(\S+)\s+([\d,]+)\s+([\d.]+)%\s+([\d.]+)%", out, re.M)
    tenants = {name for name, *_ in rows}
    assert tenants == {"eq-light", "eq-heavy", "w1", "w2", "w3", "w4", "rj-new"}
    assert all(int(tokens.replace(",", "")) > 0 for _, tokens, _, _ in rows)
    targets = {name: float(target) for name, _, _, target in rows}
    assert targets["w1"] == 10.0
    assert targets["w4"] == 40.0
    assert re.search(r"idle fleet \(2 s\)\s+\d+\s+\d+", out)  # interactive TTFT when idle
    assert re.search(r"the batch tenant progresses: \d+ requests", out)
    assert "failed requests: 0" in out


def test_a_bad_option_is_one_line() -> None:
    done = bench("--scenarios", "equal,bogus", timeout_s=30)
    assert done.returncode == 2
    assert "--scenarios" in done.stderr
    assert "Traceback" not in done.stderr
