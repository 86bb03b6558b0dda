"""`fleetserve gateway` on Kubernetes discovery: a real gateway process watches the
EndpointSlices of a mock API server (kmock, in this test's loop) whose slice points at a real
`fleetserve engine sim` on 127.0.0.1; requests reach the engine once the slice lists it, and
the replica leaves the fleet when the slice drops it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kmock import RawHandler, Server

from fleetserve.fleet.processes import LOOPBACK, free_port
from fleetserve.testing.processes import ManagedProcess
from fleetserve.testing.stack import FAST_HEALTH_ENV, fleetserve_argv, sim_engine_argv
from tests.integration.test_kubernetes_actuator import kubeconfig
from tests.unit.test_kubernetes_discovery import (
    NS,
    SELECTOR,
    SERVICE,
    SLICES_PATH,
    FakeSliceApi,
    endpoint,
    endpoint_slice,
)

pytestmark = pytest.mark.integration

MODEL = "sim-k8s"
FLEET = f"""
models:
  - name: {MODEL}
    engine: sim
    discovery: {{kubernetes: {{service: {SERVICE}, namespace: {NS}, port: http}}}}
"""


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeSliceApi, str]]:
    async with RawHandler() as handler, Server(handler) as server:
        slices = FakeSliceApi(handler)
        try:
            yield slices, str(server.url).rstrip("/")
        finally:
            slices._close()


async def chat(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        return response.status, await response.json(content_type=None)


async def fleet_urls(session: aiohttp.ClientSession, url: str) -> list[str]:
    async with session.get(f"{url}/admin/fleet") as response:
        view = await response.json()
    return [r["url"] for r in view["replicas"]]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["fleet-file", "cli-shortcut"])
async def test_gateway_routes_to_the_endpoints_of_a_service(
    api: tuple[FakeSliceApi, str], tmp_path: Path, how: str
) -> None:
    slices, k8s_url = api
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump(kubeconfig(k8s_url)))
    engine_port, gateway_port = free_port(), free_port()
    engine_url = f"http://{LOOPBACK}:{engine_port}"
    gateway_url = f"http://{LOOPBACK}:{gateway_port}"
    if how == "fleet-file":
        fleet = tmp_path / "fleet.yaml"
        fleet.write_text(FLEET)
        args = ["--fleet-file", str(fleet)]
    else:
        args = ["--model", MODEL, "--engine", "sim", "--k8s-service", SERVICE,
                "--k8s-namespace", NS, "--k8s-port", "http"]  # fmt: skip
    env = {**os.environ, **FAST_HEALTH_ENV, "FLEETSERVE_KUBECONFIG": str(config)}
    engine_argv = sim_engine_argv(engine_port, MODEL, "instant", ("--cold-start-s", "0"))
    gateway_argv = fleetserve_argv("gateway", "--port", str(gateway_port), *args)
    async with (
        ManagedProcess(engine_argv, log_path=tmp_path / "engine.log") as engine,
        ManagedProcess(gateway_argv, log_path=tmp_path / "gateway.log", env=env) as gateway,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):
        await engine.wait_http_ok(f"{engine_url}/health", 30)
        await gateway.wait_http_ok(f"{gateway_url}/health", 30)
        for _ in range(200):  # the gateway lists, then watches (up to 10 s)
            if slices.watches:
                break
            await asyncio.sleep(0.05)
        assert slices.watches, gateway.log_text()
        status, _ = await chat(session, gateway_url)
        assert status == 503  # the model is known, but no replica yet

        slices.put(endpoint_slice("s1", [endpoint(LOOPBACK)], ports=[("http", engine_port)]))
        for _ in range(100):  # added as starting, ready at the next 0.25 s probe (up to 10 s)
            status, answer = await chat(session, gateway_url)
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200, (answer, gateway.log_text())
        assert answer["choices"][0]["message"]["content"]
        assert await fleet_urls(session, gateway_url) == [engine_url]

        slices.put(endpoint_slice("s1", [], ports=[("http", engine_port)]))
        for _ in range(100):
            if await fleet_urls(session, gateway_url) == []:
                break
            await asyncio.sleep(0.1)
        assert await fleet_urls(session, gateway_url) == []
        status, _ = await chat(session, gateway_url)
        assert status == 503

    requests = slices.requests()
    assert requests[0] == ("LIST", {"labelSelector": SELECTOR})
    assert requests[1][0] == "WATCH"
    assert requests[1][1]["resourceVersion"] == "100"
    assert all(r.url.path == SLICES_PATH for r in slices.handler)
    assert "Traceback" not in gateway.log_text(100_000)


def test_gateway_without_a_kubeconfig_is_one_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fleetserve", "gateway", "--port", str(free_port()),
         "--model", MODEL, "--k8s-service", SERVICE, "--kubeconfig", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"cannot load a Kubernetes configuration from {tmp_path / 'missing'}" in result.stderr
    assert f"model {MODEL} (service {SERVICE})" in result.stderr
