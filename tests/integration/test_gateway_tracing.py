"""Traces and access lines of a real gateway (in this process, real sockets) in front of fake
engines, through the SDK's in-memory exporter: the span tree and its attributes, the
traceparent each replica receives, and the access line of each request."""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator, Mapping

import aiohttp
import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fleetserve.config import FleetFile, GatewaySettings, HealthSettings, ModelSpec, PriceSpec
from fleetserve.gateway.observe import Observer
from fleetserve.telemetry import semconv as sc
from fleetserve.telemetry.logs import AccessLog
from fleetserve.telemetry.tracing import Sampling, Tracing, traceparent
from fleetserve.tenancy.model import Price
from fleetserve.testing.fake_engine import FakeEngine, fake_engines
from fleetserve.testing.gateway import RunningGateway, running_gateway, wait_until

pytestmark = pytest.mark.integration

MODEL = "m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
PRICE = Price(input_per_mtok_usd=2.0, output_per_mtok_usd=10.0)


class Traced:
    def __init__(self, gw: RunningGateway, exporter: InMemorySpanExporter, log: io.BytesIO):
        self.gw = gw
        self.exporter = exporter
        self.log = log

    def spans(self) -> list[ReadableSpan]:
        assert self.gw.app.observer is not None
        tracing = self.gw.app.observer.tracing
        assert tracing is not None
        tracing.force_flush()
        return list(self.exporter.get_finished_spans())

    def lines(self) -> list[dict[str, object]]:
        assert self.gw.app.observer is not None
        assert self.gw.app.observer.access is not None
        self.gw.app.observer.access.flush()
        return [orjson.loads(line) for line in self.log.getvalue().splitlines()]


def attrs(span: ReadableSpan) -> Mapping[str, object]:
    return dict(span.attributes or {})


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


def fleet_of(engines: list[FakeEngine]) -> FleetFile:
    spec = ModelSpec(
        name=MODEL, replicas=[e.url for e in engines], engine="vllm", picker="round_robin",
        pricing=PriceSpec(input_per_mtok_usd=2.0, output_per_mtok_usd=10.0),
    )  # fmt: skip
    return FleetFile(models=[spec])


@contextlib.asynccontextmanager
async def traced(engines: list[FakeEngine], sampler: str = "always_on") -> AsyncIterator[Traced]:
    settings = GatewaySettings(health=HealthSettings(interval_s=0.1, scrape_interval_s=0.2))
    async with running_gateway(fleet_of(engines), settings) as gw:
        exporter = InMemorySpanExporter()
        log = io.BytesIO()
        tracing = Tracing.exporting_to(exporter, Sampling.named(sampler), "fleetserve-test")
        gw.app.observer = Observer(
            tracing, AccessLog("json", log), {MODEL: PRICE}, {MODEL: "vllm"}, gw.app.clock
        )
        try:
            yield Traced(gw, exporter, log)
        finally:
            tracing.shutdown()


