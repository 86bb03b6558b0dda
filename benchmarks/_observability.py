"""`gateway_overhead --observability`: what tracing and access logs cost one gateway worker.

Two gateway workers over the same two `instant` sim engines, pinned to the same core and
loaded in turn: "off" (no tracing, no access log: the default) and "on" (tracing at
`parentbased_traceidratio` 0.1 exported over OTLP/HTTP to a receiver on 127.0.0.1 that
accepts and drops, plus `--log-format json`, one access line per request into its log file).
The engines, the receiver and the load generators share the other core.

A. max non-stream req/s (wrk, closed loop) of each and its CPU per request; "req/s per core"
   is requests per CPU-second of the worker (less sensitive to noise than req/s);
B. open-loop streams (16 chunks) at fixed rates, slices alternating between the two:
   "added" = on minus off at the same point.

Targets (issue 11): req/s per core on/off >= 0.95; added e2e p50 <= 0.1 ms at 200 streams/s.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._harness import (
    LOCALHOST,
    CpuWindow,
    OpenLoopResult,
    OpenLoopSpec,
    Processes,
    added_ms,
    chat_body,
    merge_results,
    run_open_loop,
    run_wrk,
    spreads,
    wrk_post_script,
)
from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess

MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
READY_TIMEOUT_S = 60.0
PATHS = ("off", "on")
RATIO = 0.1
TARGET_CORE_RATIO = 0.95
TARGET_ADDED_P50_MS = 0.1
TARGET_RATE_RPS = 200.0


@dataclass(frozen=True, slots=True)
class Plan:
    wrk_warmup_s: float
    wrk_s: float
    connections: int
    rates_rps: tuple[float, ...]
    point_warmup_s: float
    point_s: float
    point_slices: int
    rounds: int  # A is measured this many times per path, alternating off and on
    max_tokens: int = 16


FULL = Plan(wrk_warmup_s=2, wrk_s=6, connections=64, rates_rps=(50, 200), point_warmup_s=1,
            point_s=12, point_slices=6, rounds=2)  # fmt: skip
QUICK = Plan(wrk_warmup_s=1, wrk_s=1, connections=16, rates_rps=(200,), point_warmup_s=0.3,
             point_s=1, point_slices=2, rounds=1)  # fmt: skip


@dataclass
class Report:
    rps: dict[str, list[float]] = field(default_factory=dict)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    points: dict[tuple[str, float], OpenLoopResult] = field(default_factory=dict)
    access_lines: int = 0
    requests_on: int = 0

    def figures(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for path in PATHS:
            rps, us = self.rps.get(path), self.cpu_us.get(path)
            out[f"{path}: req/s (non-stream, wrk)"] = statistics.median(rps) if rps else None
            out[f"{path}: CPU us/request"] = statistics.median(us) if us else None
            out[f"{path}: req per CPU-second"] = 1e6 / statistics.median(us) if us else None
        off, on = out["off: req per CPU-second"], out["on: req per CPU-second"]
        out["req/s per core, on / off"] = on / off if on and off else None
        for rate in sorted({r for _, r in self.points}):
            a, b = self.points[("off", rate)], self.points[("on", rate)]
            out |= added_ms(a, b, rate)
            out[f"off: e2e p50 ms @{rate:g} rps"] = a.ms(a.e2e_s, 50)
        return out


def _start(
    procs: Processes, gateway_core: int, load_core: int, gateway_src: Path | None
) -> tuple[dict[str, str], list[ManagedProcess], ManagedProcess]:
    python = sys.executable
    engines = []
    for i in (1, 2):
        port = free_port()
        argv = [python, "-m", "fleetserve", "engine", "sim", "--port", str(port),
                "--model", MODEL, "--profile", "instant", "--cold-start-s", "0"]  # fmt: skip
        engines.append((procs.start(f"engine{i}", argv, load_core), f"http://{LOCALHOST}:{port}"))
    sink_port = free_port()
    sink = procs.start("otlp-sink", [python, "-m", "fleetserve.testing.otlp", "--port",
                                     str(sink_port)], load_core)  # fmt: skip
    for proc, url in engines:
        proc.wait_ready(url + "/health", READY_TIMEOUT_S)
    urls: dict[str, str] = {}
    gateways: list[ManagedProcess] = []
    on_proc = None
    for path in PATHS:
        port = free_port()
        argv = [python, "-m", "fleetserve", "gateway", "--port", str(port), "--model", MODEL,
                "--engine", "sim"]  # fmt: skip
        for _, url in engines:
            argv += ["--upstream", url]
        env = {"PYTHONPATH": str(gateway_src)} if gateway_src is not None else {}
        if path == "on":
            argv += ["--log-format", "json"]
            env |= {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{LOCALHOST}:{sink_port}",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": str(RATIO),
                "OTEL_SERVICE_NAME": "fleetserve-bench",
            }
        proc = procs.start(f"gateway-{path}", argv, gateway_core, env)
        urls[path] = f"http://{LOCALHOST}:{port}"
        proc.wait_ready(urls[path] + "/ready", READY_TIMEOUT_S)
        gateways.append(proc)
        if path == "on":
            on_proc = proc
    assert on_proc is not None
    return urls, [*gateways, sink, *(p for p, _ in engines)], on_proc


def run_once(
    plan: Plan,
    workdir: Path,
    gateway_core: int,
    load_core: int,
    say: Callable[[str], None],
    gateway_src: Path | None = None,
) -> Report:
    """One run; both gateways from `gateway_src` when given (another checkout's src/)."""
    report = Report(rps={p: [] for p in PATHS}, cpu_us={p: [] for p in PATHS},
                    errors=dict.fromkeys(PATHS, 0))  # fmt: skip
    with Processes(workdir) as procs:
        urls, watched, on_proc = _start(procs, gateway_core, load_core, gateway_src)
        script = wrk_post_script(workdir / "post.lua", chat_body(MODEL, False, plan.max_tokens))
        for i in range(plan.rounds):
            for path in PATHS[:: 1 if i % 2 == 0 else -1]:
                say(f"  A. wrk non-stream, observability {path} (round {i + 1}) ...")
                url = urls[path] + CHAT_PATH
                run_wrk(url, script, plan.wrk_warmup_s, plan.connections, load_core)
                window = CpuWindow(watched)
                window.start()
                wrk = run_wrk(url, script, plan.wrk_s, plan.connections, load_core)
                cpu = window.stop()
                report.rps[path].append(wrk.rps)
                report.errors[path] += wrk.non_2xx + wrk.socket_errors
                pct = cpu.process_pct.get(f"gateway-{path}")
                if pct and wrk.rps:
                    report.cpu_us[path].append(pct / 100 / wrk.rps * 1e6)
                if path == "on":
                    report.requests_on += round(wrk.rps * plan.wrk_s)
        for rate in plan.rates_rps:
            say(f"  B. open-loop streams at {rate:g} rps, off and on in turn ...")
            parts: dict[str, list[OpenLoopResult]] = {p: [] for p in PATHS}
            slice_s = plan.point_s / plan.point_slices
            for i in range(plan.point_slices):
                for path in PATHS[:: 1 if i % 2 == 0 else -1]:
                    body = chat_body(MODEL, True, plan.max_tokens)
                    spec = OpenLoopSpec(urls[path] + CHAT_PATH, body, rate, slice_s, True,
                                        plan.max_tokens)  # fmt: skip
                    warm = plan.point_warmup_s if i == 0 else 0.0
                    parts[path].append(run_open_loop(spec, warm, CpuWindow(watched)))
            for path in PATHS:
                report.points[(path, rate)] = merge_results(parts[path])
        procs.stop(on_proc)  # its last access lines are written as it stops
        report.access_lines = on_proc.log_path.read_bytes().count(b'"logger":"fleetserve.access"')
    return report


def _f(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render(reports: Sequence[Report]) -> tuple[str, bool]:
    table = spreads([r.figures() for r in reports])
    lines = [f"  {'figure':<42} {'min':>10} {'median':>10}  runs"]
    lines += [
        f"  {name:<42} {_f(s.low):>10} {_f(s.median):>10}  {' '.join(_f(v) for v in s.values)}"
        for name, s in table.items()
    ]
    summary = {name: s.median for name, s in table.items()}
    errors = sum(sum(r.errors.values()) for r in reports)
    errors += sum(sum(p.errors.values()) for r in reports for p in r.points.values())
    last = reports[-1]
    lines.append(
        f"  errors: {errors}; access lines written by the 'on' gateway (last run): "
        f"{last.access_lines:,} (at least its {last.requests_on:,} wrk requests, plus warm-ups "
        f"and streams)"
    )
    ratio = summary.get("req/s per core, on / off")
    p50 = summary.get(f"added e2e p50 ms @{TARGET_RATE_RPS:g} rps")
    checks = [
        (f"req/s per core on/off >= {TARGET_CORE_RATIO}", ratio,
         ratio is not None and ratio >= TARGET_CORE_RATIO),
        (f"added e2e p50 @{TARGET_RATE_RPS:g} streams/s <= {TARGET_ADDED_P50_MS} ms", p50,
         p50 is not None and p50 <= TARGET_ADDED_P50_MS),
    ]  # fmt: skip
    lines.append("Targets (median over runs)")
    for what, value, ok in checks:
        lines.append(f"  [{'met' if ok else 'MISSED':>6}] {what}: {_f(value)}")
    return "\n".join(lines), errors == 0 and all(ok for *_, ok in checks)
