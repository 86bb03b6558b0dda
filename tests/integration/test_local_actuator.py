"""LocalActuator with real simulated engines: 0 -> 2 -> 1 -> 0 with a drain that lets an
in-flight request finish, a crash noticed, a failed start reported, and every PID gone."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import psutil
import pytest

from fleetserve.clock import RealClock
from fleetserve.engines.sim.adapter import SimAdapter
from fleetserve.errors import ActuatorError
from fleetserve.fleet.actuators import ActuatorStatus
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.local import LocalActuator, LocalActuatorSettings
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.stack import AdapterLauncher

pytestmark = pytest.mark.integration

MODEL = "sim-local"
WAIT_S = 30.0
# a10g decodes a lone request at ~36 ms a token: 60 tokens keep a request in flight ~2 s.
LONG_TOKENS = 60


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> float:
    """Poll `condition` every 20 ms until true; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"not within {timeout_s:g}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def ready_ids(fleet: Fleet) -> list[str]:
    return [s.id for s in fleet.ready(MODEL)]


def pids_by_id(status: ActuatorStatus) -> dict[str, int]:
    return {r.id: r.pid for r in status.replicas if r.pid is not None}


def gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(pid) for pid in pids)


def actuator(fleet: Fleet, log_dir: Path, **options: str) -> LocalActuator:
    launcher = AdapterLauncher(
        SimAdapter(), MODEL, {"profile": "a10g", "cold_start_s": "0", **options}
    )
    settings = LocalActuatorSettings(
        model=MODEL, log_dir=log_dir, drain_grace_s=15.0, stop_grace_s=5.0
    )
    return LocalActuator(fleet, launcher, RealClock(), settings)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def complete(session: aiohttp.ClientSession, fleet: Fleet, rid: str) -> int:
    """One long request to replica `rid`, counted in the Fleet as the gateway would."""
    replica = fleet.get(rid)
    assert replica is not None
    body = {"model": MODEL, "prompt": "drain me", "max_tokens": LONG_TOKENS}
    fleet.begin(rid)
    try:
        async with session.post(replica.url + "/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            data = await response.json()
            tokens: int = data["usage"]["completion_tokens"]
            return tokens
    finally:
        fleet.end(rid)


@pytest.mark.timeout(120)
async def test_scale_up_drain_down_and_crash(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    fleet = Fleet()
    local = actuator(fleet, tmp_path)
    pids: list[int] = []
    try:
        await local.set_replicas(2)
        assert await local.current() == 2  # starting ones count at once
        assert fleet.count_by_state(MODEL)[ReplicaState.STARTING] == 2
        assert sorted(r.name for r in fleet.replicas(MODEL)) == ["replica-0", "replica-1"]
        await eventually(lambda: len(ready_ids(fleet)) == 2, "two replicas ready")
        status = await local.describe()
        pids = list(pids_by_id(status).values())
        assert len(status.cold_starts_s) == 2
        assert all(0 < c < WAIT_S for c in status.cold_starts_s)

        # One long request on each replica, then down to 1: the drained one's request finishes.
        first, second = ready_ids(fleet)
        requests = {
            rid: asyncio.create_task(complete(session, fleet, rid)) for rid in (first, second)
        }
        await eventually(lambda: all(r.in_flight == 1 for r in fleet.replicas(MODEL)), "both busy")
        started = time.monotonic()
        await local.set_replicas(1)
        assert time.monotonic() - started < 1.0  # the drain runs as a task
        assert await local.current() == 1
        draining = [r.id for r in fleet.replicas(MODEL) if r.state is ReplicaState.DRAINING]
        assert len(draining) == 1
        victim = draining[0]
        assert ready_ids(fleet) == [next(r for r in (first, second) if r != victim)]
        assert await requests[victim] == LONG_TOKENS  # cut by nothing
        victim_pid = pids_by_id(status)[victim]
        await eventually(lambda: fleet.get(victim) is None, "the drained replica left the fleet")
        await eventually(lambda: gone([victim_pid]), "the drained replica's process exited")
        assert await requests[ready_ids(fleet)[0]] == LONG_TOKENS

        await local.set_replicas(0)
        await eventually(lambda: len(fleet) == 0, "the last replica drained (idle: at once)")
        await eventually(lambda: gone(pids), "both processes gone")
        assert await local.current() == 0

        # A crash: the replica leaves the Fleet and current() drops, so the policy replaces it.
        await local.set_replicas(1)
        await eventually(lambda: len(ready_ids(fleet)) == 1, "a replica ready again")
        crashed = (await local.describe()).replicas[0]
        assert crashed.pid is not None
        pids.append(crashed.pid)
        os.killpg(crashed.pid, signal.SIGKILL)
        await eventually(lambda: len(fleet) == 0, "the crash noticed by the watcher")
        assert await local.current() == 0
        exits = (await local.describe()).exits
        assert [(e.id, e.while_starting, e.reason) for e in exits] == [
            (crashed.id, False, "exited with code -9")
        ]
        await local.set_replicas(1)  # replaced
        await eventually(lambda: len(ready_ids(fleet)) == 1, "the replacement ready")
        pids.extend(r.pid for r in (await local.describe()).replicas if r.pid is not None)
    finally:
        await local.close()
    assert len(fleet) == 0
    assert gone(pids), [p for p in pids if psutil.pid_exists(p)]


@pytest.mark.timeout(60)
async def test_an_engine_that_exits_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    fleet = Fleet()
    local = actuator(fleet, tmp_path, profile="no-such-profile")
    try:
        await local.set_replicas(1)
        await eventually(lambda: len(fleet) == 0, "the failed replica left the fleet")
        status = await local.describe()
        assert status.current == 0
        assert status.desired == 1
        assert len(status.exits) == 1
        assert status.exits[0].while_starting
        assert status.exits[0].reason.startswith("exited with code")
        assert "no-such-profile" in status.exits[0].log_tail
    finally:
        await local.close()


@pytest.mark.timeout(120)
async def test_close_stops_starting_and_draining_replicas(tmp_path: Path) -> None:
    fleet = Fleet()
    local = actuator(fleet, tmp_path, cold_start_s="30")  # never ready within the test
    await local.set_replicas(2)
    status = await local.describe()
    pids = [r.pid for r in status.replicas if r.pid is not None]
    assert len(pids) == 2
    await local.set_replicas(1)  # a starting victim: stopped at once (nothing in flight)
    await local.close()
    assert len(fleet) == 0
    assert gone(pids)


@pytest.mark.timeout(60)
async def test_cold_start_includes_the_engines_own(tmp_path: Path) -> None:
    fleet = Fleet()
    local = actuator(fleet, tmp_path, cold_start_s="1")
    try:
        await local.set_replicas(1)
        await eventually(lambda: len(ready_ids(fleet)) == 1, "ready after its cold start")
        (cold_start_s,) = (await local.describe()).cold_starts_s
        assert cold_start_s >= 1.0
    finally:
        await local.close()


class Sleeper:
    """A launcher of a process that never serves: it sleeps, or is no program at all."""

    health_path = "/health"

    def __init__(self, program: str = sys.executable) -> None:
        self.program = program

    def command(self, host: str, port: int) -> list[str]:
        return [self.program, "-c", "import time; time.sleep(60)"]


@pytest.mark.timeout(60)
async def test_a_replica_not_ready_in_time_is_stopped_and_reported(tmp_path: Path) -> None:
    fleet = Fleet()
    settings = LocalActuatorSettings(model=MODEL, log_dir=tmp_path, ready_timeout_s=0.5)
    local = LocalActuator(fleet, Sleeper(), RealClock(), settings)
    try:
        await local.set_replicas(1)
        (pid,) = pids_by_id(await local.describe()).values()
        await eventually(lambda: len(fleet) == 0, "the replica given up on")
        assert gone([pid])
        (exit_,) = (await local.describe()).exits
        assert (exit_.while_starting, exit_.reason) == (True, "not ready after 0.5s")
        assert await local.current() == 0
    finally:
        await local.close()


async def test_a_launcher_that_cannot_start_raises_actuator_error(tmp_path: Path) -> None:
    fleet = Fleet()
    settings = LocalActuatorSettings(model=MODEL, log_dir=tmp_path)
    local = LocalActuator(fleet, Sleeper(str(tmp_path / "no-such-engine")), RealClock(), settings)
    try:
        with pytest.raises(ActuatorError, match=r"cannot start replica-0 of model sim-local"):
            await local.set_replicas(1)
        assert len(fleet) == 0
        assert await local.current() == 0
    finally:
        await local.close()


@pytest.mark.timeout(60)
async def test_replicas_beyond_free_memory_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = Fleet()
    local = actuator(fleet, tmp_path, profile="instant")
    try:
        await local.set_replicas(1)
        await eventually(lambda: len(ready_ids(fleet)) == 1, "one replica ready")
        monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=0))
        with pytest.raises(ActuatorError, match=r"started 0 of 2 more replicas .* not enough"):
            await local.set_replicas(3)
        assert await local.current() == 1
    finally:
        await local.close()