def tree(spans: list[ReadableSpan]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    children = [s for s in spans if s.kind is SpanKind.CLIENT]
    for child in children:
        assert child.parent is not None
        assert child.parent.span_id == server.context.span_id
        assert child.context.trace_id == server.context.trace_id
    children.sort(key=lambda s: attrs(s)[sc.FLEETSERVE_ATTEMPT])  # type: ignore[arg-type,return-value]
    return server, children


async def test_a_plain_request_is_a_generation_with_usage_and_cost(
    http: aiohttp.ClientSession,
) -> None:
    async with fake_engines(1) as engines, traced(engines) as t:
        async with http.post(t.gw.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            request_id = r.headers["x-request-id"]
            await r.read()
        await wait_until(lambda: len(t.spans()) == 2)
        server, (attempt,) = tree(t.spans())
        a = attrs(server)
        assert server.name == "chat m"
        assert a[sc.GEN_AI_OPERATION_NAME] == "chat"
        assert a[sc.GEN_AI_PROVIDER_NAME] == "vllm"
        assert a[sc.GEN_AI_REQUEST_MODEL] == MODEL
        assert a[sc.GEN_AI_REQUEST_MAX_TOKENS] == 8
        assert a[sc.GEN_AI_REQUEST_STREAM] is False
        assert a[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",)
        assert (a[sc.GEN_AI_USAGE_INPUT_TOKENS], a[sc.GEN_AI_USAGE_OUTPUT_TOKENS]) == (3, 8)
        cost = (3 * 2.0 + 8 * 10.0) / 1e6
        assert a[sc.GEN_AI_USAGE_COST] == pytest.approx(cost)
        details = orjson.loads(str(a[sc.LANGFUSE_COST_DETAILS]))
        assert details["total"] == pytest.approx(cost)
        assert a[sc.LANGFUSE_OBSERVATION_TYPE] == "generation"
        assert a[sc.FLEETSERVE_REQUEST_ID] == request_id
        assert a[sc.FLEETSERVE_REPLICA_ID] == engines[0].url.removeprefix("http://")
        assert sc.ERROR_TYPE not in a
        assert server.resource.attributes["service.name"] == "fleetserve-test"
        b = attrs(attempt)
        assert attempt.name == "POST /v1/chat/completions"
        assert b[sc.SERVER_ADDRESS] == "127.0.0.1"
        assert b[sc.SERVER_PORT] == engines[0].port
        assert b[sc.LANGFUSE_OBSERVATION_TYPE] == "span"  # no second generation
        assert sc.GEN_AI_REQUEST_MODEL not in b
        assert b[sc.HTTP_RESPONSE_STATUS_CODE] == 200
        sent = engines[0].state.traceparents[-1]
        assert sent == traceparent(attempt.context.trace_id, attempt.context.span_id, True)
        (line,) = t.lines()
        assert line["request_id"] == request_id
        assert line["trace_id"] == f"{server.context.trace_id:032x}"
        assert (line["status"], line["input_tokens"], line["output_tokens"]) == (200, 3, 8)


async def test_a_stream_has_ttft_and_the_usage_it_asked_for(http: aiohttp.ClientSession) -> None:
    async with fake_engines(1) as engines:
        state = engines[0].state
        state.stream_usage, state.finish_reason, state.chunks = True, "stop", 4
        async with traced(engines) as t:
            async with http.post(
                t.gw.url + "/v1/chat/completions", json={**CHAT, "stream": True},
                headers={"X-Request-ID": "client-7"},
            ) as r:  # fmt: skip
                body = await r.read()
                assert r.headers["x-request-id"] == "client-7"
            assert b'"usage"' not in body  # asked for by the gateway, so stripped again
            assert orjson.loads(state.received[-1])["stream_options"] == {"include_usage": True}
            await wait_until(lambda: len(t.spans()) == 2)
            server, (_attempt,) = tree(t.spans())
            a = attrs(server)
            assert a[sc.GEN_AI_REQUEST_STREAM] is True
            assert (a[sc.GEN_AI_USAGE_INPUT_TOKENS], a[sc.GEN_AI_USAGE_OUTPUT_TOKENS]) == (3, 4)
            assert a[sc.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)
            ttft = a[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK]
            assert isinstance(ttft, float)
            assert 0 < ttft < (server.end_time - server.start_time) / 1e9  # type: ignore[operator]
            start = str(a[sc.LANGFUSE_COMPLETION_START_TIME])
            assert start.endswith("Z")
            assert start[:10].count("-") == 2  # ISO 8601
            (line,) = t.lines()
            assert line["request_id"] == "client-7"
            assert line["stream"] is True
            assert line["ttft_ms"] is not None
            assert line["bytes"] == len(body)


async def test_a_failover_is_two_attempts_under_one_request(http: aiohttp.ClientSession) -> None:
    async with fake_engines(2) as engines:
        engines[0].state.fault = "status"
        async with traced(engines) as t:
            for _ in range(2):  # round robin: one of two starts at the failing replica
                async with http.post(t.gw.url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status == 200
                    await r.read()
            await wait_until(lambda: len(t.spans()) >= 5)
            by_trace: dict[int, list[ReadableSpan]] = {}
            for span in t.spans():
                by_trace.setdefault(span.context.trace_id, []).append(span)
            failed_over = [spans for spans in by_trace.values() if len(spans) == 3]
            assert failed_over  # two attempts under one SERVER span
            server, (first, second) = tree(failed_over[0])
            assert attrs(first)[sc.ERROR_TYPE] == "status_5xx"
            assert attrs(first)[sc.HTTP_RESPONSE_STATUS_CODE] == 500
            assert attrs(first)[sc.SERVER_PORT] == engines[0].port
            assert first.status.status_code is StatusCode.ERROR
            assert attrs(second)[sc.SERVER_PORT] == engines[1].port
            assert sc.ERROR_TYPE not in attrs(second)
            assert sc.ERROR_TYPE not in attrs(server)
            assert attrs(server)[sc.FLEETSERVE_REPLICA_ID] == engines[1].url.removeprefix("http://")


async def test_a_cancelled_stream_ends_its_spans_as_cancelled(http: aiohttp.ClientSession) -> None:
    async with fake_engines(1) as engines:
        engines[0].state.chunks, engines[0].state.chunk_delay_s = 50, 0.05
        async with traced(engines) as t:
            async with http.post(
                t.gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}
            ) as r:
                await r.content.readany()  # the first chunk, then the client goes away
            await wait_until(lambda: len(t.spans()) == 2, timeout_s=10)
            server, (attempt,) = tree(t.spans())
            assert attrs(server)[sc.ERROR_TYPE] == "cancelled"
            assert server.status.status_code is StatusCode.ERROR
            assert attrs(attempt)[sc.ERROR_TYPE] == "cancelled"
            (line,) = t.lines()
            assert line["status"] == 499


async def test_an_incoming_traceparent_is_continued(http: aiohttp.ClientSession) -> None:
    trace_id, parent_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    async with fake_engines(1) as engines, traced(engines, "parentbased_always_off") as t:
        header = {"traceparent": traceparent(trace_id, parent_id, True)}
        async with http.post(t.gw.url + "/v1/completions", json={
            "model": MODEL, "prompt": "hi", "max_tokens": 2}, headers=header) as r:  # fmt: skip
            await r.read()
        await wait_until(lambda: len(t.spans()) == 2)
        server, (attempt,) = tree(t.spans())
        assert server.name == "text_completion m"
        assert attrs(server)[sc.GEN_AI_OPERATION_NAME] == "text_completion"
        assert server.context.trace_id == trace_id
        assert server.parent is not None
        assert server.parent.span_id == parent_id
        sent = engines[0].state.traceparents[-1]
        assert sent == traceparent(trace_id, attempt.context.span_id, True)
        # An unsampled parent: no span, and the replica is told not to sample either.
        header = {"traceparent": traceparent(trace_id, parent_id, False)}
        async with http.post(t.gw.url + "/v1/chat/completions", json=CHAT, headers=header) as r:
            await r.read()
        sent = engines[0].state.traceparents[-1]
        assert sent is not None
        assert sent.startswith(f"00-{trace_id:032x}-")
        assert sent.endswith("-00")
        assert len(t.spans()) == 2
