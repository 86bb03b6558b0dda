"""Tracing pieces without a gateway: the sampling decision against the SDK's samplers, the
`tracing:` settings with the OTEL_* variables over them, and span trees through the SDK's
in-memory exporter."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

from fleetserve.config import TracingSpec, tracing_settings
from fleetserve.config.tracing import SAMPLERS, parse_headers
from fleetserve.errors import ConfigError
from fleetserve.telemetry import semconv as sc
from fleetserve.telemetry.tracing import Sampling, Tracing, traceparent


def sdk_sampler(name: str, ratio: float) -> Sampler:
    """The SDK's sampler of an OTEL_TRACES_SAMPLER name and argument (the reference)."""
    root_name = name.removeprefix("parentbased_")
    roots: dict[str, Sampler] = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}
    root = roots[root_name] if root_name in roots else TraceIdRatioBased(ratio)
    return ParentBased(root) if name.startswith("parentbased_") else root


def sdk_decides(sampler: Sampler, trace_id: int, parent: bool | None) -> bool:
    context = None
    if parent is not None:
        flags = TraceFlags(TraceFlags.SAMPLED if parent else TraceFlags.DEFAULT)
        remote = SpanContext(trace_id, 0x1234, is_remote=True, trace_flags=flags)
        context = trace.set_span_in_context(NonRecordingSpan(remote))
    result = sampler.should_sample(context, trace_id, "x")
    return result.decision in (Decision.RECORD_AND_SAMPLE, Decision.RECORD_ONLY)


def attrs(span: ReadableSpan) -> Mapping[str, object]:
    return dict(span.attributes or {})


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 1.0])
def test_sampling_decides_as_the_sdk_sampler_does(name: str, ratio: float) -> None:
    sampling = Sampling.named(name, ratio)
    reference = sdk_sampler(name, ratio)
    rng = random.Random(7)
    sampled = 0
    for _ in range(2000):
        trace_id = rng.getrandbits(128) or 1
        for parent in (None, True, False):
            ours = sampling.samples(trace_id, parent)
            assert ours == sdk_decides(reference, trace_id, parent), (trace_id, parent)
        sampled += sampling.samples(trace_id)
    if name.endswith("traceidratio"):
        assert abs(sampled / 2000 - ratio) < 0.05  # the ratio holds


def test_traceparent_is_w3c() -> None:
    assert traceparent(0xABC, 0x12, True) == f"00-{0xABC:032x}-{0x12:016x}-01"
    assert traceparent(1, 2, False).endswith("-00")


# --- settings ----------------------------------------------------------------------------


def test_tracing_is_off_unless_configured() -> None:
    assert tracing_settings(None, {}) is None
    assert tracing_settings(None, {"OTEL_SERVICE_NAME": "x"}) is None


def test_endpoint_from_the_environment_turns_it_on_with_the_spec_defaults() -> None:
    got = tracing_settings(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/"})
    assert got is not None
    assert got.traces_url == "http://127.0.0.1:4318/v1/traces"
    assert got.sampler == "parentbased_always_on"
    assert got.ratio == 1.0
    assert got.service_name == "fleetserve-gateway"


def test_the_environment_outranks_the_fleet_file() -> None:
    spec = TracingSpec(
        endpoint="https://cloud.langfuse.com/api/public/otel",
        headers={"Authorization": "Basic from-file"},
        sampler="parentbased_traceidratio",
        sampler_arg=0.5,
        service_name="from-file",
    )
    from_file = tracing_settings(spec, {})
    assert from_file is not None
    assert from_file.traces_url == "https://cloud.langfuse.com/api/public/otel/v1/traces"
    assert from_file.header_values() == {"authorization": "Basic from-file"}
    assert (from_file.sampler, from_file.ratio) == ("parentbased_traceidratio", 0.5)
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/custom",
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Basic%20from-env,x-other=1",
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
        "OTEL_SERVICE_NAME": "from-env",
    }
    got = tracing_settings(spec, env)
    assert got is not None
    assert got.traces_url == "http://127.0.0.1:9/custom"  # a signal endpoint is used as given
    assert got.header_values() == {"authorization": "Basic from-env", "x-other": "1"}
    assert (got.sampler, got.ratio, got.service_name) == ("traceidratio", 0.1, "from-env")


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"OTEL_SDK_DISABLED": "true"}, id="sdk-disabled"),
        pytest.param({"OTEL_TRACES_EXPORTER": "none"}, id="exporter-none"),
    ],
)
def test_standard_switches_turn_it_off(env: dict[str, str]) -> None:
    spec = TracingSpec(endpoint="http://127.0.0.1:4318")
    assert tracing_settings(spec, env) is None


