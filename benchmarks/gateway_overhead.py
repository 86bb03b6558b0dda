"""What one gateway worker costs: fleetserve's gateway against direct calls to the same engines.

Two simulated engines (profile `instant`: no modelled delays) sit on one core with the load
generators; one gateway worker is pinned alone on the other core. In one run it measures

A. max non-stream req/s of the gateway worker (wrk, closed loop), with the direct figure on
   the same setup for reference;
B. latency and TTFT at fixed open-loop rates of streams (16 chunks), direct and through the
   gateway; "added" = gateway minus direct at the same point;
C. max streams/s of the gateway worker (wrk, closed loop, 16-chunk streams), direct beside it;
0. and, as the machine's own floor for B, TCP round trips within one core and across cores.

    .venv/bin/python -m benchmarks.gateway_overhead              # one run, about 1 minute
    .venv/bin/python -m benchmarks.gateway_overhead --repeat 3   # min/median over 3 runs
    .venv/bin/python -m benchmarks.gateway_overhead --quick      # smoke run, a few seconds
    .venv/bin/python -m benchmarks.gateway_overhead --observability   # tracing 0.1 + JSON
                                                  # access logs next to both off (_observability)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._harness import (
    LOCALHOST,
    CpuUsage,
    CpuWindow,
    OpenLoopResult,
    OpenLoopSpec,
    Processes,
    RoundTrip,
    chat_body,
    cpu_model,
    first_line,
    loopback_round_trip,
    merge_results,
    pin_self,
    run_open_loop,
    run_wrk,
    sigterm_as_exit,
    wrk_post_script,
)
from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess

MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
STUB_PATH = Path("/work/shared/tools/peerbench/upstream.py")
REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 60.0

TARGET_RPS = 4000.0
STREAM_CONNECTIONS = 32
TARGET_RATE_RPS = 200.0
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 2.0


@dataclass(frozen=True, slots=True)
class Plan:
    """How long each part runs; the full plan keeps one run near one minute."""

    wrk_warmup_s: float
    wrk_s: float
    connections: int
    rates_rps: tuple[float, ...]
    point_warmup_s: float
    point_s: float
    point_slices: int
    rtt_rounds: int
    max_tokens: int = 16


FULL = Plan(wrk_warmup_s=2, wrk_s=8, connections=64, rates_rps=(50, 200), point_warmup_s=1,
            point_s=8, point_slices=4, rtt_rounds=500)  # fmt: skip
QUICK = Plan(wrk_warmup_s=1, wrk_s=1, connections=64, rates_rps=(50, 200), point_warmup_s=0.3,
             point_s=1, point_slices=1, rtt_rounds=100)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Setup:
    upstream_kind: str  # "sim" or "stub"
    python: Path
    fleetserve: Path
    stub_path: Path
    gateway_core: int
    load_core: int
    gateway_src: Path | None = None  # run the gateway from this checkout's src/ (A/B runs)


# --- one run: data -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Throughput:
    path: str  # "direct" or "gateway"
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    cpu: CpuUsage

    @property
    def gateway_cpu_us(self) -> float | None:
        """Gateway CPU per request, in microseconds (gateway path only)."""
        pct = self.cpu.process_pct.get("gateway") if self.path == "gateway" else None
        return None if pct is None or self.rps <= 0 else pct / 100.0 / self.rps * 1e6


@dataclass(frozen=True, slots=True)
class LatencyPoint:
    path: str
    rate_rps: float
    sent: int
    ok: int
    errors: dict[str, int]
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    send_lag_p99_ms: float | None
    reads_p50: float | None  # body reads the client needed per stream
    gateway_cpu_us: float | None  # gateway CPU per request (gateway path only)

    @classmethod
    def of(cls, path: str, res: OpenLoopResult) -> LatencyPoint:
        gw_pct = res.cpu.process_pct.get("gateway") if res.cpu and path == "gateway" else None
        reads = statistics.median(res.reads_per_stream) if res.reads_per_stream else None
        return cls(
            path,
            res.spec.rate_rps,
            res.sent,
            res.ok,
            dict(res.errors),
            res.ms(res.e2e_s, 50),
            res.ms(res.e2e_s, 99),
            res.ms(res.ttft_s, 50),
            res.ms(res.ttft_s, 99),
            res.ms(res.send_lag_s, 99),
            reads,
            None if gw_pct is None else gw_pct / 100.0 / res.spec.rate_rps * 1e6,
        )


@dataclass
class RunReport:
    throughput: list[Throughput] = field(default_factory=list)
    stream_throughput: list[Throughput] = field(default_factory=list)  # C: closed-loop streams
    latency: list[LatencyPoint] = field(default_factory=list)
    round_trips: dict[str, RoundTrip] = field(default_factory=dict)  # "same core", "cross core"

    def point(self, path: str, rate: float) -> LatencyPoint:
        return next(p for p in self.latency if p.path == path and p.rate_rps == rate)

    def errors(self) -> int:
        closed = [*self.throughput, *self.stream_throughput]
        return sum(t.errors for t in closed) + sum(sum(p.errors.values()) for p in self.latency)

    def figures(self) -> dict[str, float | None]:
        """The numbers that --repeat aggregates, by display name."""
        out: dict[str, float | None] = {}
        for where, rtt in self.round_trips.items():
            out[f"loopback RTT {where} p50 us"] = rtt.p50_us
            out[f"loopback RTT {where} p99 us"] = rtt.p99_us
        for t in self.throughput:
            out[f"{t.path} req/s (non-stream, wrk -c64)"] = t.rps
            if t.path == "gateway":
                us = t.gateway_cpu_us
                out["gateway CPU us/request (non-stream)"] = us
                # What the worker would serve with its core to itself: less noise-sensitive.
                out["gateway req per CPU-second (non-stream)"] = 1e6 / us if us else None
        for t in self.stream_throughput:
            out[f"{t.path} streams/s (closed loop, wrk -c{STREAM_CONNECTIONS})"] = t.rps
            if t.path == "gateway":
                out["gateway CPU us/stream (closed loop)"] = t.gateway_cpu_us
        for rate in sorted({p.rate_rps for p in self.latency}):
            direct, gateway = self.point("direct", rate), self.point("gateway", rate)
            for label, attr in ADDED:
                out[f"added {label} ms @{rate:g} rps"] = _minus(
                    getattr(gateway, attr), getattr(direct, attr)
                )
            out[f"direct e2e p50 ms @{rate:g} rps"] = direct.e2e_p50_ms
            out[f"gateway CPU us/stream @{rate:g} rps"] = gateway.gateway_cpu_us
        return out


ADDED = (
    ("e2e p50", "e2e_p50_ms"),
    ("e2e p99", "e2e_p99_ms"),
    ("TTFT p50", "ttft_p50_ms"),
    ("TTFT p99", "ttft_p99_ms"),
)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# --- one run: measurement ----------------------------------------------------------------


def _engine_argv(setup: Setup, port: int) -> list[str]:
    if setup.upstream_kind == "stub":
        return [str(setup.python), str(setup.stub_path), "--port", str(port), "--model", MODEL]
    return [
        str(setup.python),
        "-m",
        "fleetserve",
        "engine",
        "sim",
        "--port",
        str(port),
        "--model",
        MODEL,
        "--profile",
        "instant",
    ]


def _start_stack(procs: Processes, setup: Setup) -> tuple[dict[str, str], list[ManagedProcess]]:
    """Two engines and one gateway worker, ready; returns base URLs by path and the processes."""
    engines = []
    for i in (1, 2):
        port = free_port()
        proc = procs.start(f"engine{i}", _engine_argv(setup, port), setup.load_core)
        engines.append((proc, f"http://{LOCALHOST}:{port}"))
    for proc, url in engines:
        proc.wait_ready(url + "/health", READY_TIMEOUT_S)
    port = free_port()
    engine_kind = "sim" if setup.upstream_kind == "sim" else "vllm"
    argv = [str(setup.fleetserve), "gateway", "--port", str(port), "--model", MODEL]
    for _, url in engines:
        argv += ["--upstream", url]
    argv += ["--engine", engine_kind]
    env = {"PYTHONPATH": str(setup.gateway_src)} if setup.gateway_src else None
    gateway = procs.start("gateway", argv, setup.gateway_core, env)
    gateway_url = f"http://{LOCALHOST}:{port}"
    gateway.wait_ready(gateway_url + "/ready", READY_TIMEOUT_S)
    return {"direct": engines[0][1], "gateway": gateway_url}, [gateway, *(p for p, _ in engines)]


def _throughput(
    path: str,
    url: str,
    script: Path,
    plan: Plan,
    setup: Setup,
    watched: list[ManagedProcess],
    connections: int | None = None,
) -> Throughput:
    connections = connections or plan.connections
    run_wrk(url, script, plan.wrk_warmup_s, connections, setup.load_core)
    window = CpuWindow(watched)
    window.start()
    wrk = run_wrk(url, script, plan.wrk_s, connections, setup.load_core)
    errors = wrk.non_2xx + wrk.socket_errors
    return Throughput(path, wrk.rps, wrk.p50_ms, wrk.p99_ms, errors, window.stop())


def _latency(
    targets: dict[str, str], rate: float, plan: Plan, watched: list[ManagedProcess]
) -> list[LatencyPoint]:
    """Both paths at one rate. Slices alternate (direct, gateway), (gateway, direct), ... so
    that a burst of noise from other processes on this machine lands on both alike."""
    body = chat_body(MODEL, True, plan.max_tokens)
    slice_s = plan.point_s / plan.point_slices
    parts: dict[str, list[OpenLoopResult]] = {path: [] for path in targets}
    for i in range(plan.point_slices):
        for path in list(targets)[:: 1 if i % 2 == 0 else -1]:
            spec = OpenLoopSpec(targets[path] + CHAT_PATH, body, rate, slice_s, True,
                                plan.max_tokens)  # fmt: skip
            warmup_s = plan.point_warmup_s if i == 0 else 0.0
            parts[path].append(run_open_loop(spec, warmup_s, CpuWindow(watched)))
    return [LatencyPoint.of(path, merge_results(results)) for path, results in parts.items()]


def run_once(setup: Setup, plan: Plan, workdir: Path, say: Callable[[str], None]) -> RunReport:
    """Measure the machine floor, start the stack, measure A and B, stop everything."""
    report = RunReport()
    script = wrk_post_script(workdir / "post.lua", chat_body(MODEL, False, plan.max_tokens))
    streams = wrk_post_script(workdir / "stream.lua", chat_body(MODEL, True, plan.max_tokens))
    with Processes(workdir) as procs:
        say("  0. loopback round trips ...")
        for where, core in (("same core", setup.load_core), ("cross core", setup.gateway_core)):
            rtt = loopback_round_trip(procs, str(setup.python), core, plan.rtt_rounds)
            report.round_trips[where] = rtt
        targets, watched = _start_stack(procs, setup)
        for path, base in targets.items():
            say(f"  A. wrk {path} ...")
            report.throughput.append(
                _throughput(path, base + CHAT_PATH, script, plan, setup, watched)
            )
        for path, base in targets.items():
            say(f"  C. wrk streams {path} ...")
            report.stream_throughput.append(
                _throughput(path, base + CHAT_PATH, streams, plan, setup, watched,
                            STREAM_CONNECTIONS)
            )  # fmt: skip
        for rate in plan.rates_rps:
            say(f"  B. open loop {rate:g} rps, direct and gateway in turn ...")
            report.latency += _latency(targets, rate, plan, watched)
    return report


# --- rendering ---------------------------------------------------------------------------


def _f(value: float | None, spec: str = ".2f", sign: bool = False) -> str:
    if value is None:
        return "-"
    return format(value, ("+" if sign else "") + spec)


def render_run(report: RunReport, plan: Plan, setup: Setup) -> str:
    same, cross = report.round_trips["same core"], report.round_trips["cross core"]
    lines = [
        f"0. machine floor: TCP round trip of 200 B from core {setup.load_core}, "
        f"{plan.rtt_rounds} rounds 2 ms apart, us: same core p50 {same.p50_us:.0f} "
        f"p99 {same.p99_us:.0f}; cross core p50 {cross.p50_us:.0f} p99 {cross.p99_us:.0f}",
        "",
        f"A. max non-stream throughput: wrk -t1 -c{plan.connections}, {plan.wrk_s:g} s after "
        f"{plan.wrk_warmup_s:g} s warm-up; gateway alone on core {setup.gateway_core}",
        f"  {'path':<8} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'core' + str(setup.gateway_core) + ' %':>8} {'core' + str(setup.load_core) + ' %':>8} "
        f"{'gw cpu %':>8} {'gw us/req':>9}",
    ]
    for t in report.throughput:
        gw_cpu = t.cpu.process_pct.get("gateway") if t.path == "gateway" else None
        lines.append(
            f"  {t.path:<8} {t.rps:>9,.0f} {_f(t.p50_ms):>7} {_f(t.p99_ms):>7} {t.errors:>6} "
            f"{t.cpu.core_busy_pct[setup.gateway_core]:>8.0f} "
            f"{t.cpu.core_busy_pct[setup.load_core]:>8.0f} {_f(gw_cpu, '.0f'):>8} "
            f"{_f(t.gateway_cpu_us, '.0f'):>9}"
        )
    lines += [
        "",
        f"C. max streaming throughput: wrk -t1 -c{STREAM_CONNECTIONS}, streams of "
        f"{plan.max_tokens} chunks (an instant engine: a whole answer comes in one or two "
        "reads, the gateway's per-stream work at its largest share)",
        f"  {'path':<8} {'streams/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'gw us/stream':>12}",
    ]
    for t in report.stream_throughput:
        lines.append(
            f"  {t.path:<8} {t.rps:>9,.0f} {_f(t.p50_ms):>7} {_f(t.p99_ms):>7} {t.errors:>6} "
            f"{_f(t.gateway_cpu_us, '.0f'):>12}"
        )
    lines += [
        "",
        f"B. open-loop streams, max_tokens={plan.max_tokens} ({plan.max_tokens} content chunks "
        f"+ [DONE] checked), {plan.point_s:g} s per point in {plan.point_slices} slices "
        f"alternating with direct, after {plan.point_warmup_s:g} s warm-up; latency from the "
        "intended send time, ms; reads = client reads per stream",
        f"  {'rate':>5} {'path':<8} {'ok/sent':>11} {'e2e p50':>8} {'e2e p99':>8} "
        f"{'TTFT p50':>8} {'TTFT p99':>8} {'lag p99':>8} {'reads':>5} {'gw us/req':>9}  errors",
    ]
    for rate in plan.rates_rps:
        direct, gateway = report.point("direct", rate), report.point("gateway", rate)
        for p in (direct, gateway):
            errors = ", ".join(f"{k}={v}" for k, v in sorted(p.errors.items())) or "-"
            lines.append(
                f"  {rate:>5g} {p.path:<8} {f'{p.ok}/{p.sent}':>11} {_f(p.e2e_p50_ms):>8} "
                f"{_f(p.e2e_p99_ms):>8} {_f(p.ttft_p50_ms):>8} {_f(p.ttft_p99_ms):>8} "
                f"{_f(p.send_lag_p99_ms):>8} {_f(p.reads_p50, '.0f'):>5} "
                f"{_f(p.gateway_cpu_us, '.0f'):>9}  {errors}"
            )
        added = [_minus(getattr(gateway, a), getattr(direct, a)) for _, a in ADDED]
        lines.append(
            f"  {rate:>5g} {'added':<8} {'':>11} "
            + " ".join(f"{_f(v, '.2f', sign=True):>8}" for v in added)
        )
    return "\n".join(lines)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _figure_format(name: str) -> str:
    if name.startswith("added"):
        return "+.2f"
    if "req" in name or " us" in name:
        return ",.0f"
    return ".2f"


def render_summary(reports: Sequence[RunReport]) -> tuple[str, bool]:
    """Min/median of every figure over the runs, then the targets (judged on the median)."""
    per_run = [r.figures() for r in reports]
    names = list(per_run[0])
    lines = [
        f"Summary over {len(reports)} run{'s' if len(reports) != 1 else ''}",
        f"  {'figure':<42} {'min':>9} {'median':>9}  runs",
    ]
    medians: dict[str, float | None] = {}
    for name in names:
        values = [v for f in per_run if (v := f.get(name)) is not None]
        medians[name] = _median(values)
        spec = _figure_format(name)
        runs = " ".join(format(v, spec) for v in values)
        lines.append(
            f"  {name:<42} {_f(min(values) if values else None, spec):>9} "
            f"{_f(medians[name], spec):>9}  {runs}"
        )
    rate = f"@{TARGET_RATE_RPS:g} rps"
    checks = [
        ("gateway req/s (non-stream, wrk -c64)", ">=", TARGET_RPS, "gateway req/s, one core"),
        (f"added e2e p50 ms {rate}", "<=", TARGET_ADDED_P50_MS, f"added e2e p50 ms {rate}"),
        (f"added e2e p99 ms {rate}", "<=", TARGET_ADDED_P99_MS, f"added e2e p99 ms {rate}"),
    ]
    errors = sum(r.errors() for r in reports)
    all_met = errors == 0
    lines += ["", "Targets (median over runs)"]
    for key, op, limit, label in checks:
        value = medians.get(key)
        met = value is not None and (value >= limit if op == ">=" else value <= limit)
        all_met &= met
        shown = _f(value, ",.0f" if op == ">=" else "+.2f")
        lines.append(f"  [{'met' if met else 'MISSED':>6}] {label} {op} {limit:,g}: {shown}")
    lines.append(
        f"  [{'met' if errors == 0 else 'MISSED':>6}] no failed or invalid requests: {errors}"
    )
    return "\n".join(lines), all_met


def machine_facts(setup: Setup) -> str:
    cpu = cpu_model()
    load1, _, _ = os.getloadavg()
    fleetserve = importlib.metadata.version("fleetserve")
    commit = first_line(["git", "rev-parse", "--short", "HEAD"])
    if setup.gateway_src is not None:
        checkout = setup.gateway_src.parent
        commit = first_line(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"])
        commit += f", from {setup.gateway_src}"
    upstream = f"peerbench stub ({setup.stub_path})"
    if setup.upstream_kind == "sim":
        upstream = "sim engines, profile instant (`python -m fleetserve engine sim`)"
    return "\n".join(
        [
            f"machine : {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
            f"load average {load1:.2f} at start",
            f"python  : {platform.python_version()} ({sys.executable}); "
            f"{first_line(['wrk', '-v']).split(' Copyright')[0]}",
            f"gateway : fleetserve {fleetserve} (commit {commit}), 1 worker, default picker, "
            "metrics on, 2 upstreams",
            f"upstream: {upstream}",
            f"pinning : gateway on core {setup.gateway_core}; engines, wrk and the load generator "
            f"on core {setup.load_core}",
        ]
    )


# --- main --------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=1, help="full runs (fresh processes each)")
    ap.add_argument("--quick", action="store_true", help="smoke run: a few seconds")
    ap.add_argument("--upstream-kind", choices=("sim", "stub"), default="sim")
    ap.add_argument("--stub-path", type=Path, default=STUB_PATH, help="peerbench upstream.py")
    ap.add_argument("--gateway-core", type=int, default=0)
    ap.add_argument("--load-core", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    ap.add_argument(
        "--observability",
        action="store_true",
        help="instead: tracing at ratio 0.1 (OTLP/HTTP to a local sink) plus JSON access logs, "
        "next to both off, in one run (benchmarks/_observability.py)",
    )
    ap.add_argument(
        "--gateway-src",
        type=Path,
        help="run the gateway (only) from another checkout's src/, e.g. a `git worktree` of an "
        "older commit, to compare two versions in turn on the same machine",
    )
    args = ap.parse_args(argv)
    if not 1 <= args.repeat <= 20:
        ap.error("--repeat must be between 1 and 20")
    if args.gateway_core == args.load_core:
        ap.error("--gateway-core and --load-core must differ")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    bin_dir = Path(sys.executable).parent
    setup = Setup(
        args.upstream_kind,
        Path(sys.executable),
        bin_dir / "fleetserve",
        args.stub_path,
        args.gateway_core,
        args.load_core,
        args.gateway_src.resolve() if args.gateway_src else None,
    )
    plan = QUICK if args.quick else FULL
    pin_self(setup.load_core)
    if args.observability:
        return _observability_main(args)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    print("gateway_overhead: fleetserve gateway vs direct calls to the same engines")
    print(time.strftime("date    : %Y-%m-%d %H:%M:%S %Z"))
    print(machine_facts(setup), flush=True)
    reports: list[RunReport] = []
    with sigterm_as_exit():
        for i in range(args.repeat):
            say(f"run {i + 1}/{args.repeat}")
            with tempfile.TemporaryDirectory(prefix="gateway-overhead-") as tmp:
                report = run_once(setup, plan, Path(tmp), say)
            reports.append(report)
            print(f"\n== run {i + 1}/{args.repeat} ==")
            print(render_run(report, plan, setup), flush=True)
    summary, all_met = render_summary(reports)
    print()
    print(summary)
    if args.json:
        data = {
            "plan": dataclasses.asdict(plan),
            "runs": [dataclasses.asdict(r) for r in reports],
            "figures": [r.figures() for r in reports],
            "targets_met": all_met,
        }
        args.json.write_text(json.dumps(data, indent=2))
    return 0 if sum(r.errors() for r in reports) == 0 else 1


def _observability_main(args: argparse.Namespace) -> int:
    from benchmarks import _observability as obs  # noqa: PLC0415

    plan = obs.QUICK if args.quick else obs.FULL
    print("gateway_overhead --observability: tracing 0.1 + JSON access logs vs both off")
    print(time.strftime("date    : %Y-%m-%d %H:%M:%S %Z"))
    src = args.gateway_src.resolve() if args.gateway_src else None
    commit = first_line(["git", "rev-parse", "--short", "HEAD"])
    if src is not None:
        commit = first_line(["git", "-C", str(src.parent), "rev-parse", "--short", "HEAD"])
        commit += f", gateways from {src}"
    print(f"commit  : {commit}; {cpu_model()}; load average {os.getloadavg()[0]:.2f} at start")
    reports = []
    with sigterm_as_exit():
        for i in range(args.repeat):
            print(f"run {i + 1}/{args.repeat}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="gateway-observability-") as tmp:
                reports.append(
                    obs.run_once(plan, Path(tmp), args.gateway_core, args.load_core,
                                 lambda text: print(text, file=sys.stderr, flush=True), src)
                )  # fmt: skip
    text, ok = obs.render(reports)
    print(text)
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
