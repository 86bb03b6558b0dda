"""How much load one bench process generates: open-loop rate and concurrent streams.

    python -m benchmarks.bench_capacity [--engines 2] [--rates 250,500,1000,1500] [--users 2000]

1. Rate: simulated engines in the `instant` profile (no modelled delays) answer streaming chat
   requests of 16 tokens (16 content chunks, a usage chunk, [DONE]). This process runs bench's
   open-loop runner at each rate for `--duration` s and prints the schedule lag (sent minus
   intended) p50/p99, errors, and its own CPU. The capacity is the largest rate with lag p99
   under 5 ms and no errors.
2. Concurrency: `--users` closed-loop users against `h100`-profile engines (each stream lasts
   about a second there), printing the most streams in flight at once and any errors.

Requests go round robin over the engines; every process is stopped by PID at the end. The
GuideLLM side-by-side run is to be added to this script (issue 4).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks._harness import Processes, sigterm_as_exit, wait_ready
from fleetserve.bench.client import BenchClient, ClientSettings
from fleetserve.bench.lengths import Fixed
from fleetserve.bench.patterns import steady
from fleetserve.bench.records import RequestRecord
from fleetserve.bench.runner import (
    RunLimits,
    RunResult,
    Sender,
    run_closed_loop,
    run_open_loop,
    run_with_uvloop,
)
from fleetserve.bench.schedule import ClosedLoop, schedule
from fleetserve.bench.workload import BuiltRequest, Workload, WorkloadSpec
from fleetserve.clock import RealClock
from fleetserve.fleet.processes import free_port

MODEL = "sim"
LAG_P99_TARGET_S = 0.005


class RoundRobin:
    """One bench client per engine, taken in turn."""

    def __init__(self, urls: Sequence[str], clock: RealClock, t0: float) -> None:
        self.clients = [BenchClient(ClientSettings(url), clock, t0=t0) for url in urls]
        self.turn = 0

    async def send(self, request: BuiltRequest, record: RequestRecord) -> None:
        self.turn += 1
        await self.clients[self.turn % len(self.clients)].send(request, record)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


def _errors(result: RunResult) -> str:
    kinds: dict[str, int] = {}
    for record in result.records:
        if record.error_kind is not None:
            kinds[record.error_kind] = kinds.get(record.error_kind, 0) + 1
    return ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"


def _max_in_flight(result: RunResult) -> int:
    edges = sorted(
        [(r.sent_s, 1) for r in result.records] + [(r.end_s, -1) for r in result.records]
    )
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def _connect(urls: Sequence[str], clock: RealClock) -> Callable[[float], Sender]:
    return lambda t0: RoundRobin(urls, clock, t0)


def _start_engines(
    procs: Processes, count: int, profile: str, cores: Sequence[int | None]
) -> list[str]:
    urls = []
    for k in range(count):
        port = free_port()
        argv = [sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
                "--model", MODEL, "--profile", profile, "--cold-start-s", "0",
                "--max-num-seqs", "4096", "--kv-capacity-tokens", "4194304"]  # fmt: skip
        proc = procs.start(f"{profile}-{k}", argv, cores[k % len(cores)])
        wait_ready(f"http://127.0.0.1:{port}/health", proc, 30.0)
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def rate_step(urls: Sequence[str], rate_rps: float, duration_s: float) -> tuple[bool, str]:
    clock = RealClock()
    spec = WorkloadSpec(model=MODEL, prompt_tokens=Fixed(32), output_tokens=Fixed(16))
    workload = Workload(spec, seed=1)
    offsets = schedule(steady(rate_rps), duration_s=duration_s)
    cpu0 = time.process_time()
    result = run_with_uvloop(run_open_loop(
        offsets, lambda i: workload.next(), clock=clock, connect=_connect(urls, clock),
        limits=RunLimits(duration_s=duration_s, drain_s=10.0),
    ))  # fmt: skip
    cpu_pct = 100 * (time.process_time() - cpu0) / result.duration_s
    lags = [r.lag_s for r in result.records]
    ok = sum(r.ok for r in result.records)
    chunks = sum(len(r.token_times_s) for r in result.records if r.ok)
    good = ok == len(result.records) and _pct(lags, 0.99) < LAG_P99_TARGET_S
    line = (
        f"{rate_rps:>8.0f} {len(result.records):>7} {ok:>7} {chunks / result.duration_s:>9.0f}"
        f" {_pct(lags, 0.5) * 1e3:>8.2f} {_pct(lags, 0.99) * 1e3:>8.2f} {max(lags) * 1e3:>8.2f}"
        f" {cpu_pct:>6.0f}%  {_errors(result)}"
    )
    return good, line


def concurrency_step(urls: Sequence[str], users: int, duration_s: float) -> str:
    clock = RealClock()
    spec = WorkloadSpec(model=MODEL, prompt_tokens=Fixed(32), output_tokens=Fixed(16))
    workload = Workload(spec, seed=2)
    cpu0 = time.process_time()
    result = run_with_uvloop(run_closed_loop(
        ClosedLoop(users), lambda i: workload.next(), clock=clock, connect=_connect(urls, clock),
        limits=RunLimits(duration_s=duration_s, drain_s=15.0),
    ))  # fmt: skip
    cpu_pct = 100 * (time.process_time() - cpu0) / result.duration_s
    ok = sum(r.ok for r in result.records)
    chunks = sum(len(r.token_times_s) for r in result.records if r.ok)
    return (
        f"{users} users: {len(result.records)} requests, {ok} ok, most in flight at once "
        f"{_max_in_flight(result)}, {chunks / result.duration_s:.0f} chunks/s, bench CPU "
        f"{cpu_pct:.0f}% of a core, errors: {_errors(result)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--rates", default="250,500,1000,1500,2000")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--engine-cores", default="", help="cores for engines, e.g. 1,2,3")
    args = ap.parse_args(argv)
    cores: list[int | None] = [int(c) for c in args.engine_cores.split(",") if c] or [None]
    with sigterm_as_exit(), TemporaryDirectory() as tmp, Processes(Path(tmp)) as procs:
        urls = _start_engines(procs, args.engines, "instant", cores)
        print(f"open loop, {args.engines} instant sim engines, 16 chunks per stream")
        print("  rate/s    sent      ok  chunks/s  lag p50  lag p99  lag max    cpu  errors")
        best = 0.0
        for rate in (float(r) for r in args.rates.split(",")):
            good, line = rate_step(urls, rate, args.duration)
            print(line, flush=True)
            best = rate if good else best
        print(f"largest rate with lag p99 < {LAG_P99_TARGET_S * 1e3:.0f} ms: {best:.0f} req/s")
        procs.stop_all()
        urls = _start_engines(procs, args.engines, "h100", cores)
        print(concurrency_step(urls, args.users, args.duration), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
