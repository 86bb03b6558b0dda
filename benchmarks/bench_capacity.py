"""How much load one bench process generates, side by side with GuideLLM on the same endpoint.

    python -m benchmarks.bench_capacity [--repeat 3] [--rates 100,250,...] [--users 500,1000,...]
    python -m benchmarks.bench_capacity --no-guidellm       # fleetserve bench only

1. Rate: a simulated engine in the `instant` profile (no modelled delays) answer streaming chat
   requests (32-word prompt, 16 tokens: 16 content chunks, a usage chunk, [DONE]). At each
   asked rate, upward, fleetserve bench's open-loop runner and then GuideLLM (`guidellm run
   --profile kind=constant,rate=R`, one worker process, the same prompts from a file) send to
   the same engine URL for
   `--duration` s, `--repeat` times, interleaved. A rate is *kept* when every scheduled request
   was sent and answered at >= 95 % of the asked rate, and *sustained* when, besides, the
   schedule lag (sent - intended; GuideLLM's dispatch delay) has p99 < 5 ms; a majority of the
   repeats decides. A tool stops climbing at the first rate it does not keep.
2. Streams: closed-loop users (GuideLLM: `kind=concurrent,streams=N`) against an `h100`
   engine (a stream lasts about a second there): held when no request failed and the asked
   number of streams was in flight at once.

This process (and GuideLLM's processes) run pinned to `--bench-core`; engines to the other
cores. Every run is bounded in time; every process is stopped by PID at the end. GuideLLM is
installed on first use into `.venv-guidellm/` (see `benchmarks/_guidellm.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks._capacity_stats import RunStats, Timing, summarize
from benchmarks._guidellm import (
    GuideLLMUnavailableError,
    Placement,
    ensure_guidellm,
    run_guidellm,
    write_dataset,
)
from benchmarks._harness import Processes, pin_self, sigterm_as_exit
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
from fleetserve.bench.schedule import Arrivals, ClosedLoop, schedule
from fleetserve.bench.workload import BuiltRequest, Workload, WorkloadSpec
from fleetserve.clock import RealClock
from fleetserve.fleet.processes import free_port

MODEL = "sim"
SPEC = WorkloadSpec(model=MODEL, prompt_tokens=Fixed(32), output_tokens=Fixed(16))
TOOLS = ("fleetserve", "guidellm")


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


def _connect(urls: Sequence[str], clock: RealClock) -> Callable[[float], Sender]:
    return lambda t0: RoundRobin(urls, clock, t0)


@contextlib.contextmanager
def _gc_off(off: bool) -> Iterator[None]:
    """Keep Python's cyclic GC out of a run: its gen-2 passes over the run's records stall the
    send loop for ~10 ms (lag p99 7-18 ms with it, 3-4 ms without, at 1,000 req/s here)."""
    if not off:
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _stats(result: RunResult, asked: float, expected: int, cpu_s: float) -> RunStats:
    timings = [Timing(r.intended_s, r.sent_s, r.end_s, r.error_kind) for r in result.records]
    return summarize("fleetserve", asked, expected, timings, 100 * cpu_s / result.duration_s)


def fleetserve_rate(
    urls: Sequence[str], rate: float, duration_s: float, arrivals: Arrivals, no_gc: bool = False
) -> RunStats:
    clock = RealClock()
    workload = Workload(SPEC, seed=1)
    offsets = schedule(steady(rate), duration_s=duration_s, arrivals=arrivals)
    cpu0 = time.process_time()
    with _gc_off(no_gc):
        result = run_with_uvloop(run_open_loop(
            offsets, lambda i: workload.next(), clock=clock, connect=_connect(urls, clock),
            limits=RunLimits(duration_s=duration_s, drain_s=10.0),
        ))  # fmt: skip
    return _stats(result, rate, len(offsets), time.process_time() - cpu0)


def fleetserve_streams(
    urls: Sequence[str], users: int, duration_s: float, no_gc: bool = False
) -> RunStats:
    clock = RealClock()
    workload = Workload(SPEC, seed=2)
    cpu0 = time.process_time()
    with _gc_off(no_gc):
        result = run_with_uvloop(run_closed_loop(
            ClosedLoop(users), lambda i: workload.next(), clock=clock,
            connect=_connect(urls, clock), limits=RunLimits(duration_s=duration_s, drain_s=15.0),
        ))  # fmt: skip
    return _stats(result, users, 0, time.process_time() - cpu0)


def _start_engines(procs: Processes, count: int, profile: str, cores: Sequence[int]) -> list[str]:
    urls = []
    for k in range(count):
        port = free_port()
        argv = [sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
                "--model", MODEL, "--profile", profile, "--cold-start-s", "0",
                "--max-num-seqs", "4096", "--kv-capacity-tokens", "4194304"]  # fmt: skip
        proc = procs.start(f"{profile}-{k}", argv, cores[k % len(cores)] if cores else None)
        proc.wait_ready(f"http://127.0.0.1:{port}/health", 30.0)
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.2f}"


def _line(s: RunStats) -> str:
    errors = ", ".join(f"{k} {n}" for k, n in sorted(s.errors.items())) or "none"
    cpu = "-" if s.cpu_pct is None else f"{s.cpu_pct:.0f}%"
    return (
        f"  {s.tool:<10} {s.asked:>6.0f} {s.sent:>7} {s.ok:>7} {s.achieved_rps:>8.0f}"
        f" {_ms(s.lag_p50_s):>8} {_ms(s.lag_p99_s):>8} {_ms(s.lag_max_s):>8} {s.max_in_flight:>6}"
        f" {cpu:>5}  {errors}" + (f"\n             {s.note}" if s.note else "")
    )


HEADER = (
    "  tool        asked    sent      ok  ach/s  lag p50  lag p99  lag max  inflt   cpu  errors"
)


def _majority(runs: Sequence[RunStats], test: Callable[[RunStats], bool]) -> bool:
    return sum(test(r) for r in runs) * 2 > len(runs)


def _min_med(values: Sequence[float], fmt: str) -> str:
    good = [v for v in values if not math.isnan(v)]
    return f"{fmt.format(min(good))} / {fmt.format(statistics.median(good))}" if good else "-"


class Climb:
    """Runs a tool at rising levels until it fails one; remembers what it kept and sustained."""

    def __init__(self, tool: str, run: Callable[[float], RunStats] | None) -> None:
        self.tool, self.run = tool, run
        self.results: dict[float, list[RunStats]] = {}
        self.climbing = run is not None

    def step(self, level: float) -> None:
        if self.climbing and self.run is not None:
            stats = self.run(level)
            self.results.setdefault(level, []).append(stats)
            print(_line(stats), flush=True)

    def close_level(self, level: float, keeps: Callable[[RunStats], bool]) -> None:
        if self.climbing and not _majority(self.results[level], keeps):
            self.climbing = False

    def best(self, test: Callable[[RunStats], bool]) -> float:
        return max((lvl for lvl, runs in self.results.items() if _majority(runs, test)), default=0)

    def best_text(self, test: Callable[[RunStats], bool], top: float) -> str:
        """The best level, marked when it is the top of the asked range (the limit is higher)."""
        best = self.best(test)
        return f">= {best:.0f} (top asked)" if best >= top else f"{best:.0f}"

    def highest_achieved(self) -> float:
        return max((r.achieved_rps for runs in self.results.values() for r in runs), default=0)


def _summary(
    climbs: Sequence[Climb], levels: Sequence[float], unit: str, name: str,
    figure: Callable[[RunStats], float],
) -> None:  # fmt: skip
    """Per level and tool: achieved req/s and one more figure, each as min / median."""
    head = "".join(f" | {c.tool + ' ach/s':>17} {name:>17}" for c in climbs)
    print(f"\n  {unit:>7}{head} | ratio of medians (ach/s)")
    for level in levels:
        cells, medians = [], []
        for c in climbs:
            runs = c.results.get(level, [])
            achieved = [r.achieved_rps for r in runs]
            medians.append(statistics.median(achieved) if runs else math.nan)
            other = _min_med([figure(r) for r in runs], "{:.2f}")
            cells.append(f" | {_min_med(achieved, '{:.0f}'):>17} {other:>17}")
        ratio = medians[0] / medians[1] if len(medians) > 1 and medians[1] > 0 else math.nan
        print(f"  {level:>7.0f}{''.join(cells)} | {'-' if math.isnan(ratio) else f'{ratio:.2f}'}")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a (GuideLLM reached none of the asked levels)"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--engines", type=int, default=1, help="GuideLLM sends to the first only")
    ap.add_argument("--rates", default="100,250,500,750,1000,1250,1500,2000,2500,3000")
    ap.add_argument("--arrivals", choices=("constant", "poisson"), default="constant")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--users", default="500,1000,2000,3000")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--bench-core", type=int, default=0)
    ap.add_argument("--engine-cores", default="", help="default: every core but the bench's")
    ap.add_argument("--no-guidellm", action="store_true")
    ap.add_argument("--no-gc", action="store_true", help="bench's runs with Python's GC off")
    ap.add_argument("--guidellm-workers", type=int, default=1, help="its worker processes")
    ap.add_argument("--guidellm-cores", default=None, help="taskset list; default: bench core")
    return ap.parse_args(argv)


class Session:
    """The engines' URLs and GuideLLM's place for one phase (rate or streams)."""

    def __init__(self, args: argparse.Namespace, exe: Path | None, work: Path) -> None:
        self.args, self.exe, self.work = args, exe, work
        self.urls: list[str] = []
        cores = str(args.bench_core) if args.guidellm_cores is None else args.guidellm_cores
        self.place = Placement(cores, args.guidellm_workers)

    def guidellm_rate(self, rate: float) -> RunStats:
        assert self.exe is not None
        arrivals, duration_s = self.args.arrivals, self.args.duration
        count = len(schedule(steady(rate), duration_s=duration_s, arrivals=arrivals))
        data = write_dataset(self.work / "rate.jsonl", Workload(SPEC, seed=1), count)
        return run_guidellm(
            self.exe, self.urls[0], MODEL, profile=f"kind={arrivals},rate={rate:g}", asked=rate,
            expected=count, data=data, limit_s=3 * duration_s + 5, place=self.place,
            workdir=self.work,
        )  # fmt: skip

    def guidellm_streams(self, streams: float) -> RunStats:
        assert self.exe is not None
        data = write_dataset(self.work / "streams.jsonl", Workload(SPEC, seed=2), int(streams) * 4)
        return run_guidellm(
            self.exe, self.urls[0], MODEL, profile=f"kind=concurrent,streams={streams:g}",
            asked=streams, expected=0, data=data, limit_s=self.args.duration,
            place=self.place, workdir=self.work, closed_loop=True,
        )  # fmt: skip

    def climb(
        self, climbs: Sequence[Climb], levels: Sequence[float], keeps: Callable[[RunStats], bool]
    ) -> None:
        for level in levels:
            for _ in range(self.args.repeat):
                for climb in climbs:
                    climb.step(level)
            for climb in climbs:
                climb.close_level(level, keeps)
            if not any(c.climbing for c in climbs):
                break


def _verdict(
    rate_climbs: Sequence[Climb], stream_climbs: Sequence[Climb], top_rate: float,
    top_streams: float,
) -> None:  # fmt: skip
    fs, gl = rate_climbs
    print("\nlargest rate kept (>= 95 % achieved, no errors) and sustained (also lag p99 < 5 ms),")
    print("by a majority of the repeats; highest rate any run achieved:")
    for c in (c for c in rate_climbs if c.results):
        kept = c.best_text(RunStats.keeps_rate, top_rate)
        held = c.best_text(RunStats.sustains_rate, top_rate)
        high = c.highest_achieved()
        print(
            f"  {c.tool:<10} kept {kept} req/s, sustained {held} req/s, highest achieved {high:.0f}"
        )
    for c in (c for c in stream_climbs if c.results):
        print(f"  {c.tool:<10} streams held {c.best_text(RunStats.holds_streams, top_streams)}")
    sustained = fs.best(RunStats.sustains_rate)
    streams = [c.best(RunStats.holds_streams) for c in stream_climbs]
    print(f"  targets: >= 1000 req/s sustained: {'met' if sustained >= 1000 else 'MISSED'}; "
          f">= 2000 streams: {'met' if streams[0] >= 2000 else 'MISSED'}")  # fmt: skip
    if not gl.results:
        print("  GuideLLM: not measured (see above)")
        return
    print(f"  ratio fleetserve / GuideLLM: sustained rate "
          f"{_ratio(sustained, gl.best(RunStats.sustains_rate))}, kept rate "
          f"{_ratio(fs.best(RunStats.keeps_rate), gl.best(RunStats.keeps_rate))}, highest achieved "
          f"{_ratio(fs.highest_achieved(), gl.highest_achieved())}, streams "
          f"{_ratio(streams[0], streams[1])}")  # fmt: skip
    print("  (a ratio against a best at the top of the asked range is a lower bound)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    cores = [int(c) for c in args.engine_cores.split(",") if c]
    cores = cores or sorted(os.sched_getaffinity(0) - {args.bench_core})
    pin_self(args.bench_core)
    rates = [float(r) for r in args.rates.split(",")]
    users = [float(u) for u in args.users.split(",")]
    gl_cores = args.bench_core if args.guidellm_cores is None else args.guidellm_cores or "any"
    print(
        f"bench on core {args.bench_core}, engines on cores {cores or 'any'}, GuideLLM on cores "
        f"{gl_cores} with {args.guidellm_workers} worker(s); "
        f"{args.duration:g} s a run, {args.repeat} repeat(s), {args.arrivals} arrivals"
        + (", bench's GC off during its runs (--no-gc)" if args.no_gc else "")
    )
    exe: Path | None = None
    if not args.no_guidellm:
        try:
            exe = ensure_guidellm(sys.executable)
        except GuideLLMUnavailableError as error:
            print(f"GuideLLM NOT MEASURED: {error}")
    with sigterm_as_exit(), TemporaryDirectory() as tmp, Processes(Path(tmp)) as procs:
        run = Session(args, exe, Path(tmp))
        run.urls = _start_engines(procs, args.engines, "instant", cores)
        print(f"\nopen loop, {args.engines} instant sim engine(s), 16 chunks a stream\n{HEADER}")
        rate_climbs = [
            Climb(
                "fleetserve", lambda r: fleetserve_rate(run.urls, r, args.duration, args.arrivals)
            ),
            Climb("guidellm", run.guidellm_rate if exe else None),
        ]
        run.climb(rate_climbs, rates, RunStats.keeps_rate)
        procs.stop_all()
        run.urls = _start_engines(procs, args.engines, "h100", cores)
        print(f"\nclosed loop, {args.engines} h100 sim engine(s)\n{HEADER}")
        stream_climbs = [
            Climb(
                "fleetserve",
                lambda n: fleetserve_streams(run.urls, int(n), args.duration, args.no_gc),
            ),
            Climb("guidellm", run.guidellm_streams if exe else None),
        ]
        run.climb(stream_climbs, users, RunStats.holds_streams)
    measured = [c for c in rate_climbs if c.results]
    levels = [r for r in rates if any(r in c.results for c in measured)]
    _summary(measured, levels, "req/s", "lag p99 ms", lambda r: r.lag_p99_s * 1e3)
    measured = [c for c in stream_climbs if c.results]
    levels = [n for n in users if any(n in c.results for c in measured)]
    _summary(measured, levels, "streams", "in flight", lambda r: float(r.max_in_flight))
    _verdict(rate_climbs, stream_climbs, max(rates), max(users))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
