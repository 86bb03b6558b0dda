"""A real `fleetserve engine sim` process reports, at /sim/requests, a request's timing that the
latency model predicts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from fleetserve.engines.sim.profiles import PROFILES
from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess

pytestmark = pytest.mark.integration

MODEL = "sim-llama"
READY_TIMEOUT_S = 20.0
# Timer slack of an asyncio sleep plus a write, on a shared 2-core machine under load. uvloop's
# timers have 1 ms resolution, so a step may also end up to 1 ms before its modelled time.
# A late wake-up delays the first token by all of it; later ones catch up on the step grid.
SLACK_S = 0.010
TTFT_SLACK_S = 0.030
EARLY_S = 0.001


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[ManagedProcess, str]]:
    port = free_port()
    argv = [sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
            "--model", MODEL, "--profile", "a10g", "--cold-start-s", "0"]  # fmt: skip
    with ManagedProcess(argv, log_path=tmp_path / "sim.log") as proc:
        yield proc, f"http://127.0.0.1:{port}"
        assert proc.stop() == 0, proc.log_text()


async def test_sim_requests_reports_the_modelled_ttft_and_tpot(
    sim: tuple[ManagedProcess, str],
) -> None:
    proc, url = sim
    await proc.wait_http_ok(f"{url}/health", READY_TIMEOUT_S)
    profile = PROFILES["a10g"]
    prompt = "word " * 800  # a prefill long enough to see in the TTFT
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 32, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.delete(f"{url}/sim/requests") as response:
            assert response.status == 200
        async with http.post(f"{url}/v1/completions", json=body) as response:
            assert response.status == 200
            await response.read()
        async with http.get(f"{url}/sim/requests") as response:
            assert response.status == 200
            page = await response.json()
        async with http.get(f"{url}/sim/requests", params={"since": page["next"]}) as response:
            assert (await response.json())["requests"] == []
    (row,) = page["requests"]
    assert (row["output_tokens"], row["finish_reason"], row["writes"]) == (32, "length", 32)
    prompt_tokens = row["prompt_tokens"]
    assert prompt_tokens > 800
    expected_ttft_s = profile.prefill_s(prompt_tokens) + profile.decode_step_s(1)
    assert expected_ttft_s > 0.05  # the prefill dominates: the check below means something
    assert expected_ttft_s - EARLY_S <= row["ttft_s"] <= expected_ttft_s + TTFT_SLACK_S
    step_s = profile.decode_step_s(1)
    assert step_s - EARLY_S <= row["tpot_s"] <= step_s + SLACK_S
    assert row["e2e_s"] == pytest.approx(row["ttft_s"] + 31 * row["tpot_s"])
    # What the latency model decided and what the server wrote differ by the write only.
    assert -EARLY_S <= row["first_write_s"] - row["engine_first_token_s"] < TTFT_SLACK_S
