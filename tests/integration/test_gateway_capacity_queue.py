"""The gateway queues requests beyond a replica's `max_concurrency` instead of refusing them.

Real `fleetserve engine sim` processes (a10g profile: ~35 ms per decode step) behind a gateway
served in-process: the engine's own request log (`/sim/requests`) shows how many requests it
had at once, and a replica added while requests wait takes them as soon as it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from fleetserve.config import FleetFile, GatewaySettings, HealthSettings, ModelSpec
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.processes import free_port
from fleetserve.fleet.replica import Replica
from fleetserve.gateway.app import build_gateway
from fleetserve.gateway.asgi import GatewayApp
from fleetserve.gateway.serve import make_server
from fleetserve.testing.gateway import wait_until
from fleetserve.testing.processes import ManagedProcess

pytestmark = pytest.mark.integration

M = "sim-cap"
CAP = 2
READY_TIMEOUT_S = 20.0
FAST_HEALTH = HealthSettings(interval_s=0.2, scrape_interval_s=0.2)


def chat(max_tokens: int, *, stream: bool = False) -> dict[str, object]:
    return {"model": M, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": max_tokens, "stream": stream}  # fmt: skip


@contextlib.contextmanager
def sim_engines(n: int, log_dir: Path) -> Iterator[list[tuple[ManagedProcess, str]]]:
    with contextlib.ExitStack() as stack:
        engines = []
        for i in range(n):
            port = free_port()
            argv = [sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
                    "--model", M, "--profile", "a10g", "--cold-start-s", "0"]  # fmt: skip
            proc = stack.enter_context(ManagedProcess(argv, log_path=log_dir / f"sim{i}.log"))
            engines.append((proc, f"http://127.0.0.1:{port}"))
        yield engines


@contextlib.asynccontextmanager
async def serving(
    urls: list[str], fleet: Fleet | None = None
) -> AsyncIterator[tuple[GatewayApp, str]]:
    settings = GatewaySettings(port=free_port(), health=FAST_HEALTH, retry_after_s=3)
    spec = ModelSpec(name=M, replicas=urls, engine="sim", picker="least_outstanding",
                     max_concurrency=CAP)  # fmt: skip
    app = build_gateway(settings, FleetFile(models=[spec]), fleet=fleet)
    server = make_server(app, settings)
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started or task.done(), timeout_s=10.0)
        assert server.started, "the gateway did not start"
        yield app, f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def most_at_once(rows: list[dict[str, float]]) -> int:
    """The most requests the engine had between arrival and last write at any instant."""
    edges = sorted([(r["arrival_s"], 1) for r in rows] + [(r["last_write_s"], -1) for r in rows])
    peak = now = 0
    for _, step in edges:  # at a tie an end (-1) sorts first: touching intervals do not overlap
        now += step
        peak = max(peak, now)
    return peak


async def post(http: aiohttp.ClientSession, url: str, body: object) -> tuple[int, str, bytes]:
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, r.headers.get("x-fleetserve-replica", ""), await r.read()


async def test_six_requests_on_a_cap_of_two_all_succeed_two_at_a_time(tmp_path: Path) -> None:
    with sim_engines(1, tmp_path) as [(proc, engine_url)]:
        await proc.wait_http_ok(f"{engine_url}/health", READY_TIMEOUT_S)
        async with (
            serving([engine_url]) as (app, url),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
        ):
            # 48 tokens at ~35 ms a step: ~1.7 s a request, so all six are in before two end.
            bodies = [chat(48, stream=i % 2 == 1) for i in range(6)]
            tasks = [asyncio.create_task(post(http, url, b)) for b in bodies]
            await wait_until(lambda: app.holds.held(M) == 4, timeout_s=5.0)
            assert app.window.snapshot(M, app.clock.now()).held == 4  # the autoscaler sees it
            results = await asyncio.gather(*tasks)
            assert [status for status, _, _ in results] == [200] * 6, results
            for (_, _, body), sent in zip(results, bodies, strict=True):
                assert (b"[DONE]" in body) is sent["stream"]
            assert app.holds.held(M) == 0
            assert [r.in_flight for r in app.fleet.replicas(M)] == [0]
            # At least one of the three streams waited a round (~1.7 s) at the gateway: the
            # autoscaler's TTFT keeps that wait (more replicas shorten it), the engine's is ~0.2 s.
            ttft_p95_s = app.window.snapshot(M, app.clock.now()).ttft_p95_s
            assert ttft_p95_s is not None
            assert ttft_p95_s > 1.0
            async with http.get(engine_url + "/sim/requests") as r:
                rows = (await r.json())["requests"]
            async with http.get(url + "/metrics") as r:
                metrics = await r.text()
    assert len(rows) == 6
    assert most_at_once(rows) == CAP
    assert f'fleetserve_hold_seconds_count{{model="{M}"}} 4.0' in metrics
    assert f'fleetserve_requests_total{{model="{M}",status="200"}} 6.0' in metrics


async def test_a_replica_added_later_takes_queued_requests_at_once(tmp_path: Path) -> None:
    with sim_engines(2, tmp_path) as [(first, first_url), (second, second_url)]:
        await first.wait_http_ok(f"{first_url}/health", READY_TIMEOUT_S)
        await second.wait_http_ok(f"{second_url}/health", READY_TIMEOUT_S)
        fleet = Fleet()
        async with (
            serving([first_url], fleet) as (app, url),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
        ):
            # 100 tokens at ~35 ms a step: each request holds its slot for about 3.5 s.
            tasks = [asyncio.create_task(post(http, url, chat(100))) for _ in range(6)]
            await wait_until(lambda: app.holds.held(M) == 4, timeout_s=5.0)
            late = Replica(id="late", url=second_url, model=M, max_concurrency=CAP)
            fleet.add(late)  # starting: the gateway's monitor probes it every 0.25 s
            await wait_until(lambda: late.in_flight == CAP, timeout_s=3.0)
            assert app.holds.held(M) == 2
            assert not any(t.done() for t in tasks)  # the first replica's two still run
            results = await asyncio.gather(*tasks)
    assert [status for status, _, _ in results] == [200] * 6, results
    served_by = [replica for _, replica, _ in results]
    assert served_by.count("late") == CAP  # the two it took at once; the first served the rest
    assert len(set(served_by)) == 2
