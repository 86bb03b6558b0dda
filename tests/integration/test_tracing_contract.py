"""The trace contract, end to end: `fleetserve gateway` as a process, configured only by the
standard OTEL_* variables as a Langfuse set-up would be (a base endpoint ending in
/api/public/otel, Basic auth of public:secret in OTEL_EXPORTER_OTLP_HEADERS), exporting to an
OTLP/HTTP receiver on 127.0.0.1 that decodes the protobuf with opentelemetry-proto and
refuses a wrong Authorization header.

Behind the gateway: a sim engine process (instant) for plain and streamed requests, a slower
sim engine process for a stream the client cancels, and, in this process, one fake engine that
answers 500 next to one that answers, for a failover.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from fleetserve.fleet.processes import free_port
from fleetserve.telemetry import semconv as sc
from fleetserve.testing.fake_engine import fake_engines
from fleetserve.testing.otlp import OtlpReceiver, ReceivedSpan
from fleetserve.testing.stack import (
    FAST_HEALTH_ENV,
    Service,
    Services,
    fleetserve_argv,
    services,
    sim_engine_argv,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PUBLIC, SECRET = "pk-lf-contract", "sk-lf-contract"
BASIC = "Basic " + base64.b64encode(f"{PUBLIC}:{SECRET}".encode()).decode()
CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6}


def _fleet_file(path: Path, fast: str, slow: str, flaky: list[str]) -> Path:
    path.write_text(
        "models:\n"
        f"  - {{name: sim-model, engine: sim, replicas: [{fast}],\n"
        "      pricing: {input_per_mtok_usd: 1.0, output_per_mtok_usd: 4.0}}\n"
        f"  - {{name: slow-model, engine: sim, replicas: [{slow}]}}\n"
        f"  - {{name: flaky-model, engine: vllm, picker: round_robin,\n"
        f"      replicas: [{', '.join(flaky)}]}}\n"
    )
    return path


@contextlib.contextmanager
def _engines() -> Iterator[tuple[Services, Service, Service]]:
    with services() as started:
        fast_port, slow_port = free_port(), free_port()
        fast = started.start(
            "sim-fast", sim_engine_argv(fast_port, "sim-model", "instant", ["--cold-start-s", "0"]),
            fast_port,
        )  # fmt: skip
        slow = started.start(
            "sim-slow", sim_engine_argv(slow_port, "slow-model", "a10g", ["--cold-start-s", "0"]),
            slow_port,
        )  # fmt: skip
        fast.wait_ok("/health")
        slow.wait_ok("/health")
        yield started, fast, slow


def _by_trace(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    out: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        out.setdefault(span.trace_id, []).append(span)
    return out


def _tree(spans: list[ReceivedSpan]) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    (server,) = [s for s in spans if s.is_server]
    children = sorted((s for s in spans if s.is_client), key=lambda s: s.start_ns)
    assert all(c.parent_span_id == server.span_id for c in children)
    assert len(children) == len(spans) - 1
    return server, children


async def test_spans_reach_an_otlp_receiver_with_the_genai_and_langfuse_attributes(
    tmp_path: Path,
) -> None:
    receiver = OtlpReceiver(authorization=BASIC, path_prefix="/api/public/otel")
    with _engines() as (started, fast, slow):
        async with receiver, fake_engines(2) as fakes:
            fakes[0].state.fault = "status"
            fleet = _fleet_file(tmp_path / "fleet.yaml", fast.url, slow.url,
                                [f.url for f in fakes])  # fmt: skip
            port = free_port()
            env = {
                **FAST_HEALTH_ENV,
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=" + urllib.parse.quote(BASIC),
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "1.0",
                "OTEL_SERVICE_NAME": "fleetserve-contract",
                "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: export soon after each span
            }
            argv = fleetserve_argv("gateway", "--port", str(port), "--fleet-file", str(fleet))
            gateway = started.start("gateway", argv, port, env)
            gateway.wait_ok("/ready")
            await _all_ready(gateway.url, 4)
            ids = await _drive(gateway.url)
            spans = await receiver.wait_for_spans(11, timeout_s=20)
    assert receiver.refused == 0
    traces = _by_trace(spans)
    by_request = {
        str(s.attributes[sc.FLEETSERVE_REQUEST_ID]): traces[s.trace_id]
        for s in spans
        if s.is_server
    }
    assert {s.resource.get("service.name") for s in spans} == {"fleetserve-contract"}

    plain, (attempt,) = _tree(by_request[ids["plain"]])
    a = plain.attributes
    assert plain.name == "chat sim-model"
    assert a[sc.GEN_AI_OPERATION_NAME] == "chat"
    assert a[sc.GEN_AI_PROVIDER_NAME] == "fleetserve.sim"
    assert (a[sc.GEN_AI_REQUEST_MODEL], a[sc.GEN_AI_REQUEST_MAX_TOKENS]) == ("sim-model", 6)
    assert a[sc.GEN_AI_REQUEST_STREAM] is False
    assert a[sc.LANGFUSE_OBSERVATION_TYPE] == "generation"
    inp, out = a[sc.GEN_AI_USAGE_INPUT_TOKENS], a[sc.GEN_AI_USAGE_OUTPUT_TOKENS]
    assert isinstance(inp, int)
    assert inp > 0
    assert out == 6
    assert a[sc.GEN_AI_USAGE_COST] == pytest.approx((inp * 1.0 + 6 * 4.0) / 1e6)
    assert a[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",)
    assert a[sc.FLEETSERVE_REPLICA_ID] == f"127.0.0.1:{fast.port}"
    assert sc.ERROR_TYPE not in a
    assert (attempt.attributes[sc.SERVER_ADDRESS], attempt.attributes[sc.SERVER_PORT]) == (
        "127.0.0.1", fast.port,
    )  # fmt: skip
    assert attempt.start_ns >= plain.start_ns
    assert attempt.end_ns <= plain.end_ns

    streamed, (attempt,) = _tree(by_request[ids["stream"]])
    a = streamed.attributes
    assert a[sc.GEN_AI_REQUEST_STREAM] is True
    assert a[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 6  # read from the stream the gateway asked it for
    ttft = a[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK]
    assert isinstance(ttft, float)
    assert ttft > 0
    assert str(a[sc.LANGFUSE_COMPLETION_START_TIME]).endswith("Z")

    # At least one of the two starts at the 500; both can, depending on where round robin
    # stands (this failed 3 runs in 6 at 4d3ad01 when exactly one was required).
    failovers = [by_request[r] for r in ("f0", "f1") if len(by_request[r]) == 3]
    assert failovers, [len(by_request[r]) for r in ("f0", "f1")]
    failover = failovers[0]
    failed_over, (first, second) = _tree(failover)
    assert first.attributes[sc.SERVER_PORT] == fakes[0].port
    assert first.attributes[sc.ERROR_TYPE] == "status_5xx"
    assert first.status_code == 2  # ERROR
    assert second.attributes[sc.SERVER_PORT] == fakes[1].port
    assert sc.ERROR_TYPE not in second.attributes
    assert sc.ERROR_TYPE not in failed_over.attributes
    assert f"00-{first.trace_id}-{first.span_id}-01" in fakes[0].state.traceparents
    assert f"00-{second.trace_id}-{second.span_id}-01" in fakes[1].state.traceparents

    cancelled, (attempt,) = _tree(by_request[ids["cancel"]])
    assert cancelled.attributes[sc.ERROR_TYPE] == "cancelled"
    assert cancelled.status_code == 2
    assert attempt.attributes[sc.ERROR_TYPE] == "cancelled"


async def _all_ready(url: str, replicas: int, timeout_s: float = 15.0) -> None:
    """Until the gateway has `replicas` ready (its health probes of the fakes, which answer
    from this event loop, so the wait must not block it)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
        while True:
            async with http.get(url + "/admin/fleet") as r:
                if (await r.json())["ready"] == replicas:
                    return
            await asyncio.sleep(0.1)


