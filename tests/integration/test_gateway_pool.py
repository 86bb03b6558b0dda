"""The gateway's upstream pool follows the Fleet: replicas that come (each on a new port, as
new processes or pods do) and go leave nothing behind in it. A real gateway on 127.0.0.1 and
real fake engines."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from fleetserve.config import FleetFile, GatewaySettings, ModelSpec
from fleetserve.fleet.replica import Replica
from fleetserve.testing.fake_engine import FakeEngine
from fleetserve.testing.gateway import running_gateway

pytestmark = pytest.mark.integration

MODEL = "m"
CHAT = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
REPLICAS = 30


async def test_replicas_added_and_removed_leave_no_pool_behind() -> None:
    fleet_file = FleetFile(models=[ModelSpec(name=MODEL, engine="vllm", picker="round_robin")])
    async with (
        running_gateway(fleet_file, GatewaySettings()) as gw,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
    ):
        pool = gw.app.proxy.upstream.http1
        keeper = await FakeEngine("keeper").__aenter__()  # one replica stays all along
        try:
            gw.fleet.add(Replica(id="keeper", url=keeper.url, model=MODEL))
            gw.fleet.probe_passed("keeper", 0.0)
            for i in range(REPLICAS):
                async with FakeEngine(f"e{i}") as engine:
                    rid = f"r{i}"
                    gw.fleet.add(Replica(id=rid, url=engine.url, model=MODEL))
                    gw.fleet.probe_passed(rid, 0.0)
                    for _ in range(4):  # round robin: both replicas get some
                        async with http.post(f"{gw.url}/v1/chat/completions", data=CHAT) as r:
                            assert r.status == 200
                    assert ("127.0.0.1", engine.port) in pool.origins()
                    gw.fleet.remove(rid)
                    assert ("127.0.0.1", engine.port) not in pool.origins()
            assert pool.origins() <= {("127.0.0.1", keeper.port)}
        finally:
            await keeper.stop()
