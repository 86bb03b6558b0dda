"""The local actuator with simulated engines: cold starts and scale-down drains, measured.

    .venv/bin/python -m benchmarks.actuator_local            # about 40 s
    .venv/bin/python -m benchmarks.actuator_local --runs 3   # fewer samples

Cold start is launch -> the first 200 from /health, as `LocalActuator` measures it (polled
every 50 ms): the engine's own simulated cold start plus starting a Python process. Measured
one replica at a time (0 -> 1 -> 0, `--runs` times) and four at once (0 -> 4) for
`cold_start_s` 0 and 1. Drains: a victim with nothing in flight (set_replicas -> process
gone); one with a request that has ~2 s left (request done -> process gone, and the request
completes); one whose request outlasts a 1 s grace (cut at the grace, as designed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil

from fleetserve.clock import RealClock
from fleetserve.engines.sim.adapter import SimAdapter
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.local import LocalActuator, LocalActuatorSettings
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.stack import AdapterLauncher

MODEL = "bench-local"
BOUND_S = 60.0


async def until(condition: Callable[[], bool], what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > BOUND_S:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def make(fleet: Fleet, log_dir: Path, cold_start_s: str, grace_s: float = 30.0) -> LocalActuator:
    launcher = AdapterLauncher(
        SimAdapter(), MODEL, {"profile": "a10g", "cold_start_s": cold_start_s}
    )
    settings = LocalActuatorSettings(
        model=MODEL, log_dir=log_dir, drain_grace_s=grace_s, stop_grace_s=5.0
    )
    return LocalActuator(fleet, launcher, RealClock(), settings)


def summary(values: list[float]) -> str:
    return (
        f"n={len(values)} min {min(values):.2f} s, median {statistics.median(values):.2f} s, "
        f"max {max(values):.2f} s"
    )


async def cold_starts(log_dir: Path, cold_start_s: str, runs: int) -> None:
    fleet = Fleet()
    local = make(fleet, log_dir, cold_start_s)
    try:
        for _ in range(runs):
            await local.set_replicas(1)
            await until(lambda: len(fleet.ready(MODEL)) == 1, "ready")
            await local.set_replicas(0)
            await until(lambda: len(fleet) == 0, "gone")
        one = list((await local.describe()).cold_starts_s)
        await local.set_replicas(4)
        await until(lambda: len(fleet.ready(MODEL)) == 4, "four ready")
        four = list((await local.describe()).cold_starts_s)[-4:]
    finally:
        await local.close()
    print(f"cold_start_s={cold_start_s}: one at a time {summary(one)}")
    print(f"cold_start_s={cold_start_s}: four at once  {summary(four)}")


async def request(session: aiohttp.ClientSession, fleet: Fleet, rid: str, tokens: int) -> str:
    replica = fleet.get(rid)
    assert replica is not None
    body = {"model": MODEL, "prompt": "drain", "max_tokens": tokens}
    fleet.begin(rid)
    try:
        async with session.post(replica.url + "/v1/completions", json=body) as response:
            data = await response.json()
            return f"HTTP {response.status}, {data['usage']['completion_tokens']} tokens"
    except aiohttp.ClientError as exc:
        return f"failed: {type(exc).__name__}"
    finally:
        fleet.end(rid)


async def drain(log_dir: Path, label: str, tokens: int, grace_s: float) -> None:
    fleet = Fleet()
    local = make(fleet, log_dir, "0", grace_s)
    timeout = aiohttp.ClientTimeout(total=BOUND_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            await local.set_replicas(1)
            await until(lambda: len(fleet.ready(MODEL)) == 1, "ready")
            (replica,) = (await local.describe()).replicas
            assert replica.pid is not None
            pid = replica.pid
            task = None
            if tokens:
                task = asyncio.create_task(request(session, fleet, replica.id, tokens))
                await until(lambda: fleet.replicas(MODEL)[0].in_flight == 1, "busy")
            started = time.monotonic()
            await local.set_replicas(0)
            drained = fleet.count_by_state(MODEL)[ReplicaState.DRAINING]
            outcome = "none"
            if task is not None:
                outcome = f"{await task} at {time.monotonic() - started:.2f} s"
            await until(lambda: not psutil.pid_exists(pid), "process gone")
            gone_s = time.monotonic() - started
        finally:
            await local.close()
    print(
        f"drain, {label}: {drained} draining at once; request: {outcome}; "
        f"process gone {gone_s:.2f} s after scale-down"
    )


async def main(runs: int) -> None:
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total // 2**30} GiB")
    with tempfile.TemporaryDirectory(prefix="fleetserve-bench-") as tmp:
        log_dir = Path(tmp)
        for cold_start_s in ("0", "1"):
            await cold_starts(log_dir, cold_start_s, runs)
        await drain(log_dir, "idle", 0, 30.0)
        await drain(log_dir, "60-token request in flight (~2.1 s)", 60, 30.0)
        await drain(log_dir, "90-token request, 1 s grace", 90, 1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="one-at-a-time cold starts")
    asyncio.run(main(parser.parse_args().runs))
