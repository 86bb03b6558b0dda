"""The fleet timeline: reading fleet state (pure) and the sampler against a scripted server.

The server is a tiny aiohttp app on 127.0.0.1 whose answers each test scripts per path. The
sampler runs on a FakeClock: a test waits (in real time, bounded) until a poll is done, then
moves virtual time to the next tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fleetserve.bench.fleet_state import (
    FleetState,
    read_admin_autoscaler,
    read_admin_fleet,
    read_prometheus,
)
from fleetserve.bench.records import FleetSample
from fleetserve.bench.timeline import FleetSampler, SamplerSettings
from fleetserve.fleet.processes import free_port
from fleetserve.testing.clock import FakeClock

FIXTURES = Path(__file__).parent.parent / "fixtures"
ADMIN_KEY = "sk-admin-test"
WAIT_S = 5.0  # real-time bound on every wait for the sampler

GATEWAY_METRICS = """\
# HELP fleetserve_replicas Replicas by model and state.
# TYPE fleetserve_replicas gauge
fleetserve_replicas{model="a",state="ready"} 2.0
fleetserve_replicas{model="a",state="starting"} 1.0
fleetserve_replicas{model="a",state="draining"} 0.0
fleetserve_replicas{model="b",state="ready"} 1.0
fleetserve_replicas{model="b",state="draining"} 1.0
# HELP fleetserve_desired_replicas Replicas the autoscaler wants, by model.
# TYPE fleetserve_desired_replicas gauge
fleetserve_desired_replicas{model="a"} 4.0
fleetserve_desired_replicas{model="b"} 1.0
# HELP fleetserve_in_flight Requests being proxied now.
# TYPE fleetserve_in_flight gauge
fleetserve_in_flight{model="a"} 17.0
fleetserve_in_flight{model="b"} 3.0
# HELP fleetserve_held_requests Requests held now.
# TYPE fleetserve_held_requests gauge
fleetserve_held_requests{model="a"} 5.0
"""


def fleet_json(
    *, ready: int = 2, starting: int = 1, draining: int = 0, **extra: Any
) -> dict[str, Any]:
    replicas = [
        {"id": "r1", "state": "ready", "in_flight": 4, "running": 4, "waiting": 2},
        {"id": "r2", "state": "ready", "in_flight": 3, "running": 3, "waiting": None},
        {"id": "r3", "state": "starting", "in_flight": 0, "running": None, "waiting": None},
    ]
    by_state = {"starting": starting, "ready": ready, "draining": draining, "unhealthy": 0}
    return {"replicas": replicas, "by_state": by_state, "ready": ready, **extra}


# --- reading state (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param(fleet_json(), FleetState(2, None, 1, 0, 7, 2), id="no-held-yet"),
        pytest.param(
            fleet_json(held={"a": 3, "b": 1}), FleetState(2, None, 1, 0, 7, 6), id="held-per-model"
        ),
        pytest.param(fleet_json(held=5), FleetState(2, None, 1, 0, 7, 7), id="held-total"),
        pytest.param(
            fleet_json(models=[{"name": "a", "held": 4}, {"name": "b"}]),
            FleetState(2, None, 1, 0, 7, 6),
            id="held-in-model-list",
        ),
        pytest.param(
            fleet_json(models={"a": {"held": 1}}),
            FleetState(2, None, 1, 0, 7, 3),
            id="held-in-model-map",
        ),
        pytest.param(
            {"replicas": [], "by_state": {"ready": 0, "starting": 0, "draining": 0}, "ready": 0},
            FleetState(0, None, 0, 0, 0, None),
            id="empty-fleet-is-known-zero-but-queue-unknown",
        ),
        pytest.param(
            {"by_state": {"ready": 3}},
            FleetState(3, None, None, None, None, None),
            id="only-by-state",
        ),
        pytest.param(
            {"ready": True, "replicas": "many", "by_state": [1]},
            FleetState(),
            id="wrong-types-are-unknown",
        ),
        pytest.param(["not", "a", "fleet"], FleetState(), id="not-a-mapping"),
    ],
)
def test_read_admin_fleet(answer: object, expected: FleetState) -> None:
    assert read_admin_fleet(answer) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param({"desired": 3}, 3, id="top-level"),
        pytest.param({"desired_replicas": 2}, 2, id="top-level-long-name"),
        pytest.param(
            {"timeline": [{"at": 1, "desired": 1}, {"at": 2, "desired": 4}, {"at": 3}]},
            4,
            id="timeline-latest-with-desired",
        ),
        pytest.param(
            {"models": {"a": {"timeline": [{"desired": 2}]}, "b": {"desired": 1}}},
            3,
            id="models-map-summed",
        ),
        pytest.param({"models": [{"desired": 2}, {"timeline": []}]}, 2, id="models-list"),
        pytest.param({"timeline": []}, None, id="no-decision-yet"),
        pytest.param({"desired": True}, None, id="bool-is-not-a-count"),
        pytest.param({"desired": -1}, None, id="negative-is-not-a-count"),
        pytest.param("autoscaler", None, id="not-a-mapping"),
    ],
)
def test_read_admin_autoscaler(answer: object, expected: int | None) -> None:
    assert read_admin_autoscaler(answer) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            (FIXTURES / "vllm_metrics.txt").read_text(),
            FleetState(replicas_ready=1, in_flight=12, queue_depth=3),
            id="vllm-summed-over-engines",
        ),
        pytest.param(
            (FIXTURES / "llamacpp_metrics.txt").read_text(),
            FleetState(replicas_ready=1, in_flight=6, queue_depth=3),
            id="llamacpp",
        ),
        pytest.param(
            GATEWAY_METRICS,
            FleetState(
                replicas_ready=3,
                replicas_desired=5,
                replicas_starting=1,
                replicas_draining=1,
                in_flight=20,
                queue_depth=None,
            ),
            id="fleetserve-gateway-queue-unknown",
        ),
        pytest.param(
            '# TYPE fleetserve_replicas gauge\nfleetserve_replicas{model="a",state="ready"} 1\n',
            FleetState(replicas_ready=1, replicas_starting=0, replicas_draining=0),
            id="gateway-without-autoscaler-or-in-flight",
        ),
        pytest.param(
            "vllm:num_requests_waiting 2\n",
            FleetState(1, None, None, None, None, 2),
            id="running-missing-is-unknown",
        ),
        pytest.param("<html>hello</html>\n", FleetState(), id="not-metrics"),
        pytest.param("process_cpu_seconds_total 3.5\n", FleetState(), id="no-known-gauges"),
    ],
)
def test_read_prometheus(text: str, expected: FleetState) -> None:
    assert read_prometheus(text) == expected


def test_read_prometheus_rejects_a_broken_known_line() -> None:
    with pytest.raises(ValueError, match="convert"):
        read_prometheus('vllm:num_requests_running{engine="0" 3\n')


# --- the sampler against a scripted server --------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | dict[str, Any] = b""
    delay_s: float = 0.0


@dataclass
class Script:
    """Per path, the answers to give in order; the last one repeats. Unscripted paths 404."""

    replies: dict[str, list[Reply]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    auth: list[str | None] = field(default_factory=list)
    require_key: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def set(self, path: str, *replies: Reply) -> None:
        self.replies[path] = list(replies)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        n = self.calls[path] = self.calls.get(path, 0) + 1
        given = request.headers.get("Authorization")
        if path.startswith("/admin"):
            self.auth.append(given)
            if self.require_key and given != f"Bearer {ADMIN_KEY}":
                return web.json_response({"error": {"message": "admin key"}}, status=401)
        replies = self.replies.get(path)
        if not replies:
            return web.json_response({"error": {"message": "no route"}}, status=404)
        reply = replies[min(n, len(replies)) - 1]
        if reply.delay_s < 0:  # hold until the test releases it
            await self.release.wait()
        elif reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        body = reply.body
        if isinstance(body, dict):
            return web.json_response(body, status=reply.status)
        return web.Response(body=body, status=reply.status)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Script, str]]:
    script = Script()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", script.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield script, f"http://127.0.0.1:{port}"
    finally:
        script.release.set()
        await runner.cleanup()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait in real time, bounded, for something the sampler's real HTTP requests cause."""
    async with asyncio.timeout(WAIT_S):
        while not condition():  # noqa: ASYNC110 - the condition is the sampler's state
            await asyncio.sleep(0.005)
    assert condition(), what


