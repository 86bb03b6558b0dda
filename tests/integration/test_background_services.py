"""Background services that fail unexpectedly are restarted and reported: the fleet monitor
against a real fake engine, the gateway observer against a gateway answering nonsense, and a
real gateway (uvicorn on 127.0.0.1) whose /ready and /metrics show a restart. Time that the
services sleep is a FakeClock's; the HTTP between them is real, on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from fleetserve.autoscale.loop import AutoscaleLoop
from fleetserve.autoscale.observation import Observation
from fleetserve.autoscale.observers import FleetObserver, GatewayFigures, GatewayObserver
from fleetserve.config import (
    AutoscaleSettings,
    FleetFile,
    GatewaySettings,
    HealthSettings,
    ModelSpec,
)
from fleetserve.errors import ObserveError
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.processes import LOOPBACK, free_port
from fleetserve.fleet.replica import Replica
from fleetserve.fleet.sim_actuator import SimActuator
from fleetserve.gateway.app import build_gateway
from fleetserve.gateway.monitor import FleetMonitor
from fleetserve.gateway.serve import make_server
from fleetserve.routing.snapshot import EngineSignals, ReplicaState
from fleetserve.supervisor import ServiceState, Supervisor
from fleetserve.testing.clock import FakeClock
from fleetserve.testing.fake_engine import FakeEngine
from fleetserve.testing.gateway import wait_until

pytestmark = pytest.mark.integration

M = "m"


# -- the fleet monitor ----------------------------------------------------------------------
class BuggyParser:
    """Parses engine metrics; the first call hits a bug (a KeyError the monitor does not
    expect), later ones work."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, text: str) -> EngineSignals:
        self.calls += 1
        if self.calls == 1:
            raise KeyError("vllm:num_requests_running")
        return EngineSignals(running=3, waiting=0)


async def test_monitor_step_that_raises_is_restarted_and_keeps_scraping() -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock, jitter=lambda: 1.0)  # 0.5 s before the first restart
    settings = HealthSettings(interval_s=1.0, scrape_interval_s=1.0)
    parser = BuggyParser()
    fleet = Fleet()
    async with FakeEngine() as engine:
        fleet.add(Replica(id="r0", url=engine.url, model=M, state_since=0.0))
        monitor = FleetMonitor(fleet, settings, clock, {M: parser}, supervisor)
        await monitor.start()  # the first probe: r0 turns ready
        try:
            replica = fleet.get("r0")
            assert replica is not None
            assert replica.state is ReplicaState.READY
            await clock.advance(1.0)  # the first scrape: the parser raises
            await wait_until(lambda: parser.calls == 1)
            scrape = "monitor/scrape"
            await wait_until(lambda: _state(supervisor, scrape) is ServiceState.RESTARTING)
            assert supervisor.view()["degraded"] == [scrape]
            await clock.advance(0.5 + 1.0)  # the restart, then its first round
            await wait_until(lambda: replica.signals.running == 3)
            status = supervisor.status(scrape)
            assert status is not None
            assert (status.state, status.restarts) == (ServiceState.RUNNING, 1)
            assert status.last_error == "KeyError: 'vllm:num_requests_running'"
            probe = supervisor.status("monitor/probe")
            assert probe is not None
            assert (probe.state, probe.restarts) == (ServiceState.RUNNING, 0)
        finally:
            await monitor.stop()
    assert supervisor.statuses() == ()


def _state(supervisor: Supervisor, name: str) -> ServiceState | None:
    status = supervisor.status(name)
    return None if status is None else status.state


