"""Scale from zero: what a request pays when it arrives at a fleet of zero replicas.

Runs `fleetserve up --replicas 0:1` with a fleet file that scales back to zero after a few idle
seconds, then repeats: wait until no replica runs, send one chat request (it is held by the
gateway while the autoscaler starts a replica), then send the same request warm. Prints the
cold and warm latencies and the difference (the added latency), min / median over the trials,
with the actuator's measured cold starts (launch to ready). Engines: fleetserve's SIMULATED
engine (`--engine sim`, whose `--cold-start-s` models a model load) or the real default,
llama.cpp serving SmolLM2 (`--engine llamacpp`).

Run: python -m benchmarks.scale_from_zero [--engine llamacpp] [--trials 3] [--cold-start 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess, get_json


def chat(url: str, model: str) -> float:
    question = "Which city is the capital of France?"
    body = json.dumps({
        "model": model, "messages": [{"role": "user", "content": question}],
        "max_tokens": 8, "temperature": 0,
    }).encode()  # fmt: skip
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
    )
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=180) as response:
        response.read()
        if response.status != 200:
            raise SystemExit(f"request answered {response.status}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("sim", "llamacpp"), default="sim")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--cold-start", type=float, default=5.0, help="sim: model load (s)")
    parser.add_argument("--idle", type=float, default=3.0, help="scale to zero after (s)")
    args = parser.parse_args()
    model = "sim-llama-3.1-8b" if args.engine == "sim" else "smollm2-135m-instruct"
    out = Path(tempfile.mkdtemp(prefix="fleetserve-from-zero-"))
    fleet = out / "fleet.yaml"
    fleet.write_text(
        f"models:\n  - name: {model}\n    engine: {args.engine}\n    autoscale:\n"
        f"      period_s: 1\n      scale_to_zero_after_s: {args.idle}\n"
        "      scale_down: {stabilization_window_s: 1}\n      no_flip_s: 0\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = (
        ["--profile", "a10g", "--cold-start-s", str(args.cold_start)]
        if args.engine == "sim"
        else []
    )
    argv = [sys.executable, "-m", "fleetserve", "up", "--engine", args.engine, "--replicas",
            "0:1", "--port", str(port), "--fleet-file", str(fleet), "--drain-grace-s", "5",
            *extra]  # fmt: skip
    cold: list[float] = []
    warm: list[float] = []
    with ManagedProcess(argv, log_path=out / "up.log", stop_timeout_s=30) as up:
        up.wait_ready(f"{url}/health", 30)
        for _ in range(args.trials):
            up.wait_for(lambda: not get_json(f"{url}/admin/fleet")["replicas"], 120, "0 replicas")
            cold.append(chat(url, model))
            warm.append(chat(url, model))
        view = get_json(f"{url}/admin/autoscaler")
    starts = (view.get("actuator") or {}).get("cold_starts_s") or []
    added = [c - w for c, w in zip(cold, warm, strict=True)]
    label = "SIMULATED engine (a10g profile)" if args.engine == "sim" else "llama.cpp, SmolLM2-135M"
    print(f"scale from zero, {label}, {args.trials} trials (log in {out})")
    if args.engine == "sim":
        print(f"  simulated model load (--cold-start-s): {args.cold_start:g} s")
    for name, values in (("cold request", cold), ("warm request", warm), ("added", added),
                         ("replica cold start", starts)):  # fmt: skip
        if values:
            listed = ", ".join(f"{v:.2f}" for v in values)
            median = statistics.median(values)
            print(f"  {name:>18}: min {min(values):6.2f} s, median {median:6.2f} s  ({listed})")


if __name__ == "__main__":
    main()
