"""The fleet timeline sampler against a real `fleetserve engine sim` process's /metrics."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from fleetserve.bench.timeline import FleetSampler, SamplerSettings
from fleetserve.clock import RealClock
from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess

pytestmark = pytest.mark.integration

MODEL = "sim-llama"
READY_TIMEOUT_S = 20.0


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[ManagedProcess, str]]:
    port = free_port()
    argv = [sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
            "--model", MODEL, "--profile", "a10g", "--cold-start-s", "0",
            "--max-num-seqs", "2"]  # fmt: skip
    with ManagedProcess(argv, log_path=tmp_path / "sim.log") as proc:
        yield proc, f"http://127.0.0.1:{port}"
        assert proc.stop() == 0, proc.log_text()


async def test_samples_a_sim_engines_running_and_waiting(
    sim: tuple[ManagedProcess, str],
) -> None:
    proc, sim_url = sim
    await proc.wait_http_ok(f"{sim_url}/health", READY_TIMEOUT_S)
    clock = RealClock()
    settings = SamplerSettings(source="auto", interval_s=0.05, timeout_s=1.0)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "stream": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        sampler = FleetSampler(sim_url, clock, clock.now(), settings)
        async with sampler:
            await asyncio.sleep(0.2)  # idle
            # Three long streams on an engine that runs two at a time: 2 running, 1 waiting.
            streams = [http.post(f"{sim_url}/v1/completions", json=body) for _ in range(3)]
            responses = await asyncio.gather(*streams)
            await asyncio.sleep(0.4)
            for response in responses:
                response.close()  # the engine aborts them
            await asyncio.sleep(0.3)
    samples = sampler.samples
    assert sampler.source == "prometheus"  # an engine has no /admin/fleet
    assert len(samples) >= 10, (sampler.failures, sampler.last_error)
    assert all(s.replicas_ready == 1 for s in samples)
    assert all(s.replicas_desired is None and s.replicas_starting is None for s in samples)
    loads = [(s.in_flight, s.queue_depth) for s in samples]
    assert loads[0] == (0, 0)
    assert (2, 1) in loads
    assert loads[-1] == (0, 0)
    times = [s.t_s for s in samples]
    assert times == sorted(times)
    assert times[0] < 0.5  # the first poll starts with the sampler