async def sample_ticks(sampler: FleetSampler, clock: FakeClock, ticks: int) -> list[FleetSample]:
    """Let the sampler make `ticks` polls, one per interval of virtual time, then stop it."""
    sampler.start()
    try:
        for n in range(1, ticks + 1):
            await until(lambda n=n: sampler.polls >= n, f"poll {n}")  # type: ignore[misc]
            if n < ticks:
                await clock.advance(sampler.settings.interval_s)
    finally:
        samples = await sampler.stop()
    return samples


def sampler_for(url: str, clock: FakeClock, **settings: Any) -> FleetSampler:
    settings.setdefault("timeout_s", 1.0)
    return FleetSampler(url, clock, run_start_s=clock.now(), settings=SamplerSettings(**settings))


async def test_fleetserve_gateway_with_an_autoscaler(server: tuple[Script, str]) -> None:
    script, url = server
    script.require_key = True
    script.set("/admin/fleet", Reply(body=fleet_json()), Reply(body=fleet_json(ready=3,
               starting=0, held={"a": 2})))  # fmt: skip
    script.set(
        "/admin/autoscaler",
        Reply(body={"timeline": [{"desired": 3}]}),
        Reply(body={"timeline": [{"desired": 3}, {"desired": 5}]}),
    )
    clock = FakeClock(start=100.0)
    sampler = sampler_for(url, clock, admin_key=ADMIN_KEY)
    samples = await sample_ticks(sampler, clock, 3)
    assert samples == [
        FleetSample(0.0, replicas_ready=2, replicas_desired=3, replicas_starting=1,
                    replicas_draining=0, in_flight=7, queue_depth=2),
        FleetSample(1.0, replicas_ready=3, replicas_desired=5, replicas_starting=0,
                    replicas_draining=0, in_flight=7, queue_depth=4),
        FleetSample(2.0, replicas_ready=3, replicas_desired=5, replicas_starting=0,
                    replicas_draining=0, in_flight=7, queue_depth=4),
    ]  # fmt: skip
    assert sampler.source == "fleetserve"
    assert set(script.auth) == {f"Bearer {ADMIN_KEY}"}
    assert (sampler.failures, script.calls.get("/metrics")) == (0, None)


