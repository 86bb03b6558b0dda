"""The live page's HTTP surface on a real gateway process: the page loads without the key and
asks for it; its data (JSON and the SSE stream) needs the admin key exactly as /admin/* do;
snapshots have the page's shape; the stream is well-framed SSE that shows a request within a
push; and an open stream never holds the gateway's shutdown up."""

from __future__ import annotations

import asyncio
import contextlib
import re
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
from fleetserve.testing.stack import FAST_HEALTH_ENV, env_without_settings, fleetserve_argv

pytestmark = pytest.mark.integration

MODEL = "m"
KEY = "dash-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = aiohttp.ClientTimeout(total=15)
PAGE_LIMIT_BYTES = 200 * 1024
STOP_AT_ONCE = {"FLEETSERVE_SHUTDOWN_DELAY_S": "0"}  # no load balancer to wait for
SNAPSHOT_KEYS = {
    "wall", "workers", "shutting_down", "replicas", "models", "history", "autoscaler",
    "tenants", "requests", "trail_for_s", "trail_span_s",
}  # fmt: skip
REPLICA_KEYS = {
    "id", "name", "model", "url", "state", "reason", "state_for_s", "in_flight", "running",
    "waiting", "kv_usage_frac", "ttft_p95_s", "tokens_per_s", "scrape_age_s",
}  # fmt: skip
MODEL_KEYS = {
    "name", "ready", "replicas", "desired", "arrival_rps", "in_flight", "held", "max_held",
    "can_hold", "ttft_p95_s", "window_ttft_p95_s", "error_rate", "completed_rps",
}  # fmt: skip


@contextlib.asynccontextmanager
async def gateway_process(
    tmp_path: Path, engine: FakeEngine, *args: str, **env: str
) -> AsyncIterator[tuple[ManagedProcess, str]]:
    """`fleetserve gateway` over the engine, with the admin key; stopped by PID at the end."""
    port = free_port()
    argv = fleetserve_argv(
        "gateway", "--port", str(port), "--model", MODEL, "--upstream", engine.url,
        "--admin-key", KEY, *args,
    )  # fmt: skip
    process = ManagedProcess(
        argv, log_path=tmp_path / "gateway.log",
        env=env_without_settings(**{**FAST_HEALTH_ENV, **STOP_AT_ONCE, **env}),
        stop_timeout_s=5.0,
    )  # fmt: skip
    with process:
        url = f"http://127.0.0.1:{port}"
        await process.wait_http_ok(url + "/ready", 20.0)
        yield process, url


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[str, FakeEngine]]:
    async with fake_engines(1) as engines, gateway_process(tmp_path, engines[0]) as (_, url):
        yield url, engines[0]


async def read_events(response: aiohttp.ClientResponse, count: int) -> list[tuple[str, bytes]]:
    """The first `count` SSE blocks as (event, data); each block must end with a blank line."""
    events: list[tuple[str, bytes]] = []
    buffer = b""
    async with asyncio.timeout(10):
        while len(events) < count:
            chunk = await response.content.readany()
            assert chunk, f"the stream ended after {len(events)} events"
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                fields = dict(line.split(b": ", 1) for line in block.split(b"\n"))
                events.append((fields.get(b"event", b"").decode(), fields.get(b"data", b"")))
                if b"retry" in fields:
                    assert fields == {b"retry": b"1000"}
                    events[-1] = ("retry", b"1000")
    return events


