"""The simulated engine keeps the time its model promises, measured through its real server.

Profile a10g (its step-time model unchanged) with --max-num-seqs 8 so the plateau comes
early, and short answers so the whole file runs in about ten seconds.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from fleetserve.engines.sim.profiles import PROFILES
from fleetserve.engines.vllm import parse_vllm_signals
from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "sim-llama"
MAX_NUM_SEQS = 8
PROFILE = PROFILES["a10g"].with_overrides(max_num_seqs=MAX_NUM_SEQS, cold_start_s=0.0)


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
            "--model", MODEL, "--profile", "a10g", "--cold-start-s", "0",
            "--max-num-seqs", str(MAX_NUM_SEQS)]  # fmt: skip
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    with ManagedProcess(argv, log_path=log) as proc:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(proc.wait_http_ok(f"{url}/health", 20.0))
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def complete(
    http: aiohttp.ClientSession, url: str, content: str, max_tokens: int
) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens}  # fmt: skip
    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        data: dict[str, Any] = await response.json()
        return data


async def test_single_request_takes_prefill_plus_its_decode_steps(
    sim_url: str, http: aiohttp.ClientSession
) -> None:
    errors: list[float] = []
    for i in range(3):
        start = time.perf_counter()
        data = await complete(http, sim_url, f"prompt {i} of the latency check", 20)
        elapsed = time.perf_counter() - start
        usage = data["usage"]
        assert usage["completion_tokens"] == 20
        expected = PROFILE.single_request_s(usage["prompt_tokens"], 20)
        errors.append(elapsed / expected - 1)
    assert abs(statistics.median(errors)) < 0.05, errors


async def tokens_per_s(
    http: aiohttp.ClientSession, url: str, concurrency: int, rounds: int, max_tokens: int
) -> float:
    async def client(n: int) -> int:
        tokens = 0
        for r in range(rounds):
            data = await complete(http, url, f"client {n} round {r}", max_tokens)
            tokens += data["usage"]["completion_tokens"]
        return tokens

    start = time.perf_counter()
    totals = await asyncio.gather(*(client(n) for n in range(concurrency)))
    return sum(totals) / (time.perf_counter() - start)


async def test_throughput_levels_off_at_the_batch_limit(
    sim_url: str, http: aiohttp.ClientSession
) -> None:
    levels = [1, 2, 4, MAX_NUM_SEQS, 2 * MAX_NUM_SEQS]
    throughput: dict[int, float] = {}
    for concurrency in levels[:-1]:
        throughput[concurrency] = await tokens_per_s(http, sim_url, concurrency, 2, 12)

    # Past the limit, the extra requests wait in the queue.
    over = asyncio.create_task(tokens_per_s(http, sim_url, 2 * MAX_NUM_SEQS, 2, 12))
    await asyncio.sleep(0.2)
    async with http.get(f"{sim_url}/metrics") as response:
        signals = parse_vllm_signals(await response.text())
    throughput[2 * MAX_NUM_SEQS] = await over
    assert signals.running == MAX_NUM_SEQS
    assert signals.waiting == MAX_NUM_SEQS

    at_limit, beyond = throughput[MAX_NUM_SEQS], throughput[2 * MAX_NUM_SEQS]
    assert beyond == pytest.approx(at_limit, rel=0.10), throughput
    assert at_limit > 4 * throughput[1], throughput
    assert throughput[1] < throughput[2] < throughput[4] < at_limit, throughput
    # And the plateau is where the model puts it: waves of 8 requests, each wave one step of
    # their 8 prefills plus 12 steps of 8 sequences (the first of which samples with prefill).
    prompt = (await complete(http, sim_url, "client 0 round 0", 1))["usage"]["prompt_tokens"]
    wave_s = PROFILE.prefill_s(MAX_NUM_SEQS * prompt) + 12 * PROFILE.decode_step_s(MAX_NUM_SEQS)
    modelled = MAX_NUM_SEQS * 12 / wave_s
    assert beyond == pytest.approx(modelled, rel=0.10), (beyond, modelled)
