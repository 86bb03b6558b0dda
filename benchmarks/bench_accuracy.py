"""Does `fleetserve bench` measure what the server did? Bench's TTFT and TPOT against the
simulated engine's own per-request measurement (issue 4's accuracy check).

Setup: N simulated engines (`fleetserve engine sim`, profile a10g by default: its latency model
is known) pinned to one core, driven directly (no gateway) by bench's own runner and client
(`fleetserve.bench.runner.run_closed_loop`, `bench.client.BenchClient`) from this process,
pinned to the other core, on uvloop with the GC paused. Each request goes to the engine with
the fewest in flight (ties in turn), so each engine holds C / N streams. For each concurrency
(closed loop, C users, no think time), one run:

1. every engine's log is cleared (`DELETE /sim/requests`);
2. warm-up: users join over its first half (`--start ramp`; `lockstep`: all at t=0), which
   also opens the client's connections (connect time is latency only the client sees);
3. the measured window: both sides keep the requests that started in it, bench's by send
   time, the engines' by arrival time, on the machine's one monotonic clock;
4. each engine's log is read (`GET /sim/requests`, paged): per request, TTFT = first chunk
   written - arrival (the engine's HTTP parser began the request: its first bytes were read
   off the socket), TPOT = (last chunk written - first) / (tokens - 1);
5. bench's figures come from its records through `bench.samples` (the same code and percentile
   method the report uses); the engines' through the same `percentile`.

Printed per concurrency: count, p50 and p99 of TTFT and TPOT on both sides, the difference
(bench - engine) in ms at p50 and in % at p99, and PASS/FAIL against issue 4's targets:
|diff| <= 1 ms at the median and <= 5 % at p99. Then, per request (bench's X-Request-Id, which
the engines log, matches the two sides one by one): bench TTFT - engine TTFT, and where the two
part: the way in (engine arrival - bench send: loopback and the engine's socket queue), the
wait inside the engine (body read - arrival: its event loop busy with other work; inside the
engine's TTFT, so not a difference), the way out (bench first token - engine first write);
the TTFT difference had the engines counted from the body read (the stamp before); and the
engines' cost, CPU seconds per chunk written over the whole run. Exit status 1 if any request
failed or a target was missed.

    .venv/bin/python -m benchmarks.bench_accuracy                  # 10 and 500 streams, ~2 min
    .venv/bin/python -m benchmarks.bench_accuracy --quick          # smoke run, ~40 s
    .venv/bin/python -m benchmarks.bench_accuracy --streams 10 --duration-s 60
    .venv/bin/python -m benchmarks.bench_accuracy --repeat 3       # each point 3 times

The difference holds the loopback hop both ways, this process's event-loop delay in reading
and stamping chunks, and the time a request waits in the engine's socket before the engine
reads it (no server-side stamp can see that). TPOT is a difference of two stamps of one request
on each side, so these cancel; TTFT carries them. On a 2-core machine with every engine on one
core, that socket wait dominates at 500 streams: see the way-in line and benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import uvloop

from benchmarks._harness import Processes, pin_self, sigterm_as_exit
from fleetserve.bench.client import BenchClient, ClientSettings
from fleetserve.bench.lengths import Fixed
from fleetserve.bench.patterns import ramp
from fleetserve.bench.records import RequestRecord
from fleetserve.bench.runner import RunLimits, run_closed_loop
from fleetserve.bench.samples import collect_samples, request_times
from fleetserve.bench.schedule import ClosedLoop
from fleetserve.bench.workload import BuiltRequest, Workload, WorkloadSpec
from fleetserve.clock import RealClock
from fleetserve.fleet.processes import free_port
from fleetserve.telemetry.quantiles import percentile

MODEL = "sim-llama"
ENGINE_CORE = 1
CLIENT_CORE = 0
P50_TARGET_MS = 1.0
P99_TARGET_PCT = 5.0
LOG_PAGE = 20_000  # entries per GET /sim/requests
READY_TIMEOUT_S = 30.0


class LeastBusy:
    """A runner `Sender` over one bench client per engine: each request goes to the engine with
    the fewest in flight (ties taken in turn).

    Each engine then holds its share of the streams (C / N, +-1) all run long, so the
    connections the warm-up opened are all it needs: plain round robin lets an engine's share
    drift above it, and every new connection inside the measured window adds a connect
    (latency only the client sees) to one request's TTFT. In a closed loop the engine with the
    fewest in flight is mostly the one a request just ended on, so a user's next request goes
    back to the engine that served its last, as with sticky sessions; round robin sends it to
    another engine, which on a shared core waits behind the first one's writes.
    """

    def __init__(self, clients: Sequence[BenchClient], *, round_robin: bool = False) -> None:
        self.clients = list(clients)
        self.round_robin = round_robin  # plain round robin instead (`--spread round-robin`)
        self._in_flight = [0] * len(self.clients)
        self._turn = 0
        self.t0 = 0.0

    def bind(self, t0: float) -> LeastBusy:
        """Time the next run from `t0` (the runner's start), keeping the pooled connections."""
        self.t0 = t0
        for client in self.clients:
            client.t0 = t0
        return self

    def _pick(self) -> int:
        n = len(self.clients)
        self._turn = (self._turn + 1) % n
        if self.round_robin:
            return self._turn
        order = [(self._turn + k) % n for k in range(n)]
        return min(order, key=self._in_flight.__getitem__)

    async def send(self, request: BuiltRequest, record: RequestRecord) -> None:
        i = self._pick()
        self._in_flight[i] += 1
        try:
            await self.clients[i].send(request, record)
        finally:
            self._in_flight[i] -= 1

    async def close(self) -> None:
        """Kept open between runs; `close_all` ends them."""

    async def close_all(self) -> None:
        for client in self.clients:
            await client.close()


@dataclass(frozen=True, slots=True)
class Side:
    """One side's TTFT and TPOT samples, in seconds, ascending."""

    ttft_s: list[float]
    tpot_s: list[float]


@dataclass(frozen=True, slots=True)
class Point:
    streams: int
    bench: Side
    engine: Side
    requests_ok: int
    requests_failed: int
    engine_requests: int
    engine_missed: int
    duration_s: float
    # Where bench and the engines part, per request (matched by bench's X-Request-Id, which
    # the engines log), on the shared monotonic clock, each list ascending: the way in
    # (engine arrival - bench send: loopback, and the engine's socket queue before its parser
    # reads the request), the wait inside the engine (body read - arrival: its event loop
    # busy with other work), the way out (bench first token - engine first write).
    request_path_s: list[float]
    engine_wait_s: list[float]
    response_path_s: list[float]
    ttft_diff_s: list[float]  # bench TTFT - engine TTFT, per request
    # The engines' TTFT counted from the body read (the stamp before arrival was the parser's).
    engine_ttft_from_read_s: list[float]
    # The engines' cost: CPU seconds (user + system, all engines) over the whole run, warm-up
    # included, and the response chunks (body writes) they made in it; the run's wall time.
    engine_cpu_s: float
    engine_writes: int
    run_s: float


async def engine_log(http: aiohttp.ClientSession, url: str) -> tuple[list[dict[str, Any]], int]:
    """Every entry of one engine's request log, and how many the ring dropped unread."""
    rows: list[dict[str, Any]] = []
    since, missed = 0, 0
    for _ in range(1000):  # bounded: 20 M entries
        params = {"since": str(since), "limit": str(LOG_PAGE)}
        async with http.get(f"{url}/sim/requests", params=params) as response:
            response.raise_for_status()
            page = await response.json()
        missed += page["missed"] if since == 0 else 0
        rows += page["requests"]
        if not page["requests"]:
            return rows, missed
        since = page["next"]
    raise RuntimeError(f"{url}/sim/requests did not end")


def engine_side(rows: Sequence[dict[str, Any]]) -> Side:
    done = [r for r in rows if r["stream"] and r["finish_reason"] in ("length", "stop")]
    ttft = sorted(r["ttft_s"] for r in done if r["ttft_s"] is not None)
    tpot = sorted(r["tpot_s"] for r in done if r["tpot_s"] is not None)
    return Side(ttft, tpot)


def bench_side(records: Sequence[RequestRecord]) -> Side:
    samples = collect_samples(request_times(r) for r in records if r.ok)
    return Side(samples.ttft_s, samples.tpot_s)


def cpu_s(procs: Sequence[psutil.Process]) -> float:
    """CPU seconds (user + system) the processes have used so far."""
    return sum(t.user + t.system for t in (p.cpu_times() for p in procs))


async def measure(
    urls: Sequence[str],
    pids: Sequence[int],
    streams: int,
    args: argparse.Namespace,
    workload: WorkloadSpec,
) -> Point:
    """One closed-loop run: users join over the warm-up (or all at once), then the measured
    window. Both sides keep the requests that started inside the window: bench's by send
    time, the engines' by arrival time, both on the machine's monotonic clock (the engines
    are processes on this machine, and Python's monotonic clock is the system-wide one)."""
    clock = RealClock()
    settings = [ClientSettings(url, total_timeout_s=120.0, idle_timeout_s=60.0) for url in urls]
    clients = [BenchClient(s, clock, t0=clock.now()) for s in settings]
    sender = LeastBusy(clients, round_robin=args.spread == "round-robin")
    warmup_s, lockstep = args.warmup_s, args.start == "lockstep"
    # Users joining over the warm-up keep their requests spread over the engines' steps; all
    # joining at once (lockstep) makes every wave of requests reach an engine together.
    pattern = None if lockstep else ramp(1, streams, max(warmup_s / 2, 0.1))
    users = ClosedLoop(users=streams, pattern=pattern)
    build = Workload(workload, seed=streams).next
    engines = [psutil.Process(pid) for pid in pids]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            for url in urls:
                async with http.delete(f"{url}/sim/requests") as response:
                    response.raise_for_status()
            gc.collect()
            gc.disable()  # a GC pause in this process would land in bench's figures only
            cpu0_s, wall0_s = cpu_s(engines), clock.now()
            try:
                result = await run_closed_loop(
                    users, lambda _: build(), clock=clock, connect=sender.bind,
                    limits=RunLimits(duration_s=warmup_s + args.duration_s, drain_s=60.0),
                )  # fmt: skip
            finally:
                gc.enable()
            engine_cpu_s, run_s = cpu_s(engines) - cpu0_s, clock.now() - wall0_s
            logs = [await engine_log(http, url) for url in urls]
    finally:
        await sender.close_all()
    cut_s = sender.t0 + warmup_s  # on the monotonic clock
    records = [r for r in result.records if sender.t0 + r.sent_s >= cut_s]
    rows = [row for entries, _ in logs for row in entries if row["arrival_s"] >= cut_s]
    ok = sum(r.ok for r in records)
    paths = request_paths(sender.t0, records, rows)
    return Point(
        streams=streams,
        bench=bench_side(records),
        engine=engine_side(rows),
        requests_ok=ok,
        requests_failed=sum(not r.ok for r in result.records),
        engine_requests=len(rows),
        engine_missed=sum(missed for _, missed in logs),
        duration_s=args.duration_s,
        request_path_s=paths[0],
        engine_wait_s=paths[1],
        response_path_s=paths[2],
        ttft_diff_s=paths[3],
        engine_ttft_from_read_s=sorted(
            r["first_write_s"] - r["body_read_s"]
            for r in rows
            if r["ttft_s"] is not None and r.get("body_read_s") is not None
        ),
        engine_cpu_s=engine_cpu_s,
        engine_writes=sum(row["writes"] for entries, _ in logs for row in entries),
        run_s=run_s,
    )


def request_paths(
    t0: float, records: Sequence[RequestRecord], rows: Sequence[dict[str, Any]]
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Way in, wait in the engine, way out and TTFT difference of each request both sides
    saw (bench's records by `bench-<index>`, the engines' rows by the id they logged)."""
    by_id = {row["request_id"]: row for row in rows if row.get("request_id")}
    way_in, wait, way_out, diff = [], [], [], []
    for record in records:
        row = by_id.get(f"bench-{record.index}")
        if row is None or not record.ok or record.first_token_s is None:
            continue
        if row["first_write_s"] is None or row["ttft_s"] is None:
            continue
        way_in.append(row["arrival_s"] - (t0 + record.sent_s))
        wait.append((row.get("body_read_s") or row["arrival_s"]) - row["arrival_s"])
        way_out.append(t0 + record.first_token_s - row["first_write_s"])
        diff.append(record.first_token_s - record.sent_s - row["ttft_s"])
    return sorted(way_in), sorted(wait), sorted(way_out), sorted(diff)


# --- verdicts and printing ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comparison:
    metric: str
    bench_p50_ms: float
    engine_p50_ms: float
    bench_p99_ms: float
    engine_p99_ms: float

    @property
    def p50_diff_ms(self) -> float:
        return self.bench_p50_ms - self.engine_p50_ms

    @property
    def p99_diff_pct(self) -> float:
        return 100.0 * (self.bench_p99_ms - self.engine_p99_ms) / self.engine_p99_ms

    @property
    def passed(self) -> bool:
        return abs(self.p50_diff_ms) <= P50_TARGET_MS and abs(self.p99_diff_pct) <= P99_TARGET_PCT


def compare(metric: str, bench: Sequence[float], engine: Sequence[float]) -> Comparison | None:
    if not bench or not engine:
        return None
    return Comparison(
        metric,
        1000 * percentile(bench, 50),
        1000 * percentile(engine, 50),
        1000 * percentile(bench, 99),
        1000 * percentile(engine, 99),
    )


def render(point: Point) -> tuple[str, bool]:
    lines = [
        f"{point.streams} concurrent streams: {point.requests_ok} ok in the {point.duration_s:g} s "
        f"window ({point.requests_failed} failed in the run); engines logged "
        f"{point.engine_requests}"
        + (f" ({point.engine_missed} dropped from the ring)" if point.engine_missed else ""),
        f"  {'metric':<6} {'n bench/engine':>15} {'p50 bench':>10} {'p50 engine':>11} "
        f"{'diff ms':>8} {'p99 bench':>10} {'p99 engine':>11} {'diff %':>7}  verdict",
    ]
    same_count = abs(point.requests_ok - point.engine_requests) <= max(2, point.requests_ok // 200)
    ok = point.requests_failed == 0 and same_count
    for metric, bench, engine in (
        ("TTFT", point.bench.ttft_s, point.engine.ttft_s),
        ("TPOT", point.bench.tpot_s, point.engine.tpot_s),
    ):
        c = compare(metric, bench, engine)
        if c is None:
            lines.append(f"  {metric:<6} no samples")
            ok = False
            continue
        ok &= c.passed
        counts = f"{len(bench)}/{len(engine)}"
        lines.append(
            f"  {metric:<6} {counts:>15} {c.bench_p50_ms:>10.3f} {c.engine_p50_ms:>11.3f} "
            f"{c.p50_diff_ms:>+8.3f} {c.bench_p99_ms:>10.3f} {c.engine_p99_ms:>11.3f} "
            f"{c.p99_diff_pct:>+7.2f}  {'PASS' if c.passed else 'FAIL'}"
        )
    lines.append(f"  per request ({len(point.ttft_diff_s)} matched by X-Request-Id), ms:")
    for name, values in (
        ("bench TTFT - engine TTFT", point.ttft_diff_s),
        ("way in: engine arrival - bench send", point.request_path_s),
        ("(in engine TTFT) body read - arrival", point.engine_wait_s),
        ("way out: bench first token - engine first write", point.response_path_s),
    ):
        if values:
            p50, p90, p99 = (1000 * percentile(values, p) for p in (50, 90, 99))
            mean = 1000 * sum(values) / len(values)
            lines.append(
                f"    {name:<49} p50 {p50:7.3f}  p90 {p90:7.3f}  p99 {p99:7.3f}  mean {mean:7.3f}"
            )
    old = compare("TTFT", point.bench.ttft_s, point.engine_ttft_from_read_s)
    if old is not None:
        lines.append(
            f"  TTFT with the engine counting from the body read instead: p50 diff "
            f"{old.p50_diff_ms:+.3f} ms, p99 diff {old.p99_diff_pct:+.2f} %"
        )
    if point.engine_writes:
        per_chunk_us = 1e6 * point.engine_cpu_s / point.engine_writes
        lines.append(
            f"  engine cost (whole run): {per_chunk_us:.1f} us CPU per chunk written "
            f"({point.engine_writes} chunks, {point.engine_cpu_s:.2f} s CPU in "
            f"{point.run_s:.1f} s: the engines' core {100 * point.engine_cpu_s / point.run_s:.0f}"
            f" % busy)"
        )
    if not same_count:
        lines.append("  MISMATCH: bench and the engines do not count the same requests")
    return "\n".join(lines), ok


def summary_line(streams: int, runs: Sequence[tuple[Point, bool]]) -> str:
    """One line per concurrency over the repeats: verdicts, and each run's TTFT p50 diff."""
    diffs = []
    for point, _ in runs:
        c = compare("TTFT", point.bench.ttft_s, point.engine.ttft_s)
        diffs.append("-" if c is None else f"{c.p50_diff_ms:+.2f}")
    shifts = [
        f"{1000 * percentile(p.ttft_diff_s, 50):.2f}" if p.ttft_diff_s else "-" for p, _ in runs
    ]
    passed = sum(ok for _, ok in runs)
    return (
        f"{streams} streams: {passed} of {len(runs)} runs PASS; TTFT p50 diff (ms) per run "
        f"{', '.join(diffs)}; per-request TTFT shift p50 (ms) {', '.join(shifts)}"
    )


def machine_facts(args: argparse.Namespace) -> str:
    load1, load5, _ = os.getloadavg()
    return (
        f"machine : {os.cpu_count()} cores, load average {load1:.2f} / {load5:.2f} (1/5 min); "
        f"engines on core {ENGINE_CORE}, bench on core {CLIENT_CORE} (uvloop, GC paused)\n"
        f"setup   : {args.engines} x `fleetserve engine sim --profile {args.profile}`, direct; "
        f"{args.spread} spread, closed loop ({args.start} start), {args.api} streams of "
        f"{args.prompt_tokens} "
        f"prompt words and {args.output_tokens} output tokens; {args.duration_s:g} s measured "
        f"after "
        f"{args.warmup_s:g} s of warm-up per point\n"
        f"targets : |bench - engine| <= {P50_TARGET_MS:g} ms at p50 and <= "
        f"{P99_TARGET_PCT:g} % at p99, TTFT and TPOT"
    )


# --- main ---------------------------------------------------------------------------------


def start_engines(procs: Processes, args: argparse.Namespace) -> list[tuple[str, int]]:
    """(url, pid) of each engine, once all are ready."""
    urls = []
    for i in range(args.engines):
        port = free_port()
        argv = [sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
                "--model", MODEL, "--profile", args.profile, "--cold-start-s", "0"]  # fmt: skip
        proc = procs.start(f"engine-{i}", argv, ENGINE_CORE)
        urls.append((f"http://127.0.0.1:{port}", proc))
    for url, proc in urls:
        proc.wait_ready(f"{url}/health", READY_TIMEOUT_S)
    return [(url, proc.pid) for url, proc in urls]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", default="10,500", help="concurrencies, comma-separated")
    parser.add_argument("--engines", type=int, default=4, help="simulated engines")
    parser.add_argument("--profile", default="a10g", help="sim profile (a10g, l4, h100, instant)")
    parser.add_argument("--duration-s", type=float, default=30.0, help="measured, per point")
    parser.add_argument("--warmup-s", type=float, default=6.0, help="not measured, per point")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--api", choices=("chat", "completions"), default="chat")
    parser.add_argument(
        "--start", choices=("ramp", "lockstep"), default="ramp",
        help="users join over the first half of the warm-up (ramp) or all at t=0 (lockstep)",
    )  # fmt: skip
    parser.add_argument(
        "--spread", choices=("least-busy", "round-robin"), default="least-busy",
        help="which engine gets a request: the one with the fewest in flight, or the next",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="10 s per point, 4 s warm-up")
    parser.add_argument(
        "--repeat", type=int, default=1, help="measure every point this many times (rounds)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration_s, args.warmup_s = 10.0, 4.0
    args.stream_counts = [int(s) for s in args.streams.split(",") if s.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    workload = WorkloadSpec(
        model=MODEL,
        api=args.api,
        stream=True,
        prompt_tokens=Fixed(args.prompt_tokens),
        output_tokens=Fixed(args.output_tokens),
    )
    print(machine_facts(args), flush=True)
    all_ok = True
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix="bench-accuracy-") as logs,
        Processes(Path(logs)) as procs,
    ):
        engines = start_engines(procs, args)
        urls, pids = [url for url, _ in engines], [pid for _, pid in engines]
        pin_self(CLIENT_CORE)
        verdicts: dict[int, list[tuple[Point, bool]]] = {}
        for round_ in range(1, args.repeat + 1):
            for streams in args.stream_counts:
                t0 = time.monotonic()
                point = uvloop.run(measure(urls, pids, streams, args, workload))
                text, ok = render(point)
                all_ok &= ok
                verdicts.setdefault(streams, []).append((point, ok))
                took = f"point took {time.monotonic() - t0:.0f} s"
                if args.repeat > 1:
                    took += f"; round {round_} of {args.repeat}"
                print(f"\n{text}\n  ({took})", flush=True)
    if args.repeat > 1:
        print()
        for streams, runs in verdicts.items():
            print(summary_line(streams, runs))
    print(f"\noverall: {'PASS' if all_ok else 'FAIL'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