async def test_data_needs_the_admin_key_and_the_page_does_not(
    gateway: tuple[str, FakeEngine],
) -> None:
    url, _ = gateway
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        for path in ("/admin/dashboard", "/admin/dashboard/stream"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                async with http.get(url + path, headers=headers) as r:
                    assert r.status == 401, (path, headers)
                    body = await r.json()
                    assert body["error"]["code"] == "invalid_api_key"
        async with http.get(url + "/dashboard") as r:
            assert r.status == 200
            assert r.content_type == "text/html"
            page = await r.read()
            csp = r.headers["Content-Security-Policy"]
        assert r.headers["Cache-Control"] == "no-store"
    assert len(page) < PAGE_LIMIT_BYTES
    assert b'data-auth="key"' in page  # it asks for the key before it asks for data
    assert KEY.encode() not in page
    assert "default-src 'none'" in csp
    assert "connect-src 'self'" in csp
    # Self-contained: nothing to fetch (the SVG namespace is a name, not a resource).
    assert re.findall(rb"(?:src|href)=\"(?!data:)", page) == []
    assert set(re.findall(rb"https?://[^\s\"')]+", page)) == {b"http://www.w3.org/2000/svg"}


async def test_snapshot_shape_and_a_request_in_the_trail(gateway: tuple[str, FakeEngine]) -> None:
    url, engine = gateway
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        async with http.get(url + "/admin/dashboard", headers=AUTH) as r:
            assert r.status == 200
            first = await r.json()
        assert set(first) == SNAPSHOT_KEYS
        assert first["requests"] == []  # nothing kept before a page asked
        assert first["trail_for_s"] is not None  # ... and kept from then on
        [replica] = first["replicas"]
        assert set(replica) == REPLICA_KEYS
        assert replica["url"] == engine.url
        assert replica["state"] == "ready"
        [model] = first["models"]
        assert set(model) == MODEL_KEYS
        assert (model["name"], model["ready"], model["replicas"]) == (MODEL, 1, 1)
        assert first["autoscaler"] is None
        assert first["tenants"] is None
        assert first["history"]["span_s"] == 900.0

        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with http.post(
            url + "/v1/chat/completions", json=chat, headers={"X-Request-ID": "req-dash-1"}
        ) as r:
            assert r.status == 200
            await r.read()
        async with asyncio.timeout(5):
            while True:
                async with http.get(url + "/admin/dashboard", headers=AUTH) as r:
                    snap = await r.json()
                if snap["requests"]:
                    break
                await asyncio.sleep(0.1)
    [request] = snap["requests"]
    assert request["id"] == "req-dash-1"
    assert (request["model"], request["status"], request["error"]) == (MODEL, 200, False)
    assert request["replica"] == replica["id"]
    assert request["ttft_s"] is not None
    assert request["ttft_s"] <= request["e2e_s"]
    assert snap["replicas"][0]["ttft_p95_s"] is not None
    assert snap["models"][0]["error_rate"] == 0.0


async def test_the_stream_is_sse_and_pushes_a_change_within_a_second(
    gateway: tuple[str, FakeEngine],
) -> None:
    url, engine = gateway
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as http,
        http.get(url + "/admin/dashboard/stream", headers=AUTH) as r,
    ):
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        assert r.headers["Cache-Control"] == "no-store"
        events = await read_events(r, 3)
        assert events[0] == ("retry", b"1000")
        assert [e for e, _ in events[1:]] == ["snapshot", "snapshot"]
        assert set(orjson.loads(events[1][1])) == SNAPSHOT_KEYS
        engine.state.healthy = False  # its /health answers 503: the next probe ejects it
        changed = time.monotonic()
        async with asyncio.timeout(5):
            while True:
                [(event, data)] = await read_events(r, 1)
                assert event == "snapshot"
                if orjson.loads(data)["replicas"][0]["state"] == "unhealthy":
                    break
        # A probe every 0.25 s (FAST_HEALTH_ENV) and a push every 0.5 s.
        assert time.monotonic() - changed < 1.5


async def test_an_open_stream_ends_with_bye_and_does_not_hold_shutdown_up(tmp_path: Path) -> None:
    env = {"FLEETSERVE_SHUTDOWN_GRACE_S": "30"}
    async with fake_engines(1) as engines, gateway_process(tmp_path, engines[0], **env) as started:
        process, url = started
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as http,
            http.get(url + "/admin/dashboard/stream", headers=AUTH) as r,
        ):
            await read_events(r, 2)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            async with asyncio.timeout(5):
                rest = await r.content.read()  # ends: the gateway closed the stream
            assert rest.endswith(b"\n\n")
            last = rest.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
            assert last.startswith(b"event: bye\ndata: ")
        async with asyncio.timeout(10):
            while process.running:  # noqa: ASYNC110 - a child process, not an event we own
                await asyncio.sleep(0.05)
        assert time.monotonic() - signalled < 5.0  # not the 30 s grace
        assert process.returncode == 0, process.log_text()
        assert "Traceback" not in process.log_text()


async def test_tenants_usage_and_the_tenant_of_each_request(tmp_path: Path) -> None:
    """With auth = keys the snapshot carries each tenant's usage from the ledger (last hour)
    and the last requests name their tenant and output tokens."""
    env = {"FLEETSERVE_STATE_DIR": str(tmp_path / "state")}
    async with (
        fake_engines(1) as engines,
        gateway_process(tmp_path, engines[0], "--auth", "keys", **env) as (_, url),
        aiohttp.ClientSession(timeout=TIMEOUT) as http,
    ):
        async with http.post(url + "/admin/tenants", json={"name": "acme"}, headers=AUTH) as r:
            assert r.status == 201, await r.text()
        async with http.post(url + "/admin/keys", json={"tenant": "acme"}, headers=AUTH) as r:
            assert r.status == 201, await r.text()
            token = (await r.json())["key"]
        async with http.get(url + "/admin/dashboard", headers=AUTH) as r:
            assert (await r.json())["tenants"] == {"since_s": 3600.0, "data": [], "error": None}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(
            url + "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 200, await r.text()
        async with asyncio.timeout(10):  # the ledger's batch, then the page's 5 s refresh
            while True:
                async with http.get(url + "/admin/dashboard", headers=AUTH) as r:
                    snap = await r.json()
                if snap["tenants"]["data"]:
                    break
                await asyncio.sleep(0.2)
    [usage] = snap["tenants"]["data"]
    assert usage["group"] == "acme"
    assert usage["requests"] == 1
    assert usage["completion_tokens"] == engines[0].state.chunks
    [request] = snap["requests"]
    assert request["tenant"] == "acme"
    assert request["tokens_out"] == engines[0].state.chunks
    assert token not in orjson.dumps(snap).decode()  # no key in what the page gets
