"""llama.cpp serving SmolLM2-135M on this CPU: tokens/s direct vs through fleetserve, memory, start.

In one run it prints:
  * output tokens/s for 1, 4 and 16 concurrent streams (closed loop, fixed duration), direct to
    ONE llama-server replica (all cores, 16 slots) and through `fleetserve up --replicas 2`
    (the gateway in front of two replicas sharing the cores, 8 slots each);
  * resident memory of each replica (after the load);
  * how long `fleetserve up --replicas 2` takes from launch to its first answered request.

Every request asks for exactly --max-tokens tokens (`ignore_eos`, a llama.cpp field that the
gateway passes through unchanged), so tokens/s compares like with like.

    .venv/bin/python -m benchmarks.engine_llamacpp [--duration 10] [--repeat 1] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psutil

from benchmarks._harness import Processes, sigterm_as_exit
from fleetserve.engines.llamacpp.build import find_llama_server
from fleetserve.engines.llamacpp.model import DEFAULT_MODEL_NAME, packaged_model_path
from fleetserve.fleet.processes import free_port
from fleetserve.protocol.sse import SseDecoder, chunk_has_content

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works to a child.",
    "List some facts about the ocean.",
    "Describe your ideal weekend in detail.",
]


@dataclass
class LoadResult:
    tokens: int
    requests: int
    errors: int
    seconds: float
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


async def _one(
    session: aiohttp.ClientSession, url: str, model: str, i: int, max_tokens: int, into: LoadResult
) -> None:
    """One stream; every token is counted into `into` as it arrives."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.7,
        "seed": i,
    }
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        events = SseDecoder()
        async for raw in response.content.iter_any():
            for data in events.feed(raw):
                if data == b"[DONE]":
                    continue
                event = orjson.loads(data)
                if "error" in event:
                    raise RuntimeError(event["error"])
                if chunk_has_content(event):
                    into.tokens += 1  # llama-server streams one token per chunk
    into.requests += 1


async def closed_loop(
    url: str, model: str, users: int, duration_s: float, max_tokens: int
) -> LoadResult:
    """`users` clients each sending one stream after another; tokens that arrive within
    exactly `duration_s` count (streams still running at the end are cut there)."""
    result = LoadResult(0, 0, 0, duration_s)
    timeout = aiohttp.ClientTimeout(total=duration_s + 60)
    # A fresh connection per request on both paths: llama-server (cpp-httplib) closes idle
    # keep-alive connections, and aiohttp does not retry a POST on one it finds closed.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        counter = iter(range(10**9))

        async def user() -> None:
            while True:
                try:
                    await _one(session, url, model, next(counter), max_tokens, result)
                except (aiohttp.ClientError, RuntimeError) as exc:
                    result.errors += 1
                    kind = f"{type(exc).__name__}: {str(exc)[:80]}"
                    result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1

        tasks = [asyncio.create_task(user()) for _ in range(users)]
        await asyncio.sleep(duration_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def rss_mib(pids: list[int]) -> list[float]:
    return [psutil.Process(pid).memory_info().rss / 2**20 for pid in pids]


def llama_pids(root: int) -> list[int]:
    return [
        p.pid for p in psutil.Process(root).children(recursive=True) if "llama-server" in p.name()
    ]


def measure(url: str, args: argparse.Namespace) -> dict[int, LoadResult]:
    return {
        c: asyncio.run(closed_loop(url, DEFAULT_MODEL_NAME, c, args.duration, args.max_tokens))
        for c in args.concurrency
    }


def run_direct(
    procs: Processes, args: argparse.Namespace
) -> tuple[dict[int, LoadResult], list[float]]:
    port = free_port()
    cores = str(os.cpu_count() or 2)
    argv = [
        str(find_llama_server()), "--model", str(packaged_model_path()),
        "--alias", DEFAULT_MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--threads", cores, "--threads-batch", cores, "--ctx-size", str(16 * 2048),
        "--parallel", "16", "--cont-batching", "--metrics", "--no-webui", "--log-disable",
    ]  # fmt: skip
    server = procs.start("llama-direct", argv, core=None)
    url = f"http://127.0.0.1:{port}"
    server.wait_ready(url + "/health", 60)
    results = measure(url, args)
    memory = rss_mib([server.pid])
    procs.stop(server)
    return results, memory


def run_gateway(
    procs: Processes, args: argparse.Namespace
) -> tuple[dict[int, LoadResult], list[float], float]:
    port = free_port()
    argv = [sys.executable, "-m", "fleetserve", "up", "--replicas", "2", "--port", str(port)]
    start = time.monotonic()
    up = procs.start("fleetserve-up", argv, core=None)
    url = f"http://127.0.0.1:{port}"
    ready_s = asyncio.run(_first_answer(url, 60)) - start
    results = measure(url, args)
    memory = rss_mib(llama_pids(up.pid))
    procs.stop(up)
    return results, memory, ready_s


async def _first_answer(url: str, timeout_s: float) -> float:
    """Poll with a one-token chat request until the gateway answers it; returns the time."""
    body = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    }
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.post(url + "/v1/chat/completions", json=body) as r:
                    if r.status == 200:
                        return time.monotonic()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(f"fleetserve up did not answer within {timeout_s:g}s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per concurrency level"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 s per level: a smoke run")
    args = parser.parse_args()
    args.concurrency = (1, 4, 16)
    if args.quick:
        args.duration = 2.0
    size_mib = packaged_model_path().stat().st_size / 2**20
    print(
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; model "
        f"{DEFAULT_MODEL_NAME} ({size_mib:.0f} MiB GGUF); {args.max_tokens} tokens per request"
    )
    direct_runs: list[dict[int, LoadResult]] = []
    gateway_runs: list[dict[int, LoadResult]] = []
    memories: list[float] = []
    gw_memories: list[float] = []
    ready: list[float] = []
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix="bench-llama-") as tmp,
        Processes(Path(tmp)) as procs,
    ):
        for _ in range(args.repeat):
            direct, memory = run_direct(procs, args)
            gateway, gw_memory, ready_s = run_gateway(procs, args)
            direct_runs.append(direct)
            gateway_runs.append(gateway)
            memories += memory
            gw_memories += gw_memory
            ready.append(ready_s)
    print(
        f"\n{'streams':>8} | {'direct: 1 replica, all cores':>30} | "
        f"{'gateway: 2 replicas':>22} | ratio"
    )
    for c in args.concurrency:
        d = statistics.median(run[c].tokens_per_s for run in direct_runs)
        g = statistics.median(run[c].tokens_per_s for run in gateway_runs)
        errors = sum(run[c].errors for run in direct_runs + gateway_runs)
        kinds = "; ".join(sorted({k for r in direct_runs + gateway_runs for k in r[c].error_kinds}))
        print(
            f"{c:>8} | {d:>24.1f} tok/s | {g:>16.1f} tok/s | {g / d:.2f}"
            + (f"  ({errors} errors: {kinds})" if errors else "")
        )
    print(f"\nresident memory per replica: direct {', '.join(f'{m:.0f}' for m in memories)} MiB; "
          f"behind the gateway {', '.join(f'{m:.0f}' for m in gw_memories)} MiB")  # fmt: skip
    print(
        f"fleetserve up --replicas 2, launch to first answer: "
        f"min {min(ready):.2f} s, median {statistics.median(ready):.2f} s (target < 10 s)"
    )


if __name__ == "__main__":
    main()
