"""fleetserve's autoscaler against a tutorial-style CPU/memory HPA and a fixed fleet: a SIMULATION.

Same traffic for every scaler (spike and wave patterns from `fleetserve.bench.patterns`,
Poisson arrivals from `fleetserve.bench.schedule`, prompts of 384-640 tokens, answers of
128-256), same SIMULATED a10g vLLM replicas (`fleetserve.engines.sim`: Llama-3.1-8B on one
A10G, continuous batching with chunked prefill, ~1.3 req/s per replica within a 2 s TTFT at
this mix), same actuator (`SimActuator`: cold start, drain with a 30 s grace as Kubernetes'
default terminationGracePeriodSeconds), same router (least outstanding over ready replicas) and
gateway hold; the fleetserve rows also cap each replica at `--max-concurrency` in flight and
queue the rest at the gateway (the gateway's capacity queue: a replica that turns ready takes
the backlog), except the row "fleetserve, no gateway queue", which sends every request straight
to an engine as the router did before. Every run starts with 600 s (--quick: 300 s) of traffic
at the pattern's starting rate, served but not reported, so each scaler starts from a fleet
that has settled. Everything runs in virtual time (`benchmarks._autoscale_study`); nothing is
measured on a GPU. Per scaler and traffic: SLO attainment (share of requests whose TTFT from
the gateway arrival is <= the SLO; failed requests count as misses), TTFT p50/p95/p99 of served
requests, failures, replica-seconds over the traffic's duration (SimActuator's accounting,
starting and draining included; the fixed fleet's is count x duration), peak replicas, and
ratios to the fixed fleet.

Scalers:

1. fleetserve: `AutoscaleLoop` with `decide`, default `AutoscaleSettings` plus `ttft_slo_s`,
   min 1, max 8, and the gateway's capacity queue at `--max-concurrency` (default 32: on one
   saturated a10g replica at this mix, 32 in flight give 97 % of the most it serves, 1.72 of
   1.77 req/s, at an engine TTFT p95 of 0.6 s; 36 give all of it at 1.7 s; from 40 on the KV
   cache is full and requests wait inside the engine, 4.4 s and more). "fleetserve, no gateway
   queue" is the same policy without the cap. `--variant key=value` adds rows with changed
   settings, with the queue.
2. hpa: the `autoscaling/v2` HPA of the tutorials: CPU utilisation target 70 %, memory 80 %,
   HPA defaults (tolerance 0.1, 15 s sync, scale-up max(4 pods, 100 %)/15 s without
   stabilization, 300 s scale-down stabilization, 100 %/15 s down), min 1, max 8. One row per
   `--hpa-cpu-request-cores` value. What the HPA reads is a MODEL of a vLLM pod's CPU and memory,
   the signal such an HPA would see, built from these sources:

   - The engine core (`vllm/v1/engine/core.py`, `run_busy_loop`) blocks on its input queue when
     it has no requests and otherwise steps back to back. With tensor parallel 1 the model runs
     in that process, and while it waits for the GPU, CUDA's default scheduling
     (`cudaDeviceScheduleAuto`: spin unless CUDA contexts outnumber logical CPUs, CUDA runtime
     API docs) spins: about one core busy while any request runs, whatever the batch size.
     Idle CPU went to ~0 when vLLM replaced the idle busy-wait of its shared-memory queues
     (issue vllm-project/vllm#16968 reported 100 % of a core at idle in 0.8.3; PR #16226 added
     VLLM_SLEEP_WHEN_IDLE, PR #28053 removed the idle spin); under load those readers still
     spin (PRs #51950, #52814), which only adds to the same busy/idle shape. Modelled: 0.02
     cores idle (metrics, health checks: an assumption) + 1.0 core x the fraction of the
     window the engine had work.
   - The API server process (HTTP, tokenisation, detokenisation, SSE) grows with requests and
     tokens. PR vllm-project/vllm#11636 measured one API server process serving 56 req/s of
     ~250-in/200-out streams within 3 % of offline throughput, so it costs well under 90 us
     of CPU per output token. Modelled: 2 ms per request + 30 us per output token (an
     assumption within that bound): ~0.02 cores at one a10g replica's ~400 tokens/s.
   - Host memory: weights and KV cache live on the GPU (vLLM pre-allocates the KV cache), and
     what stays in the pod's working set after the load is the process's RSS, which does not
     follow the load; issue vllm-project/vllm#3035 reports 4 GB RSS for a vLLM pod (the rest of
     its usage page cache). Modelled: 4 GiB, constant; with the default 8 GiB request that is
     50 %, so the memory rule never asks for more (below 5 GiB of request it would pin the
     fleet at max from the first sync instead: either way it does not follow the load).
   - The CPU request decides everything: utilisation = cores / request. A tutorial's request
     of 1 CPU (e.g. adhdecode.pages.dev "vllm-auto-scaling-kubernetes-hpa": requests cpu 1,
     memory 2Gi, target 70 %) reads ~100 % whenever a replica has any request, so the HPA
     adds pods until their busy fraction falls under ~77 %, about one request in flight per
     pod; a request of 2 or more CPUs never reaches 70 % (one spinning core is 50 %), so the
     HPA never scales up.
   - The HPA sets aside pods that are not ready or have no CPU sample since turning ready (its
     CPU initialization handling) and counts them at 0 % when scaling up. Its CPU sample here
     is the mean over the last 15 s sync period (metrics-server's default resolution), read
     without metrics-server's extra scrape lag: if anything, kinder to the HPA.
3. fixed: the smallest fleet whose TTFT p95 over the whole run meets the SLO on the first
   seed's traffic of that shape (searched over 1..max), kept for every seed: a fleet sized in
   advance for the peak.

Cold start: `--cold-start-s`, default 80 s. Tensorfuse measured Llama-3.1-8B-Instruct under
vLLM on an L40S at 82 s from container start to ready with weights on local disk and warm
torch.compile caches (18 s weights, 10 s Dynamo, 13 s compile, 7 s graph capture, 34 s engine
init and imports; 294 s with nothing cached), tensorfuse.io/docs/blogs/reducing_gpu_cold_start.
Image pull excluded. `--cold-start-s 30` shows a snapshot-restored replica.

    .venv/bin/python -m benchmarks.autoscale_compare               # 20 min of traffic per shape
    .venv/bin/python -m benchmarks.autoscale_compare --repeat 3    # seeds 0..2, median and range
    .venv/bin/python -m benchmarks.autoscale_compare --quick       # 5 min of traffic, one seed
    .venv/bin/python -m benchmarks.autoscale_compare --variant target_concurrency=16
    .venv/bin/python -m benchmarks.autoscale_compare --max-concurrency 24
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from benchmarks._autoscale_hpa import HpaSettings, VllmPodModel
from benchmarks._autoscale_scalers import FixedScaler, FleetserveScaler, HpaScaler
from benchmarks._autoscale_study import (
    Arrival,
    GatewayQueue,
    RunResult,
    Scaler,
    Simulation,
    make_workload,
)
from fleetserve.bench.patterns import Pattern, spike, stages, steady, value_at, wave
from fleetserve.config import AutoscaleSettings
from fleetserve.engines.sim.profiles import get_profile
from fleetserve.errors import ConfigError
from fleetserve.telemetry.quantiles import percentile_of

PROFILE = "a10g"
MAX_REPLICAS = 8
# The gateway's cap per a10g replica at this mix: see the module docstring.
MAX_CONCURRENCY = 32


def shapes(quick: bool) -> dict[str, tuple[Pattern, float]]:
    """Traffic per shape and its measured duration: a10g replicas carry ~1.3 req/s each at
    the SLO, so the peaks (9 req/s) need about 7 of the 8 replicas allowed."""
    if quick:
        return {
            "spike": (spike(base_rps=2.0, peak_rps=9.0, at_s=60.0, for_s=120.0), 300.0),
            "wave": (wave(mean_rps=5.0, amplitude_rps=4.0, period_s=150.0), 300.0),
        }
    return {
        "spike": (spike(base_rps=2.0, peak_rps=9.0, at_s=300.0, for_s=300.0), 1200.0),
        "wave": (wave(mean_rps=5.0, amplitude_rps=4.0, period_s=600.0), 1200.0),
    }


@dataclass(frozen=True, slots=True)
class Summary:
    shape: str
    scaler: str
    seed: int
    requests: int
    attainment: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    failed: int
    replica_seconds: float
    peak_replicas: int


def summarize(shape: str, seed: int, result: RunResult, slo_s: float) -> Summary:
    served = [r.ttft_s for r in result.requests if r.failed is None and r.ttft_s is not None]
    met = sum(1 for t in served if t <= slo_s)
    total = len(result.requests)
    return Summary(
        shape=shape,
        scaler=result.scaler,
        seed=seed,
        requests=total,
        attainment=met / total if total else 1.0,
        ttft_p50_s=percentile_of(served, 50),
        ttft_p95_s=percentile_of(served, 95),
        ttft_p99_s=percentile_of(served, 99),
        failed=sum(1 for r in result.requests if r.failed is not None),
        replica_seconds=result.replica_seconds,
        peak_replicas=result.peak_replicas,
    )


@dataclass(frozen=True, slots=True)
class StudyConfig:
    slo_s: float = 2.0
    cold_start_s: float = 80.0
    drain_grace_s: float = 30.0
    warmup_s: float = 600.0


def with_warmup(pattern: Pattern, duration_s: float, warmup_s: float) -> Pattern:
    """The pattern preceded by `warmup_s` at its starting rate, for the scalers to settle."""
    return stages([(warmup_s, steady(value_at(pattern, 0.0))), (duration_s, pattern)])


def run_once(
    arrivals: list[Arrival], scaler: Scaler, duration_s: float, config: StudyConfig
) -> RunResult:
    """`arrivals` include the warm-up; `duration_s` is the measured part after it."""
    sim = Simulation(
        get_profile(PROFILE),
        cold_start_s=config.cold_start_s,
        drain_grace_s=config.drain_grace_s,
        gateway=scaler.gateway,
    )
    total_s = config.warmup_s + duration_s
    return asyncio.run(sim.run(arrivals, scaler, total_s, warmup_s=config.warmup_s))


def size_fixed(
    arrivals: list[Arrival], duration_s: float, config: StudyConfig, max_replicas: int
) -> int:
    """The smallest fixed fleet whose TTFT p95 over the run meets the SLO (binary search)."""
    lo, hi = 1, max_replicas
    while lo < hi:
        mid = (lo + hi) // 2
        result = run_once(arrivals, FixedScaler(mid), duration_s, config)
        p95 = summarize("", 0, result, config.slo_s).ttft_p95_s
        if p95 is not None and p95 <= config.slo_s and not any(r.failed for r in result.requests):
            hi = mid
        else:
            lo = mid + 1
    return lo


def fleetserve_settings(slo_s: float, overrides: dict[str, float]) -> AutoscaleSettings:
    try:
        return AutoscaleSettings(
            min_replicas=1, max_replicas=MAX_REPLICAS, ttft_slo_s=slo_s, **overrides
        )
    except ValueError as exc:
        raise ConfigError(f"--variant: {exc}") from exc


def parse_variant(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--variant {text!r}: expected key=value[,key=value]")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--variant {text!r}: {value!r} is not a number") from None
    return out


def scalers_for(
    args: argparse.Namespace, fixed: int, variants: list[tuple[str, dict[str, float]]]
) -> list[Scaler]:
    queue = GatewayQueue(args.max_concurrency)
    default = fleetserve_settings(args.slo_s, {})
    out: list[Scaler] = [
        FleetserveScaler(default, gateway=queue),
        FleetserveScaler(default, name="fleetserve, no gateway queue"),
        FleetserveScaler(
            default,
            name="fleetserve, queue newest first",
            gateway=GatewayQueue(args.max_concurrency, newest_first=True),
        ),
    ]
    for label, overrides in variants:
        settings = fleetserve_settings(args.slo_s, overrides)
        out.append(FleetserveScaler(settings, name=f"fleetserve {label}", gateway=queue))
    for cores in args.hpa_cpu_request_cores:
        out.append(
            HpaScaler(
                HpaSettings(max_replicas=MAX_REPLICAS),
                VllmPodModel(cpu_request_cores=cores, memory_request_gib=args.memory_request_gib),
                name=f"hpa (request {cores:g} CPU)",
            )
        )
    out.append(FixedScaler(fixed, name=f"fixed x{fixed}"))
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f}"


def render(shape: str, rows: list[list[Summary]], fixed_name: str) -> str:
    """One table per shape: the median over seeds, and the range when there are several."""
    fixed = next(r for r in rows if r[0].scaler == fixed_name)
    fixed_rs = statistics.median(s.replica_seconds for s in fixed)
    fixed_att = statistics.median(s.attainment for s in fixed)
    head = (
        f"  {'scaler':<34} {'attain %':>8} {'range':>11} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'failed':>6} {'replica-s':>9} {'range':>13} {'peak':>4} "
        f"{'rs/fixed':>8} {'d-attain':>8}"
    )
    lines = [head]
    for runs in rows:
        att = [s.attainment * 100 for s in runs]
        rs = [s.replica_seconds for s in runs]
        med_att, med_rs = statistics.median(att), statistics.median(rs)

        def med(values: list[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return statistics.median(present) if present else None

        lines.append(
            f"  {runs[0].scaler:<34} {med_att:>8.1f} {min(att):>5.1f}-{max(att):<5.1f} "
            f"{_ms(med([s.ttft_p50_s for s in runs])):>7} "
            f"{_ms(med([s.ttft_p95_s for s in runs])):>7} "
            f"{_ms(med([s.ttft_p99_s for s in runs])):>7} "
            f"{statistics.median(s.failed for s in runs):>6.0f} {med_rs:>9,.0f} "
            f"{min(rs):>6,.0f}-{max(rs):<6,.0f} "
            f"{max(s.peak_replicas for s in runs):>4} {med_rs / fixed_rs:>8.2f} "
            f"{med_att - fixed_att * 100:>+8.1f}"
        )
    return f"{shape}:\n" + "\n".join(lines)


def timeline_line(result: RunResult, every_s: float = 60.0) -> str:
    """Active replicas (starting + ready) at every `every_s` of the run."""
    counts, i, current = [], 0, result.timeline[0][1] if result.timeline else 0
    t = 0.0
    while t <= result.duration_s:
        while i < len(result.timeline) and result.timeline[i][0] <= t:
            current = result.timeline[i][1]
            i += 1
        counts.append(str(current))
        t += every_s
    return " ".join(counts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=1, help="seeds 0..N-1 (default 1)")
    parser.add_argument("--quick", action="store_true", help="5 minutes of traffic per shape")
    parser.add_argument("--slo-s", type=float, default=2.0, help="TTFT SLO (default 2 s)")
    parser.add_argument("--cold-start-s", type=float, default=80.0)
    parser.add_argument("--drain-grace-s", type=float, default=30.0)
    parser.add_argument(
        "--hpa-cpu-request-cores",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[1.0, 2.0],
        help="one HPA row per pod CPU request (default 1,2)",
    )
    parser.add_argument("--memory-request-gib", type=float, default=8.0)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="extra fleetserve row with AutoscaleSettings overrides, e.g. target_concurrency=16",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=MAX_CONCURRENCY,
        help=f"the gateway's cap per replica in the fleetserve rows (default {MAX_CONCURRENCY})",
    )
    parser.add_argument("--shapes", default="spike,wave")
    parser.add_argument("--json", help="write every run's summary here")
    args = parser.parse_args(argv)
    try:
        variants = [(v, parse_variant(v)) for v in args.variant]
        for _, overrides in variants:
            fleetserve_settings(args.slo_s, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("error: --repeat must be >= 1", file=sys.stderr)
        return 2
    if args.max_concurrency < 1:
        print("error: --max-concurrency must be >= 1", file=sys.stderr)
        return 2
    config = StudyConfig(
        args.slo_s, args.cold_start_s, args.drain_grace_s, 300.0 if args.quick else 600.0
    )
    all_shapes = shapes(args.quick)
    wanted = [s.strip() for s in args.shapes.split(",")]
    unknown = [s for s in wanted if s not in all_shapes]
    if unknown:
        print(f"error: unknown shapes {unknown}; choose from {sorted(all_shapes)}", file=sys.stderr)
        return 2
    started = time.process_time()
    print(
        f"SIMULATION (virtual time; no GPU): SIMULATED vLLM {PROFILE} replicas, TTFT SLO "
        f"{args.slo_s:g} s, cold start {args.cold_start_s:g} s, drain grace "
        f"{args.drain_grace_s:g} s, seeds 0..{args.repeat - 1}; fleetserve rows: at most "
        f"{args.max_concurrency} in flight per replica, the rest queued at the gateway"
    )
    summaries: list[Summary] = []
    for shape in wanted:
        pattern, duration_s = all_shapes[shape]
        full = with_warmup(pattern, duration_s, config.warmup_s)
        total_s = config.warmup_s + duration_s
        first = make_workload(full, duration_s=total_s, seed=0)
        fixed = size_fixed(first, duration_s, config, MAX_REPLICAS)
        per_scaler: dict[str, list[Summary]] = {}
        timelines: dict[str, str] = {}
        reasons: dict[str, list[tuple[float, int, str]]] = {}
        for seed in range(args.repeat):
            arrivals = first if seed == 0 else make_workload(full, duration_s=total_s, seed=seed)
            for scaler in scalers_for(args, fixed, variants):
                result = run_once(arrivals, scaler, duration_s, config)
                summary = summarize(shape, seed, result, args.slo_s)
                per_scaler.setdefault(scaler.name, []).append(summary)
                summaries.append(summary)
                if seed == 0:
                    timelines[scaler.name] = timeline_line(result)
                    if isinstance(scaler, FleetserveScaler | HpaScaler):
                        reasons[scaler.name] = scaler.reasons
        print()
        print(
            f"{render(shape, list(per_scaler.values()), f'fixed x{fixed}')}\n"
            f"  ({per_scaler[f'fixed x{fixed}'][0].requests} requests at seed 0 over "
            f"{duration_s:g} s after {config.warmup_s:g} s of warm-up: {pattern}; fixed fleet "
            f"= smallest count with TTFT p95 <= SLO on seed 0, found by search)"
        )
        print("  active replicas every 60 s (seed 0):")
        for name, line in timelines.items():
            print(f"    {name:<34} {line}")
        for name, changes in reasons.items():
            if changes:
                at, desired, why = changes[0]
                at_s = at - config.warmup_s
                print(f"  {name}: first change at {at_s:+.0f} s -> {desired}: {why}")
    print(f"\n(cpu time {time.process_time() - started:.1f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(s) for s in summaries], fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
