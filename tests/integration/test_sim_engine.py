"""`python -m fleetserve engine sim` as a real process on a loopback port."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from fleetserve.engines.sim.text import count_tokens
from fleetserve.engines.vllm import parse_vllm_signals
from fleetserve.fleet.processes import free_port, port_is_free
from fleetserve.testing.processes import ManagedProcess, wait_port_open

pytestmark = pytest.mark.integration

MODEL = "sim-llama"
READY_TIMEOUT_S = 20.0


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def sim_argv(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
            "--model", MODEL, *extra]  # fmt: skip


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[ManagedProcess, str]]:
    port = free_port()
    argv = sim_argv(port, "--profile", "a10g", "--cold-start-s", "1.5", "--max-num-seqs", "4")
    with ManagedProcess(argv, log_path=tmp_path / "sim.log") as proc:
        yield proc, f"http://127.0.0.1:{port}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def sse_data(response: aiohttp.ClientResponse) -> list[bytes]:
    body = await response.read()
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


async def test_serves_openai_and_metrics_then_stops_on_sigterm(
    sim: tuple[ManagedProcess, str], http: aiohttp.ClientSession
) -> None:
    proc, url = sim
    await wait_port_open(port_of(url), READY_TIMEOUT_S)
    async with http.get(f"{url}/v1/models") as early:  # still in its simulated cold start
        assert early.status == 503
    await proc.wait_http_ok(f"{url}/health", READY_TIMEOUT_S)

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
    async with http.post(f"{url}/v1/chat/completions", json=chat) as response:
        assert response.status == 200
        data = await response.json()
    text = data["choices"][0]["message"]["content"]
    assert data["usage"]["completion_tokens"] == count_tokens(text) == 6

    streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{url}/v1/chat/completions", json=streamed) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = await sse_data(response)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-2]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == text
    assert orjson.loads(events[-2])["usage"]["completion_tokens"] == 6

    completion = {"model": MODEL, "prompt": "Once", "max_tokens": 3}
    async with http.post(f"{url}/v1/completions", json=completion) as response:
        assert (await response.json())["usage"]["completion_tokens"] == 3
    async with http.post(f"{url}/v1/completions", json={**completion, "stream": True}) as response:
        events = await sse_data(response)
    assert len(events) == 4  # three tokens, then [DONE]

    async with http.get(f"{url}/metrics") as response:
        metrics = await response.text()
    assert 'vllm:request_success_total{engine="0",finished_reason="length"' in metrics
    signals = parse_vllm_signals(metrics)
    assert (signals.running, signals.waiting, signals.kv_usage_frac) == (0.0, 0.0, 0.0)

    assert proc.stop() == 0, proc.log_text()
    assert not proc.running
    assert port_is_free(port_of(url))
    assert "Traceback" not in proc.log_text()


@pytest.mark.parametrize(
    ("argv_tail", "message", "code"),
    [
        pytest.param(("--profile", "h200"), "unknown sim profile 'h200'", 2,
                     id="unknown-profile"),  # a bad value: status 2
        pytest.param(("--profile", "instant"), "is already in use", 1, id="port-in-use"),
    ],
)  # fmt: skip
async def test_start_up_errors_are_one_clear_line(
    sim: tuple[ManagedProcess, str], argv_tail: tuple[str, ...], message: str, code: int
) -> None:
    _, url = sim  # holds the port the second process tries to take
    port = port_of(url)
    await wait_port_open(port, READY_TIMEOUT_S)
    result = subprocess.run(  # noqa: ASYNC221 - a bounded wait for a short-lived process
        sim_argv(port, *argv_tail), capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1
