"""`fleetserve gateway --workers 2`: one port, and /metrics sums over every worker."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from pathlib import Path

import aiohttp
import psutil
import pytest

from fleetserve.fleet.processes import free_port
from fleetserve.telemetry.metrics import METRICS_FLUSH_S
from fleetserve.testing.fake_engine import fake_engines
from fleetserve.testing.gateway import wait_until

pytestmark = pytest.mark.integration

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def _ready(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url + "/ready") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def test_two_workers_share_a_port_and_metrics_add_up(tmp_path: Path) -> None:
    async with fake_engines(2) as engines, aiohttp.ClientSession() as http:
        port = free_port()
        argv = [sys.executable, "-m", "fleetserve", "gateway", "--port", str(port),
                "--model", "m", "--workers", "2", "--engine", "vllm",
                *(arg for e in engines for arg in ("--upstream", e.url))]  # fmt: skip
        log = tmp_path / "gateway.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out)
        url = f"http://127.0.0.1:{port}"
        try:
            ok = False
            async with asyncio.timeout(20):
                while not ok:
                    assert proc.returncode is None, log.read_text()
                    ok = await _ready(http, url)
                    await asyncio.sleep(0.1)
            # Both workers need a ready view of the fleet before the count is exact.
            await asyncio.sleep(0.5)
            results = []
            for _ in range(4):
                results += await asyncio.gather(
                    *(http.post(url + "/v1/chat/completions", json=CHAT) for _ in range(10))
                )
            assert [r.status for r in results] == [200] * 40
            for r in results:
                r.release()
            # Scrapes land on either worker; each must see all 40 once the other worker has
            # flushed its figures (every METRICS_FLUSH_S: telemetry/batched.py).
            deadline = asyncio.get_running_loop().time() + 3 * METRICS_FLUSH_S + 2
            while True:
                totals = set()
                for _ in range(6):
                    async with http.get(url + "/metrics") as r:
                        text = await r.text()
                    match = re.search(
                        r'fleetserve_requests_total\{model="m",status="200"\} (\S+)', text
                    )
                    assert match, text[:2000]
                    totals.add(float(match.group(1)))
                if totals == {40.0} or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert totals == {40.0}
            served = {e.name: e.state.completed for e in engines}
            assert sum(served.values()) == 40
        finally:
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 20) == 0


async def _engine_load(http: aiohttp.ClientSession, url: str) -> int:
    """running + waiting, as the engine's own /metrics says."""
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
        assert match, text
        total += float(match.group(1))
    return int(total)


async def test_admin_views_of_two_workers_answer_for_the_whole_gateway(tmp_path: Path) -> None:
    streams_n = 16
    async with fake_engines(2) as engines, aiohttp.ClientSession() as http:
        for engine in engines:
            engine.state.chunks, engine.state.chunk_delay_s = 120, 0.05  # 6 s streams
        port = free_port()
        argv = [sys.executable, "-m", "fleetserve", "gateway", "--port", str(port),
                "--model", "m", "--workers", "2", "--engine", "vllm",
                *(arg for e in engines for arg in ("--upstream", e.url))]  # fmt: skip
        log = tmp_path / "gateway.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out)
        url = f"http://127.0.0.1:{port}"
        try:
            async with asyncio.timeout(20):
                while not await _ready(http, url):
                    assert proc.returncode is None, log.read_text()
                    await asyncio.sleep(0.1)
                while True:  # the second worker may still be importing: wait for its report
                    async with http.get(url + "/admin/fleet") as r:
                        if (await r.json())["workers"] == 2:
                            break
                    await asyncio.sleep(0.1)

            async def stream() -> int:
                # A connection each, so the kernel spreads them over both workers.
                async with (
                    aiohttp.ClientSession() as own,
                    own.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
                ):
                    await r.read()
                    return r.status

            tasks = [asyncio.create_task(stream()) for _ in range(streams_n)]
            await wait_until(lambda: sum(e.state.active for e in engines) == streams_n, 10)
            engines_say = sum([await _engine_load(http, e.url) for e in engines])
            assert engines_say == streams_n
            for _ in range(6):  # each call lands on either worker; each answers for both
                async with asyncio.timeout(5):
                    while True:
                        async with http.get(url + "/admin/load") as r:
                            load = (await r.json())["models"]["m"]
                        async with http.get(url + "/admin/fleet") as r:
                            fleet = await r.json()
                        in_flight = sum(rep["in_flight"] for rep in fleet["replicas"])
                        if load["in_flight"] == in_flight == engines_say:
                            break
                        await asyncio.sleep(0.05)
                assert fleet["workers"] == 2
                assert load["arrival_rps"] > 0
            assert await asyncio.gather(*tasks) == [200] * streams_n
        finally:
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_a_dead_worker_leaves_no_gauges_behind_and_is_replaced(tmp_path: Path) -> None:
    async with fake_engines(1) as engines, aiohttp.ClientSession() as http:
        engine = engines[0]
        engine.state.chunks, engine.state.chunk_delay_s = 400, 0.05  # 20 s streams
        port = free_port()
        argv = [sys.executable, "-m", "fleetserve", "gateway", "--port", str(port),
                "--model", "m", "--workers", "2", "--upstream", engine.url]  # fmt: skip
        log = tmp_path / "gateway.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out)
        url = f"http://127.0.0.1:{port}"

        def workers() -> list[psutil.Process]:
            found = []
            for child in psutil.Process(proc.pid).children():
                with contextlib.suppress(psutil.ZombieProcess):  # killed, not yet reaped
                    if "spawn_main" in " ".join(child.cmdline()):
                        found.append(child)
            return found

        async def in_flight_metric() -> float:
            async with http.get(url + "/metrics") as r:
                text = await r.text()
            match = re.search(r'^fleetserve_in_flight\{model="m"\} (\S+)$', text, re.MULTILINE)
            return float(match.group(1)) if match else 0.0

        try:
            async with asyncio.timeout(20):
                while not await _ready(http, url):
                    assert proc.returncode is None, log.read_text()
                    await asyncio.sleep(0.1)

            async def stream() -> None:
                async with (
                    aiohttp.ClientSession() as own,
                    own.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
                ):
                    with contextlib.suppress(aiohttp.ClientPayloadError):
                        await r.read()

            tasks = [asyncio.create_task(stream()) for _ in range(8)]
            await wait_until(lambda: engine.state.active == 8, 10)
            async with asyncio.timeout(10):  # both workers' gauges are in (flushed each second)
                while await in_flight_metric() != 8:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)

            # The worker holding the most client connections holds at least four of the
            # eight streams: the readiness probe's kept-alive connection is the only other.
            def clients(w: psutil.Process) -> int:
                return sum(
                    c.laddr.port == port for c in w.net_connections() if c.status == "ESTABLISHED"
                )

            victim = max(workers(), key=clients)
            victim.kill()
            await wait_until(lambda: engine.state.active < 8, 10)  # its streams were cut
            async with asyncio.timeout(10):  # the dead worker's gauge is gone from the sum
                while await in_flight_metric() != engine.state.active:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            assert engine.state.active < 8
            await wait_until(lambda: len(workers()) == 2, 10)  # and a new worker took its place
            assert victim.pid not in {w.pid for w in workers()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 30) == 0
