"""Scale from zero at the gateway: held requests, a simulated engine started late, hooks.

The gateway runs in-process under uvicorn on a free port, built with the hooks a composition
root uses (a pre-built Fleet, on_demand, services, admin views). The on_demand hook starts a
real `fleetserve engine sim` process and adds it to the Fleet as a starting replica, as the
local actuator will; the gateway's monitor probes it until its simulated cold start is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import aiohttp
import orjson
import pytest
from pydantic import SecretStr

from fleetserve.config import FleetFile, GatewaySettings, HealthSettings, HoldSettings, ModelSpec
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.processes import free_port
from fleetserve.fleet.replica import Replica
from fleetserve.gateway.app import BackgroundService, build_gateway
from fleetserve.gateway.asgi import GatewayApp
from fleetserve.gateway.hold import DemandHook
from fleetserve.gateway.routes import AdminView
from fleetserve.gateway.serve import make_server
from fleetserve.testing.fake_engine import fake_engines
from fleetserve.testing.gateway import wait_until
from fleetserve.testing.processes import ManagedProcess

pytestmark = pytest.mark.integration

M = "sim-m"
COLD_START_S = 2.0
CHAT = {"model": M, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
FAST_HEALTH = HealthSettings(interval_s=0.2, scrape_interval_s=0.2)


def settings(**hold: float) -> GatewaySettings:
    return GatewaySettings(
        port=free_port(), health=FAST_HEALTH, hold=HoldSettings(**hold), retry_after_s=3
    )


def empty_fleet_file() -> FleetFile:
    return FleetFile(models=[ModelSpec(name=M, engine="vllm", picker="prefix_affinity")])


@contextlib.asynccontextmanager
async def serving(
    gw_settings: GatewaySettings,
    fleet_file: FleetFile,
    *,
    fleet: Fleet | None = None,
    on_demand: DemandHook | None = None,
    services: Iterable[BackgroundService] = (),
    admin_views: Mapping[str, AdminView] | None = None,
    hold_models: Iterable[str] = (M,),
) -> AsyncIterator[tuple[GatewayApp, str]]:
    app = build_gateway(
        gw_settings, fleet_file, fleet=fleet, on_demand=on_demand, services=list(services),
        admin_views=admin_views, hold_models=hold_models,
    )  # fmt: skip
    server = make_server(app, gw_settings)
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done(), timeout_s=10.0)
        assert server.started, "the gateway did not start"
        yield app, f"http://127.0.0.1:{gw_settings.port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


class LateSimEngine:
    """The on_demand hook of these tests: starts one simulated engine process, once."""

    def __init__(self, fleet: Fleet, log_dir: Path) -> None:
        self.fleet = fleet
        self.log_dir = log_dir
        self.calls: list[str] = []
        self.proc: ManagedProcess | None = None

    def __call__(self, model: str) -> None:
        self.calls.append(model)
        if self.proc is not None:
            return
        port = free_port()
        argv = [
            sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
            "--model", model, "--profile", "instant", "--cold-start-s", f"{COLD_START_S}",
        ]  # fmt: skip
        self.proc = ManagedProcess(argv, log_path=self.log_dir / "sim.log").start()
        url = f"http://127.0.0.1:{port}"
        self.fleet.add(Replica(id=f"sim@{port}", url=url, model=model))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


async def read_stream(
    http: aiohttp.ClientSession, url: str, body: object
) -> tuple[int, list[bytes], dict[str, str]]:
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        raw = await r.read()
        return r.status, [e for e in raw.split(b"\n\n") if e], dict(r.headers)


async def test_held_requests_succeed_when_a_late_engine_turns_ready(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fleet = Fleet()
    engine = LateSimEngine(fleet, tmp_path)
    gw = settings(stream_head_after_s=0.3, keepalive_s=0.5, timeout_s=30.0)
    try:
        async with serving(gw, empty_fleet_file(), fleet=fleet, on_demand=engine) as (app, url):
            async with http.get(url + "/ready") as r:
                assert r.status == 200
                assert (await r.json())["models_can_hold"] == [M]
            plain = [asyncio.create_task(http.post(url + "/v1/chat/completions", json=CHAT))
                     for _ in range(3)]  # fmt: skip
            stream = asyncio.create_task(read_stream(http, url, {**CHAT, "stream": True}))
            await wait_until(lambda: app.holds.held(M) == 4, timeout_s=5.0)
            async with http.get(url + "/admin/fleet") as r:
                assert (await r.json())["held"] == {M: 4}
            async with http.get(url + "/admin/load") as r:
                load = (await r.json())["models"][M]
            assert (load["held"], load["in_flight"]) == (4, 0)
            assert load["arrival_rps"] > 0
            for task in plain:
                async with await task as response:
                    assert response.status == 200, await response.text()
                    assert "choices" in await response.json()
            status, events, headers = await stream
            assert status == 200
            assert headers["Content-Type"].startswith("text/event-stream")
            comments = [e for e in events if e.startswith(b": waiting for a replica (")]
            assert len(comments) >= 2  # a cold start of 2 s, a comment every 0.5 s from 0.3 s
            assert events[: len(comments)] == comments  # the comments come first
            assert events[-1] == b"data: [DONE]"
            assert any(b'"choices"' in e for e in events[len(comments) : -1])
            assert engine.calls == [M]  # one wake for the burst
            assert app.holds.held(M) == 0
            async with http.get(url + "/metrics") as r:
                text = await r.text()
            assert f'fleetserve_hold_seconds_count{{model="{M}"}} 4.0' in text
            assert f'fleetserve_held_requests{{model="{M}"}} 0.0' in text
            assert f'fleetserve_requests_total{{model="{M}",status="200"}} 4.0' in text
            hold_sum = next(
                float(line.split()[-1]) for line in text.splitlines()
                if line.startswith(f'fleetserve_hold_seconds_sum{{model="{M}"}}')
            )  # fmt: skip
            assert hold_sum / 4 >= COLD_START_S * 0.5  # held through (most of) the cold start
            status, _, _ = await read_stream(http, url, {**CHAT, "stream": True})
            assert status == 200  # and later requests go straight through
            assert app.holds.held(M) == 0
    finally:
        engine.stop()


async def test_no_replica_coming_ends_with_503_retry_after(http: aiohttp.ClientSession) -> None:
    gw = settings(stream_head_after_s=0.2, keepalive_s=0.3, timeout_s=1.0)
    async with serving(gw, empty_fleet_file()) as (app, url):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "3"
            error = (await r.json())["error"]
        assert error["code"] == "no_replica_ready"
        assert "within 1 s" in error["message"]
        status, events, _ = await read_stream(http, url, {**CHAT, "stream": True})
        assert status == 200  # the head went out while it waited
        assert events[0].startswith(b": waiting for a replica (")
        error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
        assert (error["code"], error["type"]) == ("no_replica_ready", "server_error")
        assert app.holds.held(M) == 0
        async with http.get(url + "/metrics") as r:
            text = await r.text()
        assert f'fleetserve_requests_total{{model="{M}",status="503"}} 2.0' in text


async def test_full_hold_queue_and_disconnect(http: aiohttp.ClientSession) -> None:
    gw = settings(max_held=2, timeout_s=20.0)
    async with serving(gw, empty_fleet_file()) as (app, url):
        held = [asyncio.create_task(http.post(url + "/v1/chat/completions", json=CHAT))
                for _ in range(2)]  # fmt: skip
        await wait_until(lambda: app.holds.held(M) == 2)
        async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "3"
            assert (await r.json())["error"]["code"] == "hold_queue_full"
        for task in held:  # the clients give up: their places free at once
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        await wait_until(lambda: app.holds.held(M) == 0)
        assert app.window.snapshot(M, app.clock.now()).held == 0


async def test_static_model_without_autoscaling_still_answers_503_at_once(
    http: aiohttp.ClientSession,
) -> None:
    async with serving(settings(), empty_fleet_file(), hold_models=()) as (_, url):
        async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "no_replica_available"
        async with http.get(url + "/ready") as r:
            assert r.status == 503


class RecordingService:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def start(self) -> None:
        self.log.append("start")

    async def stop(self) -> None:
        self.log.append("stop")


async def test_runtime_replicas_are_probed_and_routed_services_and_admin_views(
    http: aiohttp.ClientSession,
) -> None:
    log: list[str] = []
    views = {"autoscaler": lambda: {"decisions": len(log)}}
    keyed = settings().model_copy(update={"admin_key": SecretStr("sk-admin")})
    auth = {"Authorization": "Bearer sk-admin"}
    async with (
        fake_engines(2) as engines,
        serving(keyed, empty_fleet_file(), services=[RecordingService(log)],
                admin_views=views, hold_models=()) as (app, url),
    ):  # fmt: skip
        assert log == ["start"]
        async with http.get(url + "/admin/autoscaler") as r:
            assert r.status == 401
        async with http.get(url + "/admin/autoscaler", headers=auth) as r:
            assert await r.json() == {"decisions": 1}
        for i, engine in enumerate(engines):  # added at run time, starting: the monitor probes
            app.fleet.add(Replica(id=f"r{i}", url=engine.url, model=M))
        await wait_until(lambda: len(app.fleet.ready(M)) == 2)
        for i in range(20):  # prefix affinity spreads distinct prompts over the new ring
            body = {**CHAT, "messages": [{"role": "user", "content": f"prompt {i}"}]}
            async with http.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
        assert all(e.state.completed > 0 for e in engines)
        app.fleet.drain("r0", app.clock.now())
        app.fleet.remove("r0")
        before = engines[0].state.completed
        for _ in range(5):
            async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                assert r.headers["x-fleetserve-replica"] == "r1"
        assert engines[0].state.completed == before
        app.fleet.remove("r1")  # an empty ring does not crash: a plain 503
        async with http.post(url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 503
    assert log == ["start", "stop"]
