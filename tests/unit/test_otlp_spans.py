"""The OTLP encoder of telemetry/otlp_spans.py makes the very message of the SDK's
`encode_spans`: for fleetserve's own spans, and for spans of every shape the SDK's tracer
makes (each attribute kind, remote parents, trace state, error status, several resources
and scopes, events and links, which go through the SDK's encoder)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import AttributeValue

from fleetserve.telemetry import semconv as sc
from fleetserve.telemetry.otlp_spans import encode_spans
from fleetserve.telemetry.tracing import Sampling, Tracing

ATTRIBUTES: dict[str, AttributeValue] = {
    "s": "text", "empty": "", "i": 7, "negative": -(2**63), "f": 0.25, "t": True,
    "no": False, "strings": ("stop", "length"), "ints": (1, 2), "floats": (0.5,),
    "bools": (True, False), "none_of_them": (),
}  # fmt: skip


def sdk_spans(resource: Resource) -> Iterator[ReadableSpan]:
    """Spans of the SDK's own tracer, two tracers (scopes) under one provider."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    plain = provider.get_tracer("fleetserve.gateway")
    versioned = provider.get_tracer("other", "1.2", schema_url="https://example.com/schema")
    remote = SpanContext(0xABC, 0xDEF, True, TraceFlags(TraceFlags.SAMPLED),
                         TraceState([("vendor", "value"), ("k", "v")]))  # fmt: skip
    parent = trace.set_span_in_context(NonRecordingSpan(remote))
    with plain.start_as_current_span("root", kind=SpanKind.SERVER, attributes=ATTRIBUTES):
        with versioned.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
            child.set_status(Status(StatusCode.ERROR, "went wrong"))
        plain.start_span("ok", kind=SpanKind.PRODUCER).set_status(Status(StatusCode.OK))
    plain.start_span("remote parent", parent, SpanKind.CONSUMER).end()
    plain.start_span("no attributes").end()
    provider.shutdown()
    yield from exporter.get_finished_spans()


def fleetserve_spans() -> list[ReadableSpan]:
    """A request's spans as fleetserve makes them: a failover, one with a remote parent."""
    exporter = InMemorySpanExporter()
    tracing = Tracing.exporting_to(exporter, Sampling.named("always_on"))
    request = tracing.begin(None, lambda: ("chat m", {sc.GEN_AI_REQUEST_MODEL: "m"}))
    request.begin_attempt("POST /v1/chat/completions", {sc.FLEETSERVE_ATTEMPT: 1})
    request.end_attempt("status_5xx", 500)
    request.begin_attempt("POST /v1/chat/completions", {sc.FLEETSERVE_ATTEMPT: 2})
    request.end({sc.GEN_AI_RESPONSE_FINISH_REASONS: ("stop",), sc.GEN_AI_USAGE_COST: 1e-5})
    parent = f"00-{0xABC:032x}-{0xDEF:016x}-01".encode()
    tracing.begin(parent, lambda: ("chat m", {})).end({}, "cancelled")
    tracing.shutdown()
    return list(exporter.get_finished_spans())


def test_fleetserves_spans_encode_as_the_sdk_encodes_them() -> None:
    spans = fleetserve_spans()
    assert len(spans) == 4
    assert encode_spans(spans) == sdk_encode(spans)
    assert encode_spans(spans).SerializeToString() == sdk_encode(spans).SerializeToString()


@pytest.mark.parametrize(
    ("services", "groups"),
    [
        pytest.param(["a"], 1, id="one-resource"),
        pytest.param(["a", "b"], 2, id="two-resources"),
        pytest.param(["a", "a"], 1, id="equal-resource-copies-merge"),
    ],
)
def test_the_sdks_spans_encode_as_the_sdk_encodes_them(services: list[str], groups: int) -> None:
    spans = [s for name in services for s in sdk_spans(Resource.create({"service.name": name}))]
    encoded = encode_spans(spans)
    assert encoded == sdk_encode(spans)
    assert len(encoded.resource_spans) == groups
    assert len(encoded.resource_spans[0].scope_spans) == 2


def test_spans_with_events_or_links_or_odd_values_take_the_sdks_encoder() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("evented") as span:
        span.add_event("e", {"k": "v"})
    other = SpanContext(0x1, 0x2, False)
    tracer.start_span("linked", links=[Link(other, {"a": 1})]).end()
    spans = list(exporter.get_finished_spans())
    odd = ReadableSpan("odd", SpanContext(0x3, 0x4, False), attributes={"big": 2**70})
    for batch in ([spans[0]], [spans[1]], [odd], [*spans, odd]):
        assert encode_spans(batch) == sdk_encode(batch)
