"""What tenancy costs one gateway worker: the same gateway with auth, limits, budget, ledger
and fair queue on (auth keys; limits in the real Redis; the ledger in SQLite) next to it off
(auth none), in one run, on the same two `instant` sim engines.

A tenant with every limit and a budget (all far above the load, so every request runs every
check: RPM log, TPM reservation, concurrency lease, budget reservation, each settled) sends
through the gateway with tenancy; the other gateway serves the same requests without any.
Both gateway workers are pinned to the same core and loaded in turn; engines and load
generators share the other core.

A. max non-stream req/s (wrk, closed loop) of each, and its CPU per request: "req/s per core"
   is requests per CPU-second of the worker, less sensitive to noise than req/s;
B. open-loop streams (16 chunks) at fixed rates, alternating slices between the two:
   "added" = with tenancy minus without, at the same point.

    .venv/bin/python -m benchmarks.tenancy_overhead              # one run, about 1.5 minutes
    .venv/bin/python -m benchmarks.tenancy_overhead --repeat 3   # min/median over 3 runs
    .venv/bin/python -m benchmarks.tenancy_overhead --quick      # smoke run, a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx

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
    sigterm_as_exit,
    spreads,
    wrk_post_script,
)
from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess
from fleetserve.testing.redis import delete_redis_prefix

MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
READY_TIMEOUT_S = 60.0
REDIS_URL = "redis://127.0.0.1:6379/0"
BIG = 10**9  # limits far above the load: checked on every request, never refusing
TARGET_ADDED_P50_MS = 0.5
TARGET_ADDED_P99_MS = 1.5
TARGET_CORE_RATIO = 0.60
TARGET_RATE_RPS = 200.0
PATHS = ("off", "on")


@dataclass(frozen=True, slots=True)
class Plan:
    wrk_warmup_s: float
    wrk_s: float
    connections: int
    rates_rps: tuple[float, ...]
    point_warmup_s: float
    point_s: float
    point_slices: int
    max_tokens: int = 16


FULL = Plan(wrk_warmup_s=2, wrk_s=8, connections=64, rates_rps=(50, 200), point_warmup_s=1,
            point_s=12, point_slices=6)  # fmt: skip
QUICK = Plan(wrk_warmup_s=1, wrk_s=1, connections=16, rates_rps=(50,), point_warmup_s=0.3,
             point_s=1, point_slices=2)  # fmt: skip


@dataclass
class Report:
    rps: dict[str, float] = field(default_factory=dict)
    cpu_us: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    points: dict[tuple[str, float], OpenLoopResult] = field(default_factory=dict)
    ledger_rows: int = 0

    def figures(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for path in PATHS:
            out[f"{path}: req/s (non-stream, wrk)"] = self.rps.get(path)
            us = self.cpu_us.get(path)
            out[f"{path}: req per CPU-second"] = 1e6 / us if us else None
        off, on = out["off: req per CPU-second"], out["on: req per CPU-second"]
        out["req/s per core, on / off"] = on / off if on and off else None
        for rate in sorted({r for _, r in self.points}):
            a, b = self.points[("off", rate)], self.points[("on", rate)]
            out |= added_ms(a, b, rate)
        return out


def _fleet_file(path: Path, engines: Sequence[str]) -> Path:
    path.write_text(
        f"models:\n  - name: {MODEL}\n    engine: sim\n    max_concurrency: 4096\n"
        f"    replicas: [{', '.join(engines)}]\n"
        f"    pricing: {{input_per_mtok_usd: 0.5, output_per_mtok_usd: 1.5}}\n"
    )
    return path


def _start(
    procs: Processes, workdir: Path, prefix: str, gateway_core: int, load_core: int
) -> tuple[dict[str, str], list[ManagedProcess], str]:
    """Two engines, and two gateway workers over them: tenancy off and on. Returns their
    URLs, the processes to watch, and the tenant's key."""
    python = sys.executable
    engines = []
    for i in (1, 2):
        port = free_port()
        argv = [python, "-m", "fleetserve", "engine", "sim", "--port", str(port),
                "--model", MODEL, "--profile", "instant", "--cold-start-s", "0"]  # fmt: skip
        engines.append((procs.start(f"engine{i}", argv, load_core), f"http://{LOCALHOST}:{port}"))
    for proc, url in engines:
        proc.wait_ready(url + "/health", READY_TIMEOUT_S)
    fleet = _fleet_file(workdir / "fleet.yaml", [u for _, u in engines])
    urls: dict[str, str] = {}
    gateways: list[ManagedProcess] = []
    for path in PATHS:
        port = free_port()
        auth = "keys" if path == "on" else "none"
        argv = [python, "-m", "fleetserve", "gateway", "--port", str(port),
                "--fleet-file", str(fleet), "--auth", auth]  # fmt: skip
        env = {"FLEETSERVE_STATE_DIR": str(workdir / f"state-{path}")}
        if path == "on":
            env |= {"FLEETSERVE_REDIS_URL": REDIS_URL, "FLEETSERVE_TENANCY__REDIS_PREFIX": prefix}
        proc = procs.start(f"gateway-{path}", argv, gateway_core, env)
        urls[path] = f"http://{LOCALHOST}:{port}"
        proc.wait_ready(urls[path] + "/ready", READY_TIMEOUT_S)
        gateways.append(proc)
    admin = urls["on"]
    tenant = {"name": "bench", "rpm": BIG, "tpm": BIG, "max_concurrent": 100_000,
              "budget_usd": 1e6, "budget_period": "day"}  # fmt: skip
    httpx.post(admin + "/admin/tenants", json=tenant, timeout=10).raise_for_status()
    answer = httpx.post(admin + "/admin/keys", json={"tenant": "bench"}, timeout=10)
    answer.raise_for_status()
    return urls, [*gateways, *(p for p, _ in engines)], str(answer.json()["key"])


