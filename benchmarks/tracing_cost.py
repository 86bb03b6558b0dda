"""What each piece of tracing and access logging costs, in this process, one thread: a sampled
request's two spans made the way fleetserve makes them and as live SDK spans; their OTLP
encoding by fleetserve's encoder and by the SDK's; an unsampled request; one access line.

    .venv/bin/python -m benchmarks.tracing_cost

The spans carry what a streamed chat request's carry (the attributes of gateway/observe.py).
Each figure is the best of 5 repeats (the least disturbed by other work on the machine), in
microseconds. `gateway_overhead --observability` measures the whole, in a gateway worker.
"""

from __future__ import annotations

import io
import sys
import time
import timeit
from collections.abc import Callable

import orjson
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind

from fleetserve.telemetry import semconv as sc
from fleetserve.telemetry.logs import AccessLog
from fleetserve.telemetry.otlp_spans import encode_spans
from fleetserve.telemetry.tracing import Attributes, Sampling, Tracing

REPEATS = 5
PATH = "POST /v1/chat/completions"
START: Attributes = {
    sc.GEN_AI_OPERATION_NAME: "chat", sc.GEN_AI_PROVIDER_NAME: "fleetserve.sim",
    sc.GEN_AI_REQUEST_MODEL: "bench-model", sc.GEN_AI_REQUEST_STREAM: True,
    sc.LANGFUSE_OBSERVATION_TYPE: "generation", sc.FLEETSERVE_REQUEST_ID: "gw-1a2b-000042",
    sc.GEN_AI_REQUEST_MAX_TOKENS: 16,
}  # fmt: skip
ATTEMPT: Attributes = {
    sc.SERVER_ADDRESS: "127.0.0.1", sc.SERVER_PORT: 8001, sc.FLEETSERVE_REPLICA_ID: "r1",
    sc.FLEETSERVE_ATTEMPT: 1, sc.LANGFUSE_OBSERVATION_TYPE: "span",
}  # fmt: skip
END: Attributes = {
    sc.HTTP_RESPONSE_STATUS_CODE: 200, sc.FLEETSERVE_REPLICA_ID: "r1",
    sc.GEN_AI_RESPONSE_FINISH_REASONS: ("stop",), sc.GEN_AI_USAGE_INPUT_TOKENS: 12,
    sc.GEN_AI_USAGE_OUTPUT_TOKENS: 16, sc.GEN_AI_USAGE_COST: 0.000184,
    sc.LANGFUSE_COST_DETAILS: '{"input":2.4e-05,"output":0.00016,"total":0.000184}',
    sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: 0.0012,
    sc.LANGFUSE_COMPLETION_START_TIME: "2026-12-04T10:00:00.123456Z",
    sc.USER_ID: "acme", sc.FLEETSERVE_TENANT: "acme",
}  # fmt: skip
ACCESS = {
    "request_id": "gw-1a2b-000042", "trace_id": "0af7651916cd43dd8448eb211c80319c",
    "tenant": "acme", "model": "bench-model", "path": "/v1/chat/completions", "stream": True,
    "replica": "r1", "attempts": 1, "status": 200, "error": None, "input_tokens": 12,
    "output_tokens": 16, "ttft_ms": 1.2, "e2e_ms": 3.456, "bytes": 2345,
}  # fmt: skip


class Dropping(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class Direct:
    """A span processor that keeps what ends (what the batch processor's queue does)."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_start(self, span: object, parent_context: object = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def best_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=REPEATS)) / number * 1e6


def main() -> int:
    print("tracing_cost: per-piece costs of tracing and access lines, one thread")
    print(time.strftime("date    : %Y-%m-%d %H:%M:%S %Z"))
    kept = Direct()
    tracing = Tracing(kept, Sampling.named("always_on"), "bench")  # type: ignore[arg-type]

    def fleetserve_request() -> None:
        request = tracing.begin(None, lambda: ("chat bench-model", dict(START)))
        request.begin_attempt(PATH, ATTEMPT)
        request.end_attempt(None, 200)
        request.end(END)

    unsampled = Tracing(kept, Sampling.named("always_off"), "bench")  # type: ignore[arg-type]

    def unsampled_request() -> None:
        request = unsampled.begin(None, lambda: ("chat bench-model", dict(START)))
        request.begin_attempt("", {})
        request.end({})

    provider = TracerProvider(ALWAYS_ON, Resource.create({"service.name": "bench"}))
    provider.add_span_processor(SimpleSpanProcessor(Dropping()))
    tracer = provider.get_tracer("fleetserve.gateway")

    def live_sdk_request() -> None:
        server = tracer.start_span("chat bench-model", None, SpanKind.SERVER, START)
        context = trace.set_span_in_context(server)
        attempt = tracer.start_span(PATH, context, SpanKind.CLIENT, ATTEMPT)
        attempt.set_attribute(sc.HTTP_RESPONSE_STATUS_CODE, 200)
        attempt.end()
        server.set_attributes(END)
        server.end()

    access = AccessLog("json", io.BytesIO())

    def access_line() -> None:
        access.write(ACCESS)
        access.flush()

    rows = [
        ("sampled request, 2 spans, as fleetserve makes them", best_us(fleetserve_request, 2000)),
        ("sampled request, 2 live SDK spans (start_span ... end)", best_us(live_sdk_request, 2000)),
        ("unsampled request (trace id, traceparent, end)", best_us(unsampled_request, 20000)),
        ("one JSON access line (write + flush to memory)", best_us(access_line, 20000)),
    ]
    kept.spans.clear()
    for _ in range(256):
        fleetserve_request()
    batch = kept.spans[:512]
    assert encode_spans(batch) == sdk_encode(batch)
    n = len(batch)
    rows += [
        ("encode a span, fleetserve's encoder + serialize (batch of 512)",
         best_us(lambda: encode_spans(batch).SerializePartialToString(), 5) / n),
        ("encode a span, SDK's encode_spans + serialize (batch of 512)",
         best_us(lambda: sdk_encode(batch).SerializePartialToString(), 5) / n),
    ]  # fmt: skip
    for what, us in rows:
        print(f"  {what:<66} {us:8.2f} us")
    size = len(encode_spans(batch).SerializePartialToString()) / n
    print(f"  (a span is {size:.0f} bytes of OTLP protobuf; an access line "
          f"{len(orjson.dumps(ACCESS)) + 80} bytes or so)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
