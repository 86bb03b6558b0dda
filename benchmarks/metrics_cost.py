"""CPU time the gateway's metrics cost per request (issue 11: metrics alone <= 5 us/request).

In-process, no sockets: the exact calls the request path makes on `GatewayMetrics` (and on
`TenantMetrics` with auth = keys), in the order asgi.py and proxy.py make them, for:

- `nonstream`: in flight +1/-1, the answer's `usage` read for the token counters (the one
  parse metrics add to a non-stream answer with auth none), requests by status, e2e;
- `stream16`: in flight, TTFT, 15 inter-token gaps (16 content events, each in its own
  read: the most observations a 16-token stream costs), requests by status, e2e;
- `stream16_tenancy`: the same plus the tenant's label, requests, tokens and cost, and the
  model's token counters from the stream's usage.

Each runs N times in a row; the figure is process CPU time per request, less an empty loop's,
best and median of `--repeat` runs. It runs twice: with prometheus_client's in-process values
(one worker) and in multiprocess mode (`--workers N`: PROMETHEUS_MULTIPROC_DIR set before the
import, values in mmap files), the latter in a child process because the mode is chosen at
import.

    .venv/bin/python -m benchmarks.metrics_cost               # about 20 s
    .venv/bin/python -m benchmarks.metrics_cost --quick       # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import orjson

from benchmarks._harness import cpu_model, pin_self

TARGET_US = 5.0
MODEL = "m"
TENANT = "acme"
ANSWER = orjson.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
    "choices": [{"index": 0, "finish_reason": "length",
                 "message": {"role": "assistant", "content": " fleet" * 16}}],
    "usage": {"prompt_tokens": 31, "completion_tokens": 16, "total_tokens": 47},
})  # fmt: skip


def scenarios() -> tuple[dict[str, Callable[[], None]], Callable[[], None]]:
    """Built after the mode is set: prometheus_client reads it at import."""
    from fleetserve.protocol.sse import usage_of  # noqa: PLC0415
    from fleetserve.telemetry.metrics import GatewayMetrics  # noqa: PLC0415
    from fleetserve.telemetry.tenant_metrics import TenantMetrics  # noqa: PLC0415

    metrics = GatewayMetrics(served={MODEL}.__contains__)
    tenants = TenantMetrics(metrics.registry, 20)
    metrics.of(MODEL)

    def nonstream() -> None:
        counted = metrics.of(MODEL)  # asgi.py
        counted.in_flight += 1
        usage = usage_of(ANSWER)  # proxy.py
        if usage is not None:
            metrics.of(MODEL).tokens(*usage)
        counted.in_flight -= 1  # asgi.py
        counted.finished(200, 0.012)

    def stream16() -> None:
        counted = metrics.of(MODEL)
        counted.in_flight += 1
        metrics.observe_ttft(MODEL, 0.05)  # proxy.py, _stream
        itl = metrics.itl_child(MODEL)
        for _ in range(15):
            itl.observe(0.02)
        counted.in_flight -= 1
        counted.finished(200, 0.35)

    def stream16_tenancy() -> None:
        stream16()
        metrics.of(MODEL).tokens(31, 16)
        tenants.answered(tenants.label(TENANT), 200, 31, 16, 0.000063)

    built = {"nonstream": nonstream, "stream16": stream16, "stream16_tenancy": stream16_tenancy}
    metrics.also_flush(tenants.flush)
    return built, metrics.flush


def _per_call_us(fn: Callable[[], None], n: int) -> float:
    gc.disable()
    try:
        start = time.process_time_ns()
        for _ in range(n):
            fn()
        spent = time.process_time_ns() - start
        start = time.process_time_ns()
        for _ in range(n):
            pass
        empty = time.process_time_ns() - start
    finally:
        gc.enable()
    return (spent - empty) / n / 1000


def measure(n: int, repeat: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}
    built, flush = scenarios()
    for name, fn in built.items():
        for _ in range(max(1, n // 20)):  # warm-up: children created, caches hot
            fn()
        figures[name] = [_per_call_us(fn, n) for _ in range(repeat)]
    # The flushes, off the request path: one per scrape (and per second with workers).
    start = time.process_time_ns()
    for _ in range(100):
        for fn in built.values():
            fn()
        flush()
    figures["flush (per flush)"] = [(time.process_time_ns() - start) / 100 / 1000]  # + 3 requests
    return figures


def _child(n: int, repeat: int) -> dict[str, list[float]]:
    """The multiprocess-mode figures, from a child process with the mode set."""
    with tempfile.TemporaryDirectory(prefix="fleetserve-metrics-") as path:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": path}
        argv = [sys.executable, "-m", "benchmarks.metrics_cost", "--child",
                "--n", str(n), "--repeat", str(repeat)]  # fmt: skip
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600,
                              check=True)  # fmt: skip
    figures: dict[str, list[float]] = json.loads(done.stdout)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="requests per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per scenario")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10,000 x 2")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n, repeat = (10_000, 2) if args.quick else (args.n, args.repeat)
    if args.child:
        print(json.dumps(measure(n, repeat)))
        return 0
    pin_self(1 if (os.cpu_count() or 1) > 1 else 0)
    print(f"metrics_cost: {n} requests x {repeat} runs per scenario; {cpu_model()}; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    modes = {"one worker (in-process values)": measure(n, repeat),
             "--workers N (multiprocess mode)": _child(n, repeat)}  # fmt: skip
    worst = 0.0
    print(f"{'mode':34} {'scenario':18} {'best us':>8} {'median us':>10}")
    for mode, figures in modes.items():
        for name, runs in figures.items():
            best, median = min(runs), statistics.median(runs)
            if not name.startswith("flush"):
                worst = max(worst, median)
            print(f"{mode:34} {name:18} {best:8.2f} {median:10.2f}")
    verdict = "met" if worst <= TARGET_US else "MISSED"
    print(f"target: metrics alone <= {TARGET_US:g} us of CPU per request (median): {verdict}, "
          f"worst median {worst:.2f} us")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