async def test_no_autoscaler_means_desired_unknown_and_is_asked_once(
    server: tuple[Script, str],
) -> None:
    script, url = server
    script.set("/admin/fleet", Reply(body=fleet_json()))
    clock = FakeClock()
    samples = await sample_ticks(sampler_for(url, clock, source="fleetserve"), clock, 3)
    assert [s.replicas_desired for s in samples] == [None, None, None]
    assert [s.replicas_ready for s in samples] == [2, 2, 2]
    assert script.calls == {"/admin/fleet": 3, "/admin/autoscaler": 1}
    assert script.auth == [None] * 4  # no key given, none sent


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        pytest.param(
            (FIXTURES / "vllm_metrics.txt").read_text(),
            FleetSample(0.0, replicas_ready=1, in_flight=12, queue_depth=3),
            id="vllm",
        ),
        pytest.param(
            (FIXTURES / "llamacpp_metrics.txt").read_text(),
            FleetSample(0.0, replicas_ready=1, in_flight=6, queue_depth=3),
            id="llamacpp",
        ),
    ],
)
async def test_auto_reads_an_engines_metrics(
    server: tuple[Script, str], metrics: str, expected: FleetSample
) -> None:
    script, url = server  # no /admin/fleet: 404
    script.set("/metrics", Reply(body=metrics))
    clock = FakeClock()
    sampler = sampler_for(url, clock)
    samples = await sample_ticks(sampler, clock, 2)
    assert samples == [expected, FleetSample(1.0, 1, None, None, None,
                                             expected.in_flight, expected.queue_depth)]  # fmt: skip
    assert sampler.source == "prometheus"
    assert script.calls["/admin/fleet"] == 1  # decided at the first answer, not asked again


async def test_auto_without_the_admin_key_falls_back_to_the_gateways_metrics(
    server: tuple[Script, str],
) -> None:
    script, url = server
    script.require_key = True
    script.set("/admin/fleet", Reply(body=fleet_json()))
    script.set("/metrics", Reply(body=GATEWAY_METRICS))
    clock = FakeClock()
    sampler = sampler_for(url, clock)
    [sample] = await sample_ticks(sampler, clock, 1)
    assert sample == FleetSample(0.0, 3, 5, 1, 1, 20, None)
    assert sampler.source == "prometheus"


@pytest.mark.parametrize(
    "replies",
    [
        pytest.param([Reply(500, "boom")], id="http-500"),
        pytest.param([Reply(200, "{not json")], id="not-json"),
        pytest.param([Reply(200, {"hello": "world"})], id="unknown-json"),
        pytest.param([Reply(200, fleet_json(), delay_s=1.0)], id="timeout"),
    ],
)
async def test_a_failed_poll_leaves_a_gap_and_sampling_goes_on(
    server: tuple[Script, str], replies: list[Reply], caplog: pytest.LogCaptureFixture
) -> None:
    script, url = server
    script.set("/admin/fleet", *replies, Reply(body=fleet_json()))
    clock = FakeClock()
    sampler = sampler_for(url, clock, source="fleetserve", timeout_s=0.3)
    with caplog.at_level(logging.WARNING, "fleetserve.bench.timeline"):
        samples = await sample_ticks(sampler, clock, 3)
    assert [s.t_s for s in samples] == [1.0, 2.0]
    assert sampler.failures == 1
    assert sampler.last_error is not None
    assert not caplog.records  # one failure is not an outage


