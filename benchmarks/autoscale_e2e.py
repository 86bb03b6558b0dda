"""End to end: `fleetserve up --replicas 1:8` on simulated a10g engines under a bench spike.

Starts `fleetserve up --engine sim --profile a10g --replicas MIN:MAX --ttft-slo SLO` (the
gateway with the autoscaler and the local actuator in its process), then runs
`fleetserve bench --users spike:base=2,peak=40,...` against it with `--out`, and reads the
bench report (per-request rows, the fleet timeline sampled during the run) and the
autoscaler's own view. Prints:

- failed requests over the whole run (the goal: none);
- time from the spike's start to the first new replica ready, and the peak replica count;
- TTFT p95 in 10 s windows: before the spike, at its start, after the scale-up, after it;
- whether the fleet shrank back after the spike, with draining;
- replica-seconds used against a fixed fleet sized for the peak over the same run.

The engines are SIMULATED (fleetserve's latency model of vLLM on an A10G): the figures are
about the control loop, not hardware. Run: python -m benchmarks.autoscale_e2e [--quick]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fleetserve.fleet.processes import free_port
from fleetserve.telemetry.quantiles import percentile_of
from fleetserve.testing.processes import ManagedProcess, get_json

MODEL = "sim-llama-3.1-8b"


def fleetserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleetserve", *args]


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f} ms"


def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = Path(tempfile.mkdtemp(prefix="fleetserve-autoscale-e2e-"))
    fleet_file = out / "fleet.yaml"
    # The defaults, with a decision every 2 s (the default is 5 s).
    fleet_file.write_text(
        f"models:\n  - name: {MODEL}\n    engine: sim\n    autoscale:\n"
        f"      period_s: {args.period}\n      target_concurrency: {args.target}\n"
    )
    argv = fleetserve(
        "up", "--engine", "sim", "--profile", "a10g", "--model", MODEL,
        "--replicas", args.replicas, "--port", str(port), "--ttft-slo", str(args.slo),
        "--cold-start-s", str(args.cold_start), "--fleet-file", str(fleet_file),
        "--drain-grace-s", "30",
    )  # fmt: skip
    with ManagedProcess(argv, log_path=out / "up.log", stop_timeout_s=30) as up:
        up.wait_for(lambda: get_json(f"{url}/admin/fleet").get("ready", 0) >= 1, 60, "a replica")
        spike = f"spike:base={args.base},peak={args.peak},at={args.at},for={args.hold}"
        bench = subprocess.run(
            fleetserve(
                "bench", "--url", url, "--model", MODEL, "--users", spike,
                "--duration", str(args.duration), "--prompt-tokens", str(args.prompt),
                "--output-tokens", str(args.output), "--slo", f"ttft_p95={args.slo}s",
                "--out", str(out / "bench"), "--timeout", "120",
            ),
            capture_output=True, timeout=args.duration + 200, check=False,
        )  # fmt: skip
        if bench.returncode != 0:
            raise SystemExit(f"bench failed:\n{bench.stderr.decode()[-3000:]}")
        view = get_json(f"{url}/admin/autoscaler")
    report = json.loads((out / "bench" / "report.json").read_text())
    with (out / "bench" / "requests.csv").open() as f:
        requests = list(csv.DictReader(f))
    return {"report": report, "requests": requests, "view": view, "dir": str(out)}


def analyse(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    report, requests, view = data["report"], data["requests"], data["view"]
    fleet = report["fleet"]
    spike_end = args.at + args.hold
    ok = [r for r in requests if not r.get("error_kind")]
    failed = len(requests) - len(ok)

    def running(point: dict[str, Any]) -> int:
        return sum(point.get(k) or 0 for k in ("replicas_ready", "replicas_starting",
                                               "replicas_draining"))  # fmt: skip

    before = [p["replicas_ready"] or 0 for p in fleet if p["t_s"] < args.at]
    base = max(before) if before else 0
    first_new = next(
        (t for p in fleet if (t := p["t_s"]) >= args.at and (p["replicas_ready"] or 0) > base),
        None,
    )
    peak = max((running(p) for p in fleet), default=0)
    peak_ready = max((p["replicas_ready"] or 0 for p in fleet), default=0)
    # Replica-seconds over the sampled run (left Riemann sum over the samples).
    used = sum(running(a) * (b["t_s"] - a["t_s"]) for a, b in itertools.pairwise(fleet))
    span = fleet[-1]["t_s"] - fleet[0]["t_s"] if len(fleet) > 1 else 0.0
    fixed = peak_ready * span
    end_ready = fleet[-1]["replicas_ready"] if fleet else None
    drained = any((p.get("replicas_draining") or 0) > 0 for p in fleet if p["t_s"] >= spike_end)

    def window_p95(lo: float, hi: float) -> float | None:
        values = [float(r["ttft_s"]) for r in ok
                  if r["ttft_s"] and lo <= float(r["intended_s"]) < hi]  # fmt: skip
        return percentile_of(values, 95)

    recovered = None
    if first_new is not None:
        t = first_new
        while t + 10 <= spike_end:
            value = window_p95(t, t + 10)
            if value is not None and value <= args.slo:
                recovered = t
                break
            t += 2
    windows = {
        "before spike": window_p95(max(0, args.at - 20), args.at),
        "first 10 s of spike": window_p95(args.at, args.at + 10),
        "last 20 s of spike": window_p95(spike_end - 20, spike_end),
        "after spike": window_p95(spike_end + 5, args.duration),
    }
    return {
        "requests": len(requests),
        "failed": failed,
        "first_new_ready_after_spike_s": None if first_new is None else first_new - args.at,
        "ttft_back_under_slo_after_spike_s": None if recovered is None else recovered - args.at,
        "peak_replicas": peak,
        "peak_ready": peak_ready,
        "end_ready": end_ready,
        "drained_after_spike": drained,
        "replica_seconds": used,
        "fixed_peak_replica_seconds": fixed,
        "windows": windows,
        "autoscaler_replica_seconds": view.get("replica_seconds"),
        "cold_starts_s": (view.get("actuator") or {}).get("cold_starts_s"),
        "changes": [
            (c["direction"], c["current"], c["desired"], c["reason"])
            for c in view.get("changes", [])
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1:8")
    parser.add_argument("--slo", type=float, default=2.0, help="TTFT p95 SLO, seconds")
    parser.add_argument("--base", type=int, default=2)
    parser.add_argument("--peak", type=int, default=40)
    parser.add_argument("--at", type=float, default=30.0)
    parser.add_argument("--hold", type=float, default=90.0, help="seconds the spike lasts")
    parser.add_argument("--duration", type=float, default=240.0)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--period", type=float, default=2.0)
    parser.add_argument("--target", type=float, default=6.0)
    parser.add_argument("--cold-start", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="a 100 s run")
    args = parser.parse_args()
    if args.quick:
        args.at, args.hold, args.duration = 15.0, 35.0, 140.0
    data = run(args)
    result = analyse(args, data)
    print(f"SIMULATION: fleetserve up --engine sim --profile a10g --replicas {args.replicas}, "
          f"bench users spike {args.base}->{args.peak} at {args.at:g}s for {args.hold:g}s, "
          f"{args.prompt}+{args.output} tokens, TTFT SLO p95 <= {args.slo:g}s, "
          f"cold start {args.cold_start:g}s (outputs in {data['dir']})")  # fmt: skip
    print(f"requests: {result['requests']}, failed: {result['failed']}")
    print(f"spike -> first new replica ready: {result['first_new_ready_after_spike_s']} s; "
          f"peak replicas {result['peak_replicas']} (ready {result['peak_ready']}); "
          f"ready at the end {result['end_ready']}; drained after spike: "
          f"{result['drained_after_spike']}")  # fmt: skip
    print(f"TTFT p95 back under the SLO (10 s window) {result['ttft_back_under_slo_after_spike_s']}"
          " s after the spike started")  # fmt: skip
    for name, value in result["windows"].items():
        print(f"  TTFT p95 {name:>20}: {fmt_ms(value)}")
    used, fixed = result["replica_seconds"], result["fixed_peak_replica_seconds"]
    ratio = used / fixed if fixed else math.nan
    print(f"replica-seconds: {used:,.0f} autoscaled vs {fixed:,.0f} for a fixed fleet of "
          f"{result['peak_ready']} ({ratio:.2f}x, {1 - ratio:.0%} saved)")  # fmt: skip
    print(f"cold starts measured (s): {result['cold_starts_s']}")
    print("scaling decisions:")
    for direction, current, desired, reason in result["changes"]:
        print(f"  {direction:>5} {current} -> {desired}: {reason}")


if __name__ == "__main__":
    main()
