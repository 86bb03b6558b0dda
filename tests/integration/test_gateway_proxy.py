"""The gateway against in-process fake engines with scripted faults (real sockets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from pydantic import SecretStr

from fleetserve.config import (
    FleetFile,
    GatewaySettings,
    HealthSettings,
    HoldSettings,
    ModelSpec,
    TimeoutSettings,
)
from fleetserve.routing.snapshot import ReplicaState
from fleetserve.testing.fake_engine import FakeEngine, fake_engines
from fleetserve.testing.gateway import RunningGateway, running_gateway, wait_until

pytestmark = pytest.mark.integration

MODEL = "m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
FAST_HEALTH = HealthSettings(
    interval_s=0.1, scrape_interval_s=0.2, eject_base_s=0.3, eject_max_s=1.0
)


def settings(**timeouts: float) -> GatewaySettings:
    return GatewaySettings(health=FAST_HEALTH, timeouts=TimeoutSettings(**timeouts))


def fleet_of(engines: list[FakeEngine], **spec: object) -> FleetFile:
    return FleetFile(
        models=[ModelSpec(name=MODEL, replicas=[e.url for e in engines], engine="vllm",
                          picker="round_robin", **spec)]
    )  # fmt: skip


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    gw: RunningGateway,
    body: object,
    path: str = "/v1/chat/completions",
) -> tuple[int, bytes, dict[str, str]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(
        gw.url + path, data=data, headers={"Content-Type": "application/json"}
    ) as r:
        return r.status, await r.read(), dict(r.headers)


async def test_non_stream_body_passes_through_unchanged(http: aiohttp.ClientSession) -> None:
    async with fake_engines(1) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        raw = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"x_vendor":{"a":[1,2]}}'
        status, body, _ = await post(http, gw, raw)
        assert status == 200
        assert engines[0].state.received == [raw]
        assert orjson.loads(body)["usage"]["completion_tokens"] == 8


async def test_stream_passes_chunks_unchanged(http: aiohttp.ClientSession) -> None:
    async with fake_engines(1) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        engines[0].state.chunk_delay_s = 0.01
        status, body, headers = await post(http, gw, {**CHAT, "stream": True})
        assert status == 200
        assert headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in body.split(b"\n\n") if e]
        assert len(events) == 9
        assert events[-1] == b"data: [DONE]"
        assert [orjson.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]] == [
            f"t{i} " for i in range(8)
        ]


async def test_5xx_fails_over_to_another_replica(http: aiohttp.ClientSession) -> None:
    async with fake_engines(2) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        engines[0].state.fault = "status"
        for _ in range(4):
            status, body, _ = await post(http, gw, CHAT)
            assert status == 200, body
        assert engines[1].state.completed == 4
        async with http.get(gw.url + "/metrics") as r:
            text = await r.text()
        assert 'fleetserve_retries_total{model="m",reason="status_5xx"}' in text


async def test_4xx_passes_through_without_retry(http: aiohttp.ClientSession) -> None:
    async with fake_engines(2) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        for engine in engines:
            engine.state.fault, engine.state.fault_status = "status", 400
        status, body, _ = await post(http, gw, CHAT)
        assert status == 400
        assert orjson.loads(body)["error"]["message"] == "fake 400"
        assert len(engines[0].state.received) + len(engines[1].state.received) == 1


async def test_all_replicas_5xx_answers_the_engines_error(http: aiohttp.ClientSession) -> None:
    async with fake_engines(2) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        for engine in engines:
            engine.state.fault, engine.state.fault_status = "status", 503
        status, body, _ = await post(http, gw, CHAT)
        assert status == 503
        assert orjson.loads(body)["error"]["message"] == "fake 503"


async def test_dead_replica_is_retried_then_ejected_then_probed_back(
    http: aiohttp.ClientSession,
) -> None:
    async with fake_engines(2) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        dead = engines[0]
        await dead.stop()
        for _ in range(6):
            status, _, _ = await post(http, gw, CHAT)
            assert status == 200
        replica = gw.fleet.replicas(MODEL)[0]
        assert replica.state is ReplicaState.UNHEALTHY
        await dead.restart()
        await wait_until(lambda: replica.state is ReplicaState.READY)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
async def test_first_byte_budget_is_one_per_request(
    http: aiohttp.ClientSession, stream: bool
) -> None:
    """Every replica hangs: the request gets one first-byte budget across its 3 attempts (504
    after ~budget), not a budget per attempt (3 x budget, as non-stream requests had)."""
    budget_s = 0.5
    async with (
        fake_engines(3) as engines,
        running_gateway(fleet_of(engines), settings(first_byte_s=budget_s)) as gw,
    ):
        for engine in engines:
            engine.state.fault = "hang"
        started = time.monotonic()
        status, body, _ = await post(http, gw, {**CHAT, "stream": stream})
        waited_s = time.monotonic() - started
        assert status == 504
        assert orjson.loads(body)["error"]["code"] == "upstream_first_byte_timeout"
        assert budget_s <= waited_s < 2 * budget_s


async def test_first_byte_timeout_fails_over_within_the_budget(
    http: aiohttp.ClientSession,
) -> None:
    """A replica that hangs past the budget costs the request its budget: 504, not a retry
    with a fresh budget on the next replica."""
    async with (
        fake_engines(2) as engines,
        running_gateway(fleet_of(engines), settings(first_byte_s=0.3)) as gw,
    ):
        engines[0].state.fault = "hang"
        statuses = [(await post(http, gw, CHAT))[0] for _ in range(4)]
        assert sorted(statuses) == [200, 200, 504, 504]  # round robin: every other one hangs


async def _read_stream(http: aiohttp.ClientSession, gw: RunningGateway) -> list[bytes]:
    async with http.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status == 200
        body = await r.read()
    return [e for e in body.split(b"\n\n") if e]


@pytest.mark.parametrize("fault", ["die_mid_stream", "stall_mid_stream"])
async def test_mid_stream_failure_ends_with_error_event(
    http: aiohttp.ClientSession, fault: str
) -> None:
    async with (
        fake_engines(1) as engines,
        running_gateway(fleet_of(engines), settings(idle_s=0.3)) as gw,
    ):
        engines[0].state.fault = fault  # type: ignore[assignment]
        events = await _read_stream(http, gw)
        assert len(events) == 3  # two chunks, then the error event, no [DONE]
        error = orjson.loads(events[-1][6:])["error"]
        assert error["code"] == "upstream_stream_error"
        assert error["type"] == "server_error"


async def test_client_disconnect_cancels_upstream(http: aiohttp.ClientSession) -> None:
    async with fake_engines(1) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        engine = engines[0]
        engine.state.chunks, engine.state.chunk_delay_s = 100, 0.05  # a 5 s answer
        for stream in (True, False):
            before = engine.state.cancelled

            async def leave_early(stream: bool = stream) -> None:
                body = {**CHAT, "stream": stream}
                async with http.post(gw.url + "/v1/chat/completions", json=body) as r:
                    await r.read()

            with pytest.raises(TimeoutError):  # the client gives up mid-answer
                await asyncio.wait_for(leave_early(), 0.3)
            await wait_until(lambda b=before: engine.state.cancelled > b)  # type: ignore[misc]
            assert engine.state.active == 0
            assert engine.state.completed == 0


@pytest.mark.parametrize(
    ("body", "path", "status", "code"),
    [
        pytest.param(b"{not json", "/v1/chat/completions", 400, None, id="bad-json"),
        pytest.param({"model": MODEL}, "/v1/chat/completions", 400, None, id="no-messages"),
        pytest.param({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                      "max_tokens": -1}, "/v1/chat/completions", 400, None, id="bad-max-tokens"),
        pytest.param({"model": MODEL}, "/v1/completions", 400, None, id="no-prompt"),
        pytest.param({**CHAT, "model": "nope"}, "/v1/chat/completions", 404, "model_not_found",
                     id="unknown-model"),
        pytest.param({**CHAT, "pad": "x" * 5000}, "/v1/chat/completions", 413,
                     "payload_too_large", id="too-large"),
    ],
)  # fmt: skip
async def test_bad_requests_get_openai_errors(
    http: aiohttp.ClientSession, body: object, path: str, status: int, code: str | None
) -> None:
    small = settings().model_copy(update={"max_body_bytes": 4096})
    async with fake_engines(1) as engines, running_gateway(fleet_of(engines), small) as gw:
        got, raw, _ = await post(http, gw, body, path)
        assert got == status
        error = orjson.loads(raw)["error"]
        assert error["message"]
        assert error["type"]
        if code:
            assert error["code"] == code
        assert engines[0].state.received == []
        ok, _, _ = await post(http, gw, CHAT)  # and the gateway keeps serving
        assert ok == 200


async def test_itl_counts_gaps_between_content_events(http: aiohttp.ClientSession) -> None:
    """A role-only first chunk and comment lines between tokens are reads, not tokens: 8
    content events make 7 inter-token gaps however many reads carried them."""
    async with fake_engines(1) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        engine = engines[0]
        engine.state.chunks, engine.state.chunk_delay_s, engine.state.chatter = 8, 0.02, True
        status, body, _ = await post(http, gw, {**CHAT, "stream": True})
        assert status == 200
        assert body.count(b": keep-alive") == 8
        registry = gw.app.metrics.registry
        assert registry is not None
        count = registry.get_sample_value("fleetserve_itl_seconds_count", {"model": MODEL})
        total = registry.get_sample_value("fleetserve_itl_seconds_sum", {"model": MODEL})
        assert count == 7
        assert total is not None
        assert total >= 7 * 2 * 0.02 * 0.9  # each gap spans a comment's delay and a chunk's


async def test_latency_histograms_hold_served_requests_only(http: aiohttp.ClientSession) -> None:
    """Rejected requests (400, 404, 413) are counted by status, not timed: they used to add
    0 s samples to e2e and pull its quantiles down."""
    small = settings().model_copy(update={"max_body_bytes": 4096})
    async with fake_engines(1) as engines, running_gateway(fleet_of(engines), small) as gw:
        for body in (b"{not json", {**CHAT, "model": "nope"}, {**CHAT, "x": "y" * 5000}):
            status, _, _ = await post(http, gw, body)
            assert status in (400, 404, 413)
        assert (await post(http, gw, CHAT))[0] == 200
        registry = gw.app.metrics.registry
        assert registry is not None
        assert registry.get_sample_value("fleetserve_e2e_seconds_count", {"model": MODEL}) == 1
        rejected = {
            (model, code): registry.get_sample_value(
                "fleetserve_requests_total", {"model": model, "status": code}
            )
            for model, code in (("-", "400"), ("other", "404"), ("-", "413"))
        }
        # An unknown model is `other` (bounded labels); `-`: refused before naming a model.
        assert rejected == {("-", "400"): 1, ("other", "404"): 1, ("-", "413"): 1}


async def test_wrong_method_and_unknown_path(http: aiohttp.ClientSession) -> None:
    async with fake_engines(1) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        async with http.get(gw.url + "/v1/chat/completions") as r:
            assert r.status == 405
            assert (await r.json())["error"]["code"] == "method_not_allowed"
        async with http.get(gw.url + "/v1/nothing") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "not_found"


async def test_no_ready_replica_is_503_with_retry_after(http: aiohttp.ClientSession) -> None:
    async with fake_engines(1) as engines:
        engines[0].state.healthy = False
        async with running_gateway(fleet_of(engines), settings()) as gw:
            status, body, headers = await post(http, gw, CHAT)
            assert status == 503
            assert headers["Retry-After"] == "2"
            assert orjson.loads(body)["error"]["code"] == "no_replica_available"
            async with http.get(gw.url + "/ready") as r:
                assert r.status == 503


async def test_concurrency_cap_per_replica(http: aiohttp.ClientSession) -> None:
    # Past the cap a request waits at the gateway (test_gateway_capacity_queue.py); here the
    # wait bound (0.1 s) passes before the slow request (0.4 s) frees the slot.
    held_briefly = settings().model_copy(update={"hold": HoldSettings(timeout_s=0.1)})
    async with (
        fake_engines(1) as engines,
        running_gateway(fleet_of(engines, max_concurrency=1), held_briefly) as gw,
    ):
        engines[0].state.chunk_delay_s = 0.05
        slow = asyncio.create_task(post(http, gw, CHAT))
        await asyncio.sleep(0.1)
        status, body, headers = await post(http, gw, CHAT)
        assert status == 503
        assert orjson.loads(body)["error"]["code"] == "replicas_at_capacity"
        assert "Retry-After" in headers
        assert (await slow)[0] == 200


async def test_models_ready_and_metrics(http: aiohttp.ClientSession) -> None:
    async with fake_engines(2) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        await post(http, gw, CHAT)
        await post(http, gw, {**CHAT, "stream": True})
        async with http.get(gw.url + "/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == [MODEL]
        async with http.get(gw.url + "/ready") as r:
            assert r.status == 200
        async with http.get(gw.url + "/metrics") as r:
            text = await r.text()
        for line in (
            'fleetserve_requests_total{model="m",status="200"} 2.0',
            'fleetserve_replicas{model="m",state="ready"} 2.0',
            'fleetserve_ttft_seconds_count{model="m"} 1.0',
            'fleetserve_in_flight{model="m"} 0.0',
        ):
            assert line in text
        async with http.get(gw.url + "/admin/fleet") as r:
            fleet = await r.json()
        assert fleet["ready"] == 2


async def test_drain_stops_new_requests_but_lets_in_flight_finish(
    http: aiohttp.ClientSession,
) -> None:
    async with fake_engines(2) as engines, running_gateway(fleet_of(engines), settings()) as gw:
        for engine in engines:
            engine.state.chunk_delay_s = 0.05
        slow = asyncio.create_task(post(http, gw, CHAT))
        await wait_until(lambda: sum(e.state.active for e in engines) == 1)
        busy = next(e for e in engines if e.state.active)
        rid = next(r.id for r in gw.fleet.replicas(MODEL) if r.url == busy.url)
        async with http.post(f"{gw.url}/admin/replicas/{rid}/drain") as r:
            assert r.status == 200
            assert (await r.json())["state"] == "draining"
        for _ in range(4):
            status, _, headers = await post(http, gw, CHAT)
            assert status == 200
            assert headers["x-fleetserve-replica"] != rid
        assert (await slow)[0] == 200
        async with http.post(f"{gw.url}/admin/replicas/nope/drain") as r:
            assert r.status == 404


async def test_admin_key_guards_admin_routes(http: aiohttp.ClientSession) -> None:
    keyed = settings().model_copy(update={"admin_key": SecretStr("sk-admin")})
    async with fake_engines(1) as engines, running_gateway(fleet_of(engines), keyed) as gw:
        async with http.get(gw.url + "/admin/fleet") as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer sk-admin"}
        async with http.get(gw.url + "/admin/fleet", headers=auth) as r:
            assert r.status == 200
