"""The whole loop as a user runs it: `fleetserve up --replicas 1:3` on simulated engines and a
`fleetserve bench` users spike. The fleet grows, nothing fails, and it shrinks back, draining.

A shortened version of `benchmarks/autoscale_e2e.py` (which quotes the figures): decisions
every second and short windows, so it fits in a test's time.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleetserve.fleet.processes import free_port
from fleetserve.testing.stack import fleetserve_argv, services
from tests.integration.test_up import get_json, reap_on_exit
from tests.integration.test_up_autoscale import children_of, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "sim-spike"
FLEET = f"""
models:
  - name: {MODEL}
    engine: sim
    autoscale:
      period_s: 1
      target_concurrency: 4
      scale_up: {{stabilization_window_s: 0}}
      scale_down: {{stabilization_window_s: 6}}
      no_flip_s: 2
"""


@pytest.mark.timeout(150)
def test_spike_grows_the_fleet_and_it_shrinks_back_without_a_failed_request(
    tmp_path: Path,
) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(FLEET)
    port = free_port()
    children: list[psutil.Process] = []
    with services() as started, reap_on_exit(children):
        up = started.start(
            "up",
            fleetserve_argv(
                "up", "--engine", "sim", "--profile", "a10g", "--model", MODEL,
                "--replicas", "1:3", "--port", str(port), "--cold-start-s", "0.5",
                "--fleet-file", str(fleet_file), "--drain-grace-s", "20",
            ),
            port,
        )  # fmt: skip
        up.wait_ok("/ready", timeout_s=60)
        out = tmp_path / "bench"
        bench = subprocess.run(
            fleetserve_argv(
                "bench", "--url", up.url, "--model", MODEL,
                "--users", "spike:base=1,peak=12,at=3,for=14", "--duration", "32",
                "--prompt-tokens", "256", "--output-tokens", "48", "--out", str(out),
                "--timeout", "60",
            ),
            capture_output=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        children_of(up, children)
        assert bench.returncode == 0, bench.stderr.decode()[-3000:]
        assert "Traceback" not in bench.stderr.decode()
        view: dict[str, Any] = get_json(up.url, "/admin/autoscaler")
        stop(up, children)

    report = json.loads((out / "report.json").read_text())
    totals = report["totals"]
    assert totals["requests"] > 20, totals
    assert totals["errors"] == 0, report["errors"]
    fleet = report["fleet"]
    assert fleet, "bench sampled no fleet timeline from the gateway"
    ready = [p["replicas_ready"] for p in fleet]
    peak_at = max(range(len(ready)), key=lambda i: ready[i])
    assert ready[peak_at] >= 2, ready  # it grew during the spike
    assert min(ready[peak_at:]) < ready[peak_at], ready  # and shrank after it
    # Replicas leave through draining; one with nothing in flight drains at once, so the 1 s
    # samples seldom catch it (tests/integration/test_local_actuator.py covers a busy drain).
    assert any(p["replicas_desired"] is not None for p in fleet), fleet
    directions = [c["direction"] for c in view["changes"]]
    assert "up" in directions
    assert "down" in directions
    assert view["peak_replicas"] >= 2
    assert (out / "report.html").stat().st_size > 100_000
