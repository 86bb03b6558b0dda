"""Clients too slow to send or to read: the gateway answers 408 or cuts them off, frees the
replica slot, and keeps serving (raw sockets against a real gateway)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from fleetserve.config import FleetFile, GatewaySettings, ModelSpec, TimeoutSettings
from fleetserve.testing.fake_engine import FakeEngine, fake_engines
from fleetserve.testing.gateway import RunningGateway, running_gateway, wait_until

pytestmark = pytest.mark.integration

MODEL = "m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
READ_TIMEOUT_S = 10.0


def fleet_of(engines: list[FakeEngine]) -> FleetFile:
    return FleetFile(models=[ModelSpec(name=MODEL, replicas=[e.url for e in engines])])


def quick(**timeouts: float) -> GatewaySettings:
    return GatewaySettings(timeouts=TimeoutSettings(**timeouts))


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    async with fake_engines(1) as engines:
        yield engines[0]


async def connect(gw: RunningGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(gw.url.rsplit(":", 1)[1])
    return await asyncio.open_connection("127.0.0.1", port)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until the gateway closes the connection (bounded)."""
    async with asyncio.timeout(READ_TIMEOUT_S):
        return await reader.read()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def still_serves(gw: RunningGateway) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.url + "/v1/chat/completions", json=CHAT) as response,
    ):
        assert response.status == 200


def metric(gw: RunningGateway, kind: str) -> float | None:
    registry = gw.app.metrics.registry
    assert registry is not None
    return registry.get_sample_value("fleetserve_client_timeouts_total", {"kind": kind})


async def test_a_body_that_does_not_arrive_gets_408_and_the_connection_closes(
    engine: FakeEngine,
) -> None:
    async with running_gateway(fleet_of([engine]), quick(body_read_s=0.5)) as gw:
        reader, writer = await connect(gw)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 1000\r\n\r\n" + b'{"model": "'  # 11 of 1,000 bytes, then quiet
        )
        await writer.drain()
        status, headers, body = parse(await read_all(reader))
        writer.close()
        assert status == 408
        assert headers["connection"] == "close"
        error = orjson.loads(body)["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
        assert "0.5 s" in error["message"]
        assert engine.state.received == []  # nothing reached a replica
        assert metric(gw, "body_read") == 1
        await still_serves(gw)


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", id="half-a-head"),
    ],
)
async def test_a_head_that_does_not_arrive_gets_408(engine: FakeEngine, sent: bytes) -> None:
    async with running_gateway(fleet_of([engine]), quick(header_read_s=0.5)) as gw:
        reader, writer = await connect(gw)
        writer.write(sent)
        await writer.drain()
        raw = await read_all(reader)
        writer.close()
        status, headers, body = parse(raw)
        assert status == 408
        assert headers["connection"] == "close"
        assert orjson.loads(body)["error"]["code"] == "request_timeout"
        assert metric(gw, "header_read") == 1
        await still_serves(gw)


async def test_a_head_that_arrives_in_time_is_served(engine: FakeEngine) -> None:
    """Keep-alive: the bound restarts with each request, so a second request after a pause
    shorter than the bound is served."""
    async with running_gateway(fleet_of([engine]), quick(header_read_s=1.0)) as gw:
        body = orjson.dumps(CHAT)
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        reader, writer = await connect(gw)
        for _ in range(2):
            writer.write(request)
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                status, headers, _ = parse(head)
                await reader.readexactly(int(headers["content-length"]))
            assert status == 200
        writer.close()
        assert metric(gw, "header_read") is None


async def test_a_stream_the_client_stops_reading_is_cut_and_its_slot_freed(
    engine: FakeEngine,
) -> None:
    engine.state.chunks, engine.state.pad_bytes = 5000, 8192  # ~40 MB: more than any buffer
    async with running_gateway(fleet_of([engine]), quick(write_stall_s=0.5)) as gw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        port = int(gw.url.rsplit(":", 1)[1])
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        body = orjson.dumps({**CHAT, "stream": True})
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        async with asyncio.timeout(READ_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert parse(head)[0] == 200
        # ... and read nothing more: the gateway's writes back up until it stops waiting.
        replica = gw.fleet.replicas(MODEL)[0]
        await wait_until(lambda: engine.state.cancelled == 1, timeout_s=READ_TIMEOUT_S)
        assert replica.in_flight == 0
        assert metric(gw, "write_stall") == 1
        assert engine.state.completed == 0
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):  # noqa: PT012
            async with asyncio.timeout(READ_TIMEOUT_S):
                while await reader.read(1 << 20):  # the gateway dropped the connection
                    pass
                raise asyncio.IncompleteReadError(b"", None)  # a clean EOF counts as dropped
        writer.close()
        await still_serves(gw)


async def test_a_slow_upload_does_not_count_in_ttft(engine: FakeEngine) -> None:
    """TTFT (what the autoscaler reacts to) counts from the end of the body: a client that
    takes a second to upload does not make the replicas look slow."""
    upload_s = 1.0
    async with running_gateway(fleet_of([engine]), quick(body_read_s=5.0)) as gw:
        body = orjson.dumps({**CHAT, "stream": True})
        reader, writer = await connect(gw)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10]
        )
        await writer.drain()
        await asyncio.sleep(upload_s)  # the client's slow upload, the thing under test
        writer.write(body[10:])
        await writer.drain()
        async with asyncio.timeout(READ_TIMEOUT_S):
            raw = await reader.readuntil(b"data: [DONE]\n\n")
        writer.close()
        assert parse(raw)[0] == 200
        registry = gw.app.metrics.registry
        assert registry is not None
        ttft_sum = registry.get_sample_value("fleetserve_ttft_seconds_sum", {"model": MODEL})
        assert ttft_sum is not None
        assert ttft_sum < upload_s / 2
        window_p95 = gw.app.window.snapshot(MODEL, gw.app.clock.now()).ttft_p95_s
        assert window_p95 is not None
        assert window_p95 < upload_s / 2
