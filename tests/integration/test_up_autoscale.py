"""`fleetserve up --replicas MIN:MAX`: scale from zero without loss, status, clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import signal
import subprocess
import threading
import time

import aiohttp
import orjson
import psutil
import pytest
from openai import OpenAI

from fleetserve.fleet.processes import free_port, port_is_free
from fleetserve.testing.stack import Service, fleetserve_argv, services
from tests.integration.test_up import get_json, reap_on_exit

pytestmark = pytest.mark.integration

MODEL = "sim-auto"
COLD_START_S = 1.0


def up_argv(port: int, replicas: str) -> list[str]:
    return fleetserve_argv(
        "up", "--engine", "sim", "--replicas", replicas, "--port", str(port), "--model", MODEL,
        "--profile", "instant", "--cold-start-s", str(COLD_START_S), "--drain-grace-s", "5",
    )  # fmt: skip


def children_of(up: Service, into: list[psutil.Process]) -> None:
    known = {c.pid for c in into}
    with contextlib.suppress(psutil.NoSuchProcess):
        into.extend(
            c for c in psutil.Process(up.pid).children(recursive=True) if c.pid not in known
        )


def stop(up: Service, children: list[psutil.Process]) -> str:
    up.process.send_signal(signal.SIGTERM)
    try:
        code = up.process.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail("`up` still running 15s after SIGTERM")
    _, alive = psutil.wait_procs(children, timeout=3)
    log = up.process.log_text()
    assert not alive, f"children left running: {alive}\n{log}"
    assert code == 0, log
    assert "Traceback" not in log, log
    return log


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_scale_from_zero_holds_the_request_until_a_replica_is_ready(workers: int) -> None:
    """With two workers the autoscaler runs in the parent: a request held by either worker
    wakes it, and both workers route to the replica it starts."""
    port = free_port()
    children: list[psutil.Process] = []
    with services() as started, reap_on_exit(children):
        up = started.start("up", [*up_argv(port, "0:2"), "--workers", str(workers)], port)
        up.wait_ok("/health")
        fleet = get_json(up.url, "/admin/fleet")
        assert fleet["replicas"] == []  # nothing runs until a request comes
        ready = get_json_any(up.url, "/ready")
        assert ready[0] == 200, ready  # /ready: it can hold

        with OpenAI(base_url=up.url + "/v1", api_key="sk-x", max_retries=0, timeout=60) as c:
            # A stream and a plain request while the fleet is at zero: both wait, both succeed.
            outcome: dict[str, object] = {}

            def streamed() -> None:
                chunks = list(
                    c.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": "stream"}],
                        max_tokens=4,
                        stream=True,
                    )
                )
                outcome["stream"] = "".join(
                    ch.choices[0].delta.content or "" for ch in chunks if ch.choices
                )

            thread = threading.Thread(target=streamed)
            start = time.monotonic()
            thread.start()
            reply = c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4
            )
            waited_s = time.monotonic() - start
            thread.join(30)
            children_of(up, children)
        assert reply.choices[0].message.content
        assert outcome.get("stream"), outcome
        # It waited for a cold start (the engine's simulated load time at least).
        assert waited_s >= COLD_START_S, waited_s

        time.sleep(1.5)  # the actuator's status refreshes every second
        view = get_json(up.url, "/admin/autoscaler")
        changes = view["changes"]
        assert isinstance(changes, list)
        assert any("held" in str(c["reason"]) for c in changes), changes
        actuator = view["actuator"]
        assert isinstance(actuator, dict)
        colds = actuator["cold_starts_s"]
        assert isinstance(colds, list)
        assert colds
        assert colds[0] >= COLD_START_S

        status = subprocess.run(
            fleetserve_argv("status", "--url", up.url), capture_output=True, timeout=30,
            check=False,
        )  # fmt: skip
        text = status.stdout.decode()
        assert status.returncode == 0, status.stderr.decode()
        assert "autoscaler for" in text
        assert "ready" in text
        log = stop(up, children)
    assert port_is_free(port), log


def get_json_any(url: str, path: str) -> tuple[int, object]:
    connection = http.client.HTTPConnection(url.split("://", 1)[1], timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        connection.close()


def test_bad_replica_range_is_one_clear_line() -> None:
    for bad in ("3:1", "a:b", "0", "1:100"):
        result = subprocess.run(
            up_argv(free_port(), bad), capture_output=True, timeout=30, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        stderr = result.stderr.decode()
        assert result.returncode != 0
        assert "Traceback" not in stderr
        assert "--replicas" in stderr, stderr


@pytest.mark.timeout(90)
async def test_two_workers_autoscaler_sees_the_load_of_both() -> None:
    """16 long streams over two workers: the parent's autoscaler counts all 16 in flight
    (target 6 a replica: 3 replicas), not one worker's share."""
    port = free_port()
    children: list[psutil.Process] = []
    argv = fleetserve_argv(
        "up", "--engine", "sim", "--replicas", "1:3", "--port", str(port), "--model", MODEL,
        "--profile", "a10g", "--cold-start-s", "0.5", "--workers", "2",
    )  # fmt: skip
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 600,
            "stream": True}  # fmt: skip
    with services() as started, reap_on_exit(children):
        up = started.start("up", argv, port)
        up.wait_ok("/ready")

        async def stream() -> int:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
                http.post(up.url + "/v1/chat/completions", json=body) as r,
            ):
                await r.read()
                return r.status

        tasks = [asyncio.create_task(stream()) for _ in range(16)]
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(30):
                while True:
                    async with http.get(up.url + "/admin/autoscaler") as r:
                        view = await r.json()
                    if (view.get("desired") or 0) >= 3:
                        break
                    await asyncio.sleep(0.2)
            async with http.get(up.url + "/admin/fleet") as r:
                fleet = await r.json()
        assert fleet["workers"] == 2
        assert view["latest"]["signals"]["load"] == 3, view["latest"]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        children_of(up, children)
        stop(up, children)
    assert port_is_free(port)
