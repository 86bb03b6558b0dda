"""CPU per EVALSHA round trip: redis-py's asyncio client next to the gateway's RespClient, on
the real Redis at 127.0.0.1:6379, in one run (sequential calls, then 64 concurrent).

    .venv/bin/python -m benchmarks.redis_clients             # about 10 s
    .venv/bin/python -m benchmarks.redis_clients --repeat 5  # min/median
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import uvloop
from redis.asyncio import Redis

from fleetserve.transport.resp import RespClient

URL = "redis://127.0.0.1:6379/0"
SCRIPT = "return {KEYS[1], ARGV[1]}"


async def _cpu_us(call: Callable[[], Awaitable[Any]], n: int, concurrency: int) -> float:
    for _ in range(200):
        await call()
    t0 = time.process_time()
    for _ in range(n // concurrency):
        await asyncio.gather(*(call() for _ in range(concurrency)))
    return (time.process_time() - t0) / n * 1e6


async def one_run(n: int) -> dict[str, float]:
    redis = Redis.from_url(URL)
    resp = RespClient(URL)
    try:
        sha = await redis.script_load(SCRIPT)
        out: dict[str, float] = {}
        for concurrency in (1, 64):
            out[f"redis-py us/call (x{concurrency})"] = await _cpu_us(
                lambda: redis.evalsha(sha, 1, "k", "v"), n, concurrency
            )
            out[f"RespClient us/call (x{concurrency})"] = await _cpu_us(
                lambda: resp.evalsha(sha, 1, "k", "v"), n, concurrency
            )
        return out
    finally:
        await redis.aclose()
        await resp.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--calls", type=int, default=6400)
    args = ap.parse_args(argv)
    runs = [uvloop.run(one_run(args.calls)) for _ in range(args.repeat)]
    print(f"{'CPU per EVALSHA (client side)':<34} {'min':>8} {'median':>8}")
    for name in runs[0]:
        values = [r[name] for r in runs]
        print(f"{name:<34} {min(values):>8.1f} {statistics.median(values):>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
