"""What sharing state between gateway worker processes costs (gateway/peers.py).

Each worker writes a report (its load window, in-flight per replica, held) every REPORT_S,
and an admin view (`/admin/load`, `/admin/fleet`, what `fleetserve autoscaler` polls) reads
and merges the other workers' reports. This times both on a busy window: every one of its 30
one-second buckets holding arrivals and a spread of TTFT bins, for several models and
replicas, in one process, on real files in a temporary directory.

    .venv/bin/python -m benchmarks.workers_overhead            # about 10 s
    .venv/bin/python -m benchmarks.workers_overhead --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fleetserve.clock import RealClock
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.replica import Replica
from fleetserve.gateway.peers import REPORT_S, RunDir, WorkerLink, merged_window, read_reports
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.telemetry.window import LoadWindow

MODELS = 4
REPLICAS_PER_MODEL = 8
REQUESTS_PER_S = 200  # per model, so each bucket holds many TTFT bins


def busy_window(clock: RealClock) -> LoadWindow:
    window = LoadWindow()
    now = clock.now()
    for second in range(30):
        at = now - 29 + second
        for m in range(MODELS):
            for i in range(REQUESTS_PER_S):
                window.arrived(f"model-{m}", at, 800)
                window.observe_ttft(f"model-{m}", at, 0.02 + 0.003 * (i % 300))
                window.finished(f"model-{m}", at)
    return window


def busy_fleet() -> Fleet:
    fleet = Fleet()
    for m in range(MODELS):
        for r in range(REPLICAS_PER_MODEL):
            replica = Replica(id=f"m{m}-r{r}", url=f"http://10.0.{m}.{r}:8000", model=f"model-{m}")
            replica.state = ReplicaState.READY
            replica.in_flight = 7
            fleet.add(replica)
    return fleet


def timed(fn: object, rounds: int) -> list[float]:
    assert callable(fn)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def one_run(rounds: int) -> dict[str, float]:
    clock = RealClock()
    window, fleet = busy_window(clock), busy_fleet()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fleetserve-bench-") as tmp:
        run = RunDir(Path(tmp))
        run.create()
        links = []
        for pid in range(1, 9):
            link = WorkerLink(run, fleet, window, clock, lambda _m: 3, parent_pid=0)
            link.pid = pid  # eight workers' reports, written by one process
            links.append(link)
        report_s = statistics.median(timed(links[0].report_now, rounds))
        figures["report_us"] = report_s * 1e6
        figures["report_core_pct"] = 100 * report_s / REPORT_S
        figures["report_bytes"] = float(run.report_of(1).stat().st_size)
        for workers in (2, 4, 8):
            for path in run.workers.glob("*.json"):
                path.unlink()
            for link in links[1:workers]:  # fresh: older than STALE_S is left out
                link.report_now()

            def admin_view(others: int = workers - 1) -> None:
                now = clock.now()
                reports = read_reports(run, now, exclude_pid=1)
                assert len(reports) == others
                merged = merged_window(window, reports, now, 30.0)
                for m in range(MODELS):
                    merged.snapshot(f"model-{m}", now)

            figures[f"merge_{workers}_ms"] = statistics.median(timed(admin_view, rounds)) * 1e3
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    print("workers_overhead: what gateway workers pay to share their state")
    print(
        f"window: {MODELS} models x 30 buckets x {REQUESTS_PER_S} req/s with TTFT bins; "
        f"{MODELS * REPLICAS_PER_MODEL} replicas; one report every {REPORT_S:g} s per worker"
    )
    runs = [one_run(args.rounds) for _ in range(args.repeat)]
    names = {
        "report_us": "write one report, us",
        "report_core_pct": "reports' share of one core, %",
        "report_bytes": "report size, bytes",
        "merge_2_ms": "admin view merging 2 workers, ms",
        "merge_4_ms": "admin view merging 4 workers, ms",
        "merge_8_ms": "admin view merging 8 workers, ms",
    }
    print(f"  {'figure':40} {'min':>10} {'median':>10}")
    for key, label in names.items():
        values = [r[key] for r in runs]
        print(f"  {label:40} {min(values):>10.2f} {statistics.median(values):>10.2f}")


if __name__ == "__main__":
    main()
