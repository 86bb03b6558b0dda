"""A short bench run, open and closed loop, against a real `fleetserve engine sim` process."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleetserve.bench.client import BenchClient, ClientSettings
from fleetserve.bench.lengths import Fixed
from fleetserve.bench.patterns import steady
from fleetserve.bench.runner import RunLimits, Sender, run_closed_loop, run_open_loop
from fleetserve.bench.schedule import ClosedLoop, schedule
from fleetserve.bench.workload import Workload, WorkloadSpec
from fleetserve.clock import RealClock
from fleetserve.engines.sim.text import CHAT_MESSAGE_OVERHEAD_TOKENS, CHAT_PRIMING_TOKENS
from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess

pytestmark = pytest.mark.integration

MODEL = "sim-llama"
READY_TIMEOUT_S = 20.0
PROMPT_TOKENS, PREFIX_TOKENS, OUTPUT_TOKENS = 16, 32, 8


@pytest.fixture
async def sim_url(tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
            "--model", MODEL, "--profile", "instant", "--cold-start-s", "0"]  # fmt: skip
    async with ManagedProcess(argv, log_path=tmp_path / "sim.log") as proc:
        url = f"http://127.0.0.1:{port}"
        await proc.wait_http_ok(f"{url}/health", READY_TIMEOUT_S)
        yield url


def workload() -> Workload:
    spec = WorkloadSpec(
        model=MODEL,
        prompt_tokens=Fixed(PROMPT_TOKENS),
        output_tokens=Fixed(OUTPUT_TOKENS),
        prefix_groups=2,
        prefix_tokens=PREFIX_TOKENS,
    )
    return Workload(spec, seed=4)


async def test_open_loop_against_the_simulated_engine(sim_url: str) -> None:
    clock, built = RealClock(), workload()

    def connect(t0: float) -> Sender:
        return BenchClient(ClientSettings(f"{sim_url}/v1"), clock, t0=t0)

    offsets = schedule(steady(40.0), duration_s=1.5)
    result = await run_open_loop(
        offsets, lambda i: built.next(), clock=clock, connect=connect,
        limits=RunLimits(duration_s=1.5, drain_s=5.0),
    )  # fmt: skip
    assert len(result.records) == len(offsets) == 60
    # Chat template, as the simulated engine counts it: priming + per message (system, user).
    prompt = CHAT_PRIMING_TOKENS + 2 * CHAT_MESSAGE_OVERHEAD_TOKENS + PREFIX_TOKENS + PROMPT_TOKENS
    for record in result.records:
        assert record.ok, record.error
        assert record.status == 200
        assert (record.prompt_tokens, record.output_tokens) == (prompt, OUTPUT_TOKENS)
        assert record.tokens_from_usage
        assert len(record.token_times_s) == OUTPUT_TOKENS  # the simulator streams a token a chunk
        assert record.first_token_s is not None
        assert record.sent_s <= record.first_token_s <= record.end_s
        assert record.group in ("g0", "g1")
    lags = sorted(r.lag_s for r in result.records)
    assert lags[0] >= 0.0
    assert lags[-1] < 0.5  # loose: this machine is shared; the capacity benchmark measures it


async def test_closed_loop_against_the_simulated_engine(sim_url: str) -> None:
    clock, built = RealClock(), workload()

    def connect(t0: float) -> Sender:
        return BenchClient(ClientSettings(sim_url), clock, t0=t0)

    result = await run_closed_loop(
        ClosedLoop(users=2, think_time_s=0.05), lambda i: built.next(), clock=clock,
        connect=connect, limits=RunLimits(duration_s=1.0, drain_s=5.0),
    )  # fmt: skip
    assert len(result.records) >= 4
    assert all(r.ok and r.intended_s == r.sent_s for r in result.records)
    assert [r.index for r in result.records] == list(range(len(result.records)))