# -- the gateway observer -------------------------------------------------------------------
@pytest.fixture
async def admin_api() -> AsyncIterator[tuple[str, dict[str, tuple[bytes, str]]]]:
    """A fake gateway admin API on 127.0.0.1: path -> (body, content type), set by the test."""
    answers: dict[str, tuple[bytes, str]] = {}

    async def answer(request: web.Request) -> web.Response:
        body, content_type = answers[request.path]
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/admin/fleet", answer)
    app.router.add_get("/admin/load", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    try:
        yield f"http://{LOOPBACK}:{port}", answers
    finally:
        await runner.cleanup()


JSON = "application/json"
GOOD_FLEET = orjson.dumps(
    {"replicas": [{"id": "r0", "model": M, "state": "ready", "in_flight": 2, "running": 1}]}
)
GOOD_LOAD = orjson.dumps({"models": {M: {"held": 1, "ttft_p95_s": 0.2}}})


@pytest.mark.parametrize(
    ("fleet", "load", "message"),
    [
        pytest.param((b"<html>oops</html>", JSON), (GOOD_LOAD, JSON), "not JSON", id="not-json"),
        pytest.param((b"", JSON), (GOOD_LOAD, JSON), "not an object", id="empty-body"),
        pytest.param((b"\xff\xfe", JSON), (GOOD_LOAD, JSON), "not JSON", id="not-utf8"),
        pytest.param((b"<html/>", "text/html"), (GOOD_LOAD, JSON), "failed", id="html"),
        pytest.param((b"[]", JSON), (GOOD_LOAD, JSON), "not an object", id="fleet-is-a-list"),
        pytest.param((b'{"replicas": 3}', JSON), (GOOD_LOAD, JSON), "unexpected replicas",
                     id="replicas-not-a-list"),
        pytest.param((b'{"replicas": [7]}', JSON), (GOOD_LOAD, JSON), "unexpected replica",
                     id="replica-not-an-object"),
        pytest.param((b'{"replicas": [{"id": "r0", "model": "m", "state": "ready", '
                      b'"running": "lots"}]}', JSON), (GOOD_LOAD, JSON), "unexpected replica",
                     id="signal-not-a-number"),
        pytest.param((GOOD_FLEET, JSON), (b'"load"', JSON), "not an object", id="load-a-string"),
        pytest.param((GOOD_FLEET, JSON), (b'{"models": {"m": {"held": "x"}}}', JSON),
                     "unexpected load", id="held-not-a-number"),
    ],
)  # fmt: skip
async def test_gateway_answer_of_the_wrong_shape_is_a_skipped_step(
    admin_api: tuple[str, dict[str, tuple[bytes, str]]],
    fleet: tuple[bytes, str],
    load: tuple[bytes, str],
    message: str,
) -> None:
    url, answers = admin_api
    answers["/admin/fleet"], answers["/admin/load"] = fleet, load
    observer = GatewayObserver(url, M)
    try:
        with pytest.raises(ObserveError, match=message):
            await observer.observe(0.0, 1)
    finally:
        await observer.close()


async def test_gateway_answer_of_the_right_shape_is_observed(
    admin_api: tuple[str, dict[str, tuple[bytes, str]]],
) -> None:
    url, answers = admin_api
    answers["/admin/fleet"], answers["/admin/load"] = (GOOD_FLEET, JSON), (GOOD_LOAD, JSON)
    observer = GatewayObserver(url, M)
    try:
        observation = await observer.observe(0.0, 1)
    finally:
        await observer.close()
    assert (observation.held, observation.ttft_p95_s) == (1, 0.2)
    assert [load.in_flight for load in observation.ready_loads] == [2]


# -- a gateway reports its services in /ready and /metrics ---------------------------------
class FailsFirst:
    """An observer whose first observation hits a bug (a ValueError, as a JSONDecodeError)."""

    def __init__(self, inner: FleetObserver) -> None:
        self.inner = inner
        self.calls = 0

    async def observe(self, now: float, current: int) -> Observation:
        self.calls += 1
        if self.calls == 1:
            raise ValueError("Expecting value: line 1 column 1 (char 0)")
        return await self.inner.observe(now, current)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


def sample(metrics: bytes, name: str, service: str) -> float | None:
    prefix = f'{name}{{service="{service}"}} '.encode()
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


async def test_gateway_ready_and_metrics_show_a_restarted_autoscaler() -> None:
    clock = FakeClock()
    supervisor = Supervisor(clock, jitter=lambda: 1.0)  # 0.5 s before the first restart
    fleet = Fleet()
    actuator = SimActuator(clock, cold_start_s=1000, fleet=fleet, model=M)
    observer = FailsFirst(FleetObserver(fleet, M, lambda _m, _now: GatewayFigures()))
    settings = AutoscaleSettings(min_replicas=0, max_replicas=2, period_s=5)
    loop = AutoscaleLoop(M, observer, actuator, settings, clock, supervisor=supervisor)
    gw = GatewaySettings(port=free_port())
    fleet_file = FleetFile(models=[ModelSpec(name=M, engine="sim")])
    app = build_gateway(gw, fleet_file, clock, fleet=fleet, services=[loop], supervisor=supervisor)
    server = make_server(app, gw)
    task = asyncio.create_task(server.serve())
    url = f"http://{LOOPBACK}:{gw.port}"
    service = f"autoscaler/{M}"
    try:
        await wait_until(lambda: server.started or task.done(), timeout_s=10.0)
        assert server.started, "the gateway did not start"
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: observer.calls == 1)
            status, body = await get(session, f"{url}/ready")
            ready = orjson.loads(body)
            assert status == 503  # no replica and nothing to hold: services do not change it
            assert ready["services"][service] == {
                "state": "restarting",
                "restarts": 1,
                "last_error": "ValueError: Expecting value: line 1 column 1 (char 0)",
            }
            assert ready["services"]["monitor/probe"]["state"] == "running"
            assert ready["degraded"] == [service]
            _, metrics = await get(session, f"{url}/metrics")
            assert sample(metrics, "fleetserve_service_up", service) == 0.0
            assert sample(metrics, "fleetserve_service_restarts_total", service) == 1.0
            assert sample(metrics, "fleetserve_service_up", "monitor/scrape") == 1.0

            await clock.advance(0.5)  # the restart: the loop decides again
            await wait_until(lambda: observer.calls == 2)
            _, body = await get(session, f"{url}/ready")
            ready = orjson.loads(body)
            assert ready["services"][service]["state"] == "running"
            assert ready["degraded"] == []
            _, metrics = await get(session, f"{url}/metrics")
            assert sample(metrics, "fleetserve_service_up", service) == 1.0
            assert sample(metrics, "fleetserve_service_restarts_total", service) == 1.0
            assert loop.timeline.latest is not None
            assert loop.timeline.latest.error is None
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
    assert supervisor.statuses() == ()