def run_once(
    plan: Plan, workdir: Path, gateway_core: int, load_core: int, say: Callable[[str], None]
) -> Report:
    report = Report()
    prefix = f"bench-overhead-{workdir.name}"
    try:
        with Processes(workdir) as procs:
            urls, watched, key = _start(procs, workdir, prefix, gateway_core, load_core)
            auth = {"on": (("Authorization", f"Bearer {key}"),), "off": ()}
            for path in PATHS:
                say(f"  A. wrk non-stream, tenancy {path} ...")
                script = wrk_post_script(
                    workdir / f"post-{path}.lua",
                    chat_body(MODEL, False, plan.max_tokens),
                    auth[path],
                )
                url = urls[path] + CHAT_PATH
                run_wrk(url, script, plan.wrk_warmup_s, plan.connections, load_core)
                window = CpuWindow(watched)
                window.start()
                wrk = run_wrk(url, script, plan.wrk_s, plan.connections, load_core)
                cpu = window.stop()
                report.rps[path] = wrk.rps
                report.errors[path] = wrk.non_2xx + wrk.socket_errors
                pct = cpu.process_pct.get(f"gateway-{path}")
                report.cpu_us[path] = None if not pct or not wrk.rps else pct / 100 / wrk.rps * 1e6
            for rate in plan.rates_rps:
                say(f"  B. open-loop streams at {rate:g} rps, off and on in turn ...")
                parts: dict[str, list[OpenLoopResult]] = {p: [] for p in PATHS}
                slice_s = plan.point_s / plan.point_slices
                for i in range(plan.point_slices):
                    for path in PATHS[:: 1 if i % 2 == 0 else -1]:
                        spec = OpenLoopSpec(
                            urls[path] + CHAT_PATH, chat_body(MODEL, True, plan.max_tokens),
                            rate, slice_s, True, plan.max_tokens, headers=auth[path],
                        )  # fmt: skip
                        warm = plan.point_warmup_s if i == 0 else 0.0
                        parts[path].append(run_open_loop(spec, warm, CpuWindow(watched)))
                for path in PATHS:
                    report.points[(path, rate)] = merge_results(parts[path])
            usage = httpx.get(urls["on"] + "/admin/usage", params={"since": "1h"}, timeout=30)
            report.ledger_rows = sum(g["requests"] for g in usage.json()["data"])
    finally:
        asyncio.run(delete_redis_prefix(REDIS_URL, prefix))
    return report


def _f(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def render(reports: Sequence[Report]) -> tuple[str, bool]:
    table = spreads([r.figures() for r in reports])
    lines = [f"{'figure':<40} {'min':>10} {'median':>10}"]
    lines += [f"{name:<40} {_f(s.low):>10} {_f(s.median):>10}" for name, s in table.items()]
    summary = {name: s.median for name, s in table.items()}
    errors = sum(sum(r.errors.values()) for r in reports)
    errors += sum(sum(p.errors.values()) for r in reports for p in r.points.values())
    lines.append(f"errors: {errors}; ledger rows written (last run): {reports[-1].ledger_rows:,}")
    p50 = summary.get(f"added e2e p50 ms @{TARGET_RATE_RPS:g} rps")
    p99 = summary.get(f"added e2e p99 ms @{TARGET_RATE_RPS:g} rps")
    ratio = summary.get("req/s per core, on / off")
    checks = [
        (f"added e2e p50 @{TARGET_RATE_RPS:g} rps <= {TARGET_ADDED_P50_MS} ms", p50,
         p50 is not None and p50 <= TARGET_ADDED_P50_MS),
        (f"added e2e p99 @{TARGET_RATE_RPS:g} rps <= {TARGET_ADDED_P99_MS} ms", p99,
         p99 is not None and p99 <= TARGET_ADDED_P99_MS),
        (f"req/s per core on/off >= {TARGET_CORE_RATIO}", ratio,
         ratio is not None and ratio >= TARGET_CORE_RATIO),
    ]  # fmt: skip
    for what, value, ok in checks:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {what}: {_f(value)}")
    return "\n".join(lines), errors == 0 and all(ok for *_, ok in checks)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: a few seconds")
    ap.add_argument("--gateway-core", type=int, default=0)
    ap.add_argument("--load-core", type=int, default=1)
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    sigterm_as_exit()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    reports = []
    for i in range(args.repeat):
        say(f"run {i + 1}/{args.repeat}")
        with tempfile.TemporaryDirectory(prefix="fleetserve-tenancy-bench-") as tmp:
            reports.append(run_once(plan, Path(tmp), args.gateway_core, args.load_core, say))
    text, ok = render(reports)
    print(text)
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