async def _drive(url: str) -> dict[str, str]:
    """Plain, streamed, two on the flaky model (f0, f1) and a cancelled stream; the request
    id of each (x-request-id)."""
    ids: dict[str, str] = {}
    timeout = aiohttp.ClientTimeout(total=30)
    chat = url + "/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(chat, json={"model": "sim-model", **CHAT}) as r:
            assert r.status == 200
            await r.read()
            ids["plain"] = r.headers["x-request-id"]
        async with http.post(chat, json={"model": "sim-model", "stream": True, **CHAT}) as r:
            body = await r.read()
            assert r.status == 200
            assert b'"usage":{' not in body  # the client did not ask for it
            ids["stream"] = r.headers["x-request-id"]
        for i in range(2):  # round robin over [500, ok]: one of the two starts at the 500
            async with http.post(
                chat, json={"model": "flaky-model", **CHAT}, headers={"X-Request-ID": f"f{i}"}
            ) as r:
                assert r.status == 200
                await r.read()
        long = {**CHAT, "max_tokens": 200, "stream": True}
        async with http.post(chat, json={"model": "slow-model", **long}) as r:
            assert r.status == 200
            await r.content.readany()  # the first bytes, then the client goes away
            ids["cancel"] = r.headers["x-request-id"]
    return ids


async def test_a_wrong_key_pair_is_refused_by_the_receiver_and_nothing_is_taken(
    tmp_path: Path,
) -> None:
    wrong = "Basic " + base64.b64encode(f"{PUBLIC}:not-the-secret".encode()).decode()
    receiver = OtlpReceiver(authorization=BASIC, path_prefix="/api/public/otel")
    with _engines() as (started, fast, _slow):
        async with receiver:
            port = free_port()
            env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=" + urllib.parse.quote(wrong),
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            }
            argv = fleetserve_argv("gateway", "--port", str(port), "--model", "sim-model",
                                   "--engine", "sim", "--upstream", fast.url)  # fmt: skip
            gateway = started.start("gateway", argv, port, env)
            gateway.wait_ok("/ready")
            async with aiohttp.ClientSession() as http:
                chat = gateway.url + "/v1/chat/completions"
                async with http.post(chat, json={"model": "sim-model", **CHAT}) as r:
                    assert r.status == 200  # a tracing failure is not the client's
            async with asyncio.timeout(15):
                while not receiver.refused:  # noqa: ASYNC110 - set by the receiver's handler
                    await asyncio.sleep(0.05)
    assert receiver.spans == []
