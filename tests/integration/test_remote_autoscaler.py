"""`fleetserve autoscaler` as a separate process: it reads a real gateway's admin API and scales
a Deployment on a mock Kubernetes API server (kmock), serving its decisions and metrics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from kmock import RawHandler, Server

from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess
from fleetserve.testing.stack import fleetserve_argv, sim_stack
from tests.integration.test_kubernetes_actuator import NAME, NS, SCALE_PATH, kubeconfig, scale

pytestmark = pytest.mark.integration

MODEL = "sim-remote"
FLEET = f"""
models:
  - name: {MODEL}
    engine: sim
    autoscale:
      period_s: 0.5
      target_concurrency: 2
      scale_up: {{stabilization_window_s: 0}}
"""


@pytest.fixture
async def api() -> AsyncIterator[tuple[RawHandler, str, dict[str, int]]]:
    state = {"replicas": 1}

    def patch(request: Any) -> dict[str, Any]:
        state["replicas"] = int(request.data["spec"]["replicas"])
        return scale(state["replicas"])

    async with RawHandler() as handler, Server(handler) as server:
        handler[f"get {SCALE_PATH}"] << (lambda _req: scale(state["replicas"]))
        handler[f"patch {SCALE_PATH}"] << patch
        yield handler, str(server.url).rstrip("/"), state


async def chat(session: aiohttp.ClientSession, url: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 120}
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        await response.read()
        return response.status


@pytest.mark.timeout(90)
async def test_autoscaler_scales_a_deployment_from_gateway_load(
    api: tuple[RawHandler, str, dict[str, int]], tmp_path: Path
) -> None:
    handler, k8s_url, state = api
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump(kubeconfig(k8s_url)))
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    port = free_port()
    with sim_stack(1, model=MODEL, profile="a10g") as stack:
        argv = fleetserve_argv(
            "autoscaler", "--gateway", stack.url, "--model", MODEL, "--deployment", NAME,
            "--namespace", NS, "--kubeconfig", str(config), "--fleet-file", str(fleet),
            "--min", "1", "--max", "5", "--port", str(port),
        )  # fmt: skip
        async with ManagedProcess(argv, log_path=tmp_path / "autoscaler.log") as proc:
            status_url = f"http://127.0.0.1:{port}"
            await proc.wait_http_ok(f"{status_url}/health", 20)
            async with aiohttp.ClientSession() as session:
                load = [asyncio.ensure_future(chat(session, stack.url)) for _ in range(8)]
                for _ in range(100):  # up to 10 s for the PATCH that scales up
                    if state["replicas"] > 1:
                        break
                    await asyncio.sleep(0.1)
                statuses = await asyncio.gather(*load)
                async with session.get(f"{status_url}/admin/autoscaler") as response:
                    view = orjson.loads(await response.read())
                async with session.get(f"{status_url}/metrics") as response:
                    metrics = await response.text()
                async with session.get(f"{status_url}/ready") as response:
                    ready = orjson.loads(await response.read())
            log = proc.log_text()
    assert statuses == [200] * 8
    assert state["replicas"] > 1, log
    patches = [r for r in handler if r.method == "PATCH"]
    assert patches, log
    assert patches[0].headers["Content-Type"] == "application/merge-patch+json"
    assert view["model"] == MODEL
    assert view["actuator"]["kind"] == "kubernetes"
    assert any(c["direction"] == "up" for c in view["changes"]), view["changes"]
    assert f'fleetserve_desired_replicas{{model="{MODEL}"}}' in metrics
    # Its supervised services, as a gateway reports them.
    assert f'fleetserve_service_up{{service="autoscaler/{MODEL}"}} 1.0' in metrics
    assert f'fleetserve_service_restarts_total{{service="autoscaler/{MODEL}"}} 0.0' in metrics
    assert ready["services"][f"autoscaler/{MODEL}"] == {
        "state": "running", "restarts": 0, "last_error": None,
    }  # fmt: skip
    assert ready["degraded"] == []
    assert "Traceback" not in log


def test_autoscaler_without_a_kubeconfig_is_one_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fleetserve", "autoscaler", "--gateway", "http://127.0.0.1:9",
         "--model", "m", "--deployment", "d", "--kubeconfig", str(tmp_path / "missing"),
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "deployment d" in result.stderr, result.stderr
