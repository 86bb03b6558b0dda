"""A real `fleetserve engine sim` process stamps a request's arrival when its HTTP parser began
the request, not when the body was read: a client that sends its headers, pauses, then sends
the body shows the difference in the request log."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess

pytestmark = pytest.mark.integration

MODEL = "sim-llama"
READY_TIMEOUT_S = 20.0
PAUSE_S = 0.3


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[ManagedProcess, int]]:
    port = free_port()
    argv = [sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
            "--model", MODEL, "--profile", "instant", "--cold-start-s", "0"]  # fmt: skip
    with ManagedProcess(argv, log_path=tmp_path / "sim.log") as proc:
        yield proc, port
        assert proc.stop() == 0, proc.log_text()


async def test_arrival_is_when_the_headers_came_in(sim: tuple[ManagedProcess, int]) -> None:
    proc, port = sim
    url = f"http://127.0.0.1:{port}"
    await proc.wait_http_ok(f"{url}/health", READY_TIMEOUT_S)
    body = orjson.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": True})
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nX-Request-Id: slow-body-1\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5.0)
    try:
        writer.write(head)
        await writer.drain()
        await asyncio.sleep(PAUSE_S)
        writer.write(body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10.0)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" in answer
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(f"{url}/sim/requests") as response,
    ):
        rows = (await response.json())["requests"]
    (row,) = [r for r in rows if r["request_id"] == "slow-body-1"]
    assert PAUSE_S - 0.05 <= row["body_read_s"] - row["arrival_s"] <= PAUSE_S + 1.0
    assert row["ttft_s"] >= row["first_write_s"] - row["body_read_s"] + PAUSE_S - 0.05