async def test_an_outage_is_logged_once_then_recovery(
    server: tuple[Script, str], caplog: pytest.LogCaptureFixture
) -> None:
    script, url = server
    script.set("/metrics", *[Reply(503, "down")] * 6, Reply(body="vllm:num_requests_running 2\n"))
    clock = FakeClock()
    sampler = sampler_for(url, clock, source="prometheus", failures_before_warning=3)
    with caplog.at_level(logging.INFO, "fleetserve.bench.timeline"):
        samples = await sample_ticks(sampler, clock, 8)
    assert [(s.t_s, s.in_flight) for s in samples] == [(6.0, 2), (7.0, 2)]
    assert sampler.failures == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "3 polls" in warnings[0].getMessage()
    assert "503" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)


async def test_wrong_admin_key_is_a_failure_that_says_so(server: tuple[Script, str]) -> None:
    script, url = server
    script.require_key = True
    script.set("/admin/fleet", Reply(body=fleet_json()))
    clock = FakeClock()
    sampler = sampler_for(url, clock, source="fleetserve", admin_key="wrong")
    assert await sample_ticks(sampler, clock, 2) == []
    assert sampler.failures == 2
    assert "401" in (sampler.last_error or "")
    assert "wrong admin key" in (sampler.last_error or "")


async def test_nothing_listening_records_nothing_and_raises_nothing() -> None:
    clock = FakeClock()
    sampler = sampler_for(f"http://127.0.0.1:{free_port()}", clock)
    assert await sample_ticks(sampler, clock, 3) == []
    assert (sampler.failures, sampler.source) == (3, None)
    assert "neither a fleetserve admin API" in (sampler.last_error or "")


async def test_an_overrunning_poll_skips_the_ticks_it_missed(server: tuple[Script, str]) -> None:
    script, url = server
    script.set("/metrics", Reply(body="vllm:num_requests_running 1\n", delay_s=-1),
               Reply(body="vllm:num_requests_running 1\n"))  # fmt: skip
    clock = FakeClock()
    sampler = sampler_for(url, clock, source="prometheus", timeout_s=5.0)
    sampler.start()
    await until(lambda: script.calls.get("/metrics") == 1, "first poll sent")
    await clock.advance(2.5)  # the first poll is still waiting for its answer
    script.release.set()
    await until(lambda: sampler.polls == 1, "first poll done")
    await clock.advance(0.5)  # next tick: 3.0, not 1.0 or 2.0
    await until(lambda: sampler.polls == 2, "second poll done")
    samples = await sampler.stop()
    assert [s.t_s for s in samples] == [0.0, 3.0]


async def test_stop_abandons_a_poll_in_flight_promptly(server: tuple[Script, str]) -> None:
    script, url = server
    script.set("/admin/fleet", Reply(body=fleet_json(), delay_s=-1))  # never answers
    clock = FakeClock()
    sampler = sampler_for(url, clock, source="fleetserve", timeout_s=30.0)
    sampler.start()
    await until(lambda: script.calls.get("/admin/fleet") == 1, "poll sent")
    async with asyncio.timeout(1.0):
        assert await sampler.stop() == []
    assert await sampler.stop() == []  # twice is fine
    assert sampler.polls == 0


async def test_source_none_asks_nothing(server: tuple[Script, str]) -> None:
    script, url = server
    clock = FakeClock()
    async with sampler_for(url, clock, source="none") as sampler:
        await clock.advance(3.0)
        await asyncio.sleep(0.05)
    assert (sampler.samples, script.calls) == ([], {})


async def test_times_count_from_the_run_start(server: tuple[Script, str]) -> None:
    script, url = server
    script.set("/metrics", Reply(body="llamacpp:requests_processing 1\n"))
    clock = FakeClock(start=50.0)
    sampler = FleetSampler(url, clock, run_start_s=48.0, settings=SamplerSettings(
        source="prometheus", interval_s=0.5))  # fmt: skip
    samples = await sample_ticks(sampler, clock, 3)
    assert [s.t_s for s in samples] == [2.0, 2.5, 3.0]


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"source": "kubernetes"}, id="unknown-source"),
        pytest.param({"interval_s": 0}, id="zero-interval"),
        pytest.param({"timeout_s": -1}, id="negative-timeout"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SamplerSettings(**settings)
