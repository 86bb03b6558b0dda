"""SIGTERM to a gateway process: not ready at once, streams in flight finish, held requests
get 503 at once, and a stream longer than the grace ends with an error event, never a cut
body (what a rolling update or scale-in of the gateway does to its clients)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from fleetserve.fleet.processes import free_port
from fleetserve.testing.fake_engine import FakeEngine, fake_engines
from fleetserve.testing.processes import ManagedProcess
from fleetserve.testing.stack import fleetserve_argv

pytestmark = pytest.mark.integration

MODEL = "m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
START_TIMEOUT_S = 20.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    async with fake_engines(1) as engines:
        yield engines[0]


async def start_gateway(tmp_path: Path, args: list[str], **env: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    process = ManagedProcess(
        fleetserve_argv("gateway", "--port", str(port), *args),
        log_path=tmp_path / "gateway.log",
        env={**os.environ, **env},
        stop_timeout_s=5.0,
    )
    process.start()
    url = f"http://127.0.0.1:{port}"
    await process.wait_http_ok(url + "/health", START_TIMEOUT_S)
    return process, url


async def read_stream(http: aiohttp.ClientSession, url: str) -> tuple[int, list[bytes]]:
    async with http.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        body = await r.read()  # a cut chunked body raises ClientPayloadError here
        return r.status, [e for e in body.split(b"\n\n") if e]


async def wait_exit(process: ManagedProcess, timeout_s: float) -> int:
    async with asyncio.timeout(timeout_s):
        while process.running:  # noqa: ASYNC110 - a child process, not an event we own
            await asyncio.sleep(0.05)
    code = process.returncode
    assert code is not None
    return code


async def test_streams_in_flight_at_sigterm_finish_while_the_gateway_drains(
    tmp_path: Path, engine: FakeEngine
) -> None:
    engine.state.chunks, engine.state.chunk_delay_s = 40, 0.05  # 2 s streams
    gateway, url = await start_gateway(
        tmp_path, ["--model", MODEL, "--upstream", engine.url],
        FLEETSERVE_SHUTDOWN_DELAY_S="1", FLEETSERVE_SHUTDOWN_GRACE_S="30",
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
            streams = [asyncio.create_task(read_stream(http, url)) for _ in range(20)]
            async with asyncio.timeout(10):
                while engine.state.active < 20:  # noqa: ASYNC110 - polling a fake's counter
                    await asyncio.sleep(0.01)
            gateway.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):  # not ready at once ...
                while True:
                    async with http.get(url + "/ready") as r:
                        if r.status == 503:
                            assert (await r.json())["shutting_down"] is True
                            break
                    await asyncio.sleep(0.02)
            # ... yet still serving during the delay, each answer telling clients to go.
            async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                assert r.headers["Connection"] == "close"
            results = await asyncio.gather(*streams)
        for status, events in results:
            assert status == 200
            assert events[-1] == b"data: [DONE]"
            assert len(events) == 41
        assert engine.state.completed == 21
        assert await wait_exit(gateway, 10) == 0
    finally:
        gateway.stop()


async def test_held_requests_get_503_at_sigterm(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(  # a model that can scale from zero, with no replica yet: requests wait
        f"models:\n  - name: {MODEL}\n    engine: sim\n    autoscale: {{min_replicas: 0}}\n"
    )
    gateway, url = await start_gateway(
        tmp_path, ["--fleet-file", str(fleet)], FLEETSERVE_HOLD__STREAM_HEAD_AFTER_S="0.2"
    )
    try:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:

            async def plain() -> tuple[int, dict[str, str], dict[str, object]]:
                async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
                    return r.status, dict(r.headers), await r.json()

            head_out = asyncio.Event()

            async def held_stream() -> tuple[int, list[bytes]]:
                body = {**CHAT, "stream": True}
                async with http.post(url + "/v1/chat/completions", json=body) as r:
                    head_out.set()  # the 200 head of a held stream came (stream_head_after_s)
                    data = await r.read()
                    return r.status, [e for e in data.split(b"\n\n") if e]

            held = [asyncio.create_task(plain()) for _ in range(2)]
            stream = asyncio.create_task(held_stream())
            async with asyncio.timeout(10):
                while True:
                    async with http.get(url + "/admin/fleet") as r:
                        if (await r.json())["held"][MODEL] == 3:
                            break
                    await asyncio.sleep(0.05)
                await head_out.wait()
            signalled = time.monotonic()
            gateway.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*held)
            status, events = await stream
            answered_s = time.monotonic() - signalled
        for code, headers, body in answers:
            assert code == 503
            assert headers["Retry-After"] == "2"
            assert headers["Connection"] == "close"
            error = body["error"]
            assert isinstance(error, dict)
            assert error["code"] == "gateway_shutting_down"
        assert status == 200  # its head went out while it was held ...
        assert orjson.loads(events[-1][len(b"data: ") :])["error"]["code"] == (
            "gateway_shutting_down"
        )  # ... so it ends with the error as an event
        assert answered_s < 5.0  # at once, not after the 120 s hold bound
        assert await wait_exit(gateway, 10) == 0
    finally:
        gateway.stop()


async def test_a_stream_longer_than_the_grace_ends_with_an_error_event(
    tmp_path: Path, engine: FakeEngine
) -> None:
    engine.state.chunks, engine.state.chunk_delay_s = 200, 0.05  # 10 s
    gateway, url = await start_gateway(
        tmp_path, ["--model", MODEL, "--upstream", engine.url],
        FLEETSERVE_SHUTDOWN_DELAY_S="0.2", FLEETSERVE_SHUTDOWN_GRACE_S="1.5",
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
            stream = asyncio.create_task(read_stream(http, url))
            async with asyncio.timeout(10):
                while engine.state.active < 1:  # noqa: ASYNC110 - polling a fake's counter
                    await asyncio.sleep(0.01)
            gateway.send_signal(signal.SIGTERM)
            status, events = await stream  # a clean end: no ClientPayloadError
        assert status == 200
        assert 1 < len(events) < 200
        error = orjson.loads(events[-1][len(b"data: ") :])["error"]
        assert (error["code"], error["type"]) == ("gateway_shutting_down", "server_error")
        assert b"[DONE]" not in events[-1]
        async with asyncio.timeout(5):
            while engine.state.cancelled < 1:  # noqa: ASYNC110 - the upstream was closed
                await asyncio.sleep(0.02)
        assert await wait_exit(gateway, 10) == 0
    finally:
        gateway.stop()
