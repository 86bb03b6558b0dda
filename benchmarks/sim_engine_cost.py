"""CPU per streamed chunk of the simulated engine's own Python (no HTTP server, no sockets).

The sim server (`fleetserve.engines.sim.server.SimServer`) over an a10g engine on a FakeClock,
driven in-process by N closed-loop streaming users (unique 32-word chat prompts, 32 tokens
each) through its ASGI interface with a send that only counts. Virtual time runs as fast as
the CPU allows, so the process CPU time per chunk is what the engine's step loop, scheduler,
hand-out, handlers, event rendering, request planning and request log cost per token, without
uvicorn's send and the socket write (which `bench_accuracy`'s "engine cost" line includes).

    .venv/bin/python -m benchmarks.sim_engine_cost                 # 125 streams, 30 s virtual
    .venv/bin/python -m benchmarks.sim_engine_cost --streams 250 --virtual-s 20
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import random
import sys
import time
from collections.abc import MutableMapping, Sequence
from typing import Any

import orjson
import uvloop

from fleetserve.engines.sim.engine import SimEngine
from fleetserve.engines.sim.profiles import PROFILES
from fleetserve.engines.sim.server import SimServer
from fleetserve.testing.clock import FakeClock

MODEL = "sim-llama"
WARMUP_S = 5.0  # virtual seconds before the measured window
WORDS = [f"w{i}" for i in range(5000)]
Message = MutableMapping[str, Any]


@dataclasses.dataclass
class Counts:
    chunks: int = 0
    requests: int = 0


async def one_request(app: SimServer, body: bytes, counts: Counts) -> None:
    """One streamed request through the ASGI app; the client leaves once it has all of it."""
    delivered = False
    gone = asyncio.Event()

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            counts.chunks += 1

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await app(scope, receive, send)
    gone.set()
    counts.requests += 1


async def user(app: SimServer, rng: random.Random, counts: Counts, stop: asyncio.Event) -> None:
    """One closed-loop user: a streamed chat request, then the next, until `stop`."""
    while not stop.is_set():
        prompt = " ".join(rng.choice(WORDS) for _ in range(32))
        body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                             "max_tokens": 32, "stream": True})  # fmt: skip
        await one_request(app, body, counts)


async def measure(streams: int, virtual_s: float) -> tuple[int, int, float]:
    """(chunks, requests, CPU seconds) over `virtual_s` after the warm-up."""
    clock = FakeClock()
    profile = dataclasses.replace(PROFILES["a10g"], cold_start_s=0.0)
    engine = SimEngine(profile, MODEL, clock)
    await engine.start()
    app = SimServer(engine)
    counts, stop, rng = Counts(), asyncio.Event(), random.Random(1)
    tasks = [asyncio.create_task(user(app, rng, counts, stop)) for _ in range(streams)]
    try:
        await clock.advance(WARMUP_S)
        chunks0, requests0 = counts.chunks, counts.requests
        gc.collect()
        gc.freeze()  # as `fleetserve engine sim` does after startup
        cpu0_s = time.process_time()
        await clock.advance(virtual_s)
        cpu_s = time.process_time() - cpu0_s
        return counts.chunks - chunks0, counts.requests - requests0, cpu_s
    finally:
        stop.set()
        await engine.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=125)
    parser.add_argument("--virtual-s", type=float, default=30.0, help="measured, virtual time")
    args = parser.parse_args(argv)
    chunks, requests, cpu_s = uvloop.run(measure(args.streams, args.virtual_s))
    if not chunks:
        print("no chunks were written: nothing to measure")
        return 1
    print(
        f"{args.streams} streams, {args.virtual_s:g} s virtual: {chunks} chunks, {requests} "
        f"requests, {cpu_s:.2f} s CPU: {1e6 * cpu_s / chunks:.1f} us CPU per chunk "
        f"(the engine's Python only: no HTTP server, no socket writes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