@pytest.mark.parametrize(
    ("env", "says"),
    [
        pytest.param({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER: one of",
                     id="sampler"),
        pytest.param({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
                     "OTEL_TRACES_SAMPLER_ARG", id="ratio"),
        pytest.param({"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS",
                     id="headers"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4318"}, "http(s)://",
                     id="endpoint"),
    ],
)  # fmt: skip
def test_a_bad_value_is_one_line_naming_the_variable(env: dict[str, str], says: str) -> None:
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as caught:
        tracing_settings(None, base | env)
    assert says in str(caught.value)


def test_header_values_never_show_in_their_repr() -> None:
    headers = parse_headers("Authorization=Basic%20c2VjcmV0")
    assert "c2VjcmV0" not in repr(headers)
    assert headers["authorization"].get_secret_value() == "Basic c2VjcmV0"


# --- spans through the SDK's in-memory exporter ------------------------------------------


def test_a_request_with_a_failover_is_one_server_span_with_two_client_children() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.exporting_to(exporter, Sampling.named("always_on"))
    request = tracing.begin(None, lambda: ("chat m", {sc.GEN_AI_REQUEST_MODEL: "m"}))
    first = request.begin_attempt("POST /v1/chat/completions", {sc.FLEETSERVE_ATTEMPT: 1})
    request.end_attempt("status_5xx", 500)
    second = request.begin_attempt("POST /v1/chat/completions", {sc.FLEETSERVE_ATTEMPT: 2})
    request.end({sc.GEN_AI_USAGE_OUTPUT_TOKENS: 4})
    tracing.force_flush()
    spans = {
        (s.kind, attrs(s).get(sc.FLEETSERVE_ATTEMPT)): s for s in exporter.get_finished_spans()
    }
    server = spans[(SpanKind.SERVER, None)]
    one, two = spans[(SpanKind.CLIENT, 1)], spans[(SpanKind.CLIENT, 2)]
    assert server.name == "chat m"
    assert server.parent is None
    assert attrs(server)[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 4
    for child, header in ((one, first), (two, second)):
        assert child.parent is not None
        assert child.parent.span_id == server.context.span_id
        assert child.context.trace_id == server.context.trace_id
        assert header == traceparent(child.context.trace_id, child.context.span_id, True)
    assert attrs(one)[sc.ERROR_TYPE] == "status_5xx"
    assert attrs(one)[sc.HTTP_RESPONSE_STATUS_CODE] == 500
    assert one.status.status_code is StatusCode.ERROR
    assert sc.ERROR_TYPE not in attrs(two)
    tracing.shutdown()


def test_an_incoming_traceparent_is_the_parent_and_decides_under_parentbased() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.exporting_to(exporter, Sampling.named("parentbased_traceidratio", 0.0))
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    sampled = traceparent(trace_id, span_id, True).encode()
    request = tracing.begin(sampled, lambda: ("chat m", {}))
    assert request.sampled  # ratio 0, but the parent was sampled
    request.end({})
    unsampled = tracing.begin(
        traceparent(trace_id, span_id, False).encode(), lambda: ("chat m", {})
    )
    assert not unsampled.sampled
    header = unsampled.begin_attempt("x", {})
    assert header.startswith(f"00-{trace_id:032x}-")
    assert header.endswith("-00")
    assert not tracing.begin(None, lambda: ("chat m", {})).sampled  # a root at ratio 0
    malformed = tracing.begin(b"00-zz-nonsense", lambda: ("chat m", {}))  # ignored: a root
    assert malformed.trace_id != trace_id
    tracing.force_flush()
    (server,) = exporter.get_finished_spans()
    assert server.context.trace_id == trace_id
    assert server.parent is not None
    assert server.parent.span_id == span_id
    assert server.parent.is_remote
    tracing.shutdown()


def test_an_unsampled_request_makes_no_span_but_propagates_its_trace_id() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing.exporting_to(exporter, Sampling.named("always_off"))
    request = tracing.begin(None, lambda: ("chat m", {}))
    assert not request.sampled
    one, two = request.begin_attempt("x", {}), request.begin_attempt("x", {})
    assert one.split("-")[1] == two.split("-")[1] == request.trace_id_hex
    assert one.split("-")[2] != two.split("-")[2]  # a span id per attempt
    request.end({})
    tracing.force_flush()
    assert exporter.get_finished_spans() == ()
    tracing.shutdown()
