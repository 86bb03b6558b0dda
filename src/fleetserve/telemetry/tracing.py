"""OpenTelemetry traces of /v1 requests: one SERVER span per request, one CLIENT child per
upstream attempt, exported over OTLP/HTTP by the SDK's batch processor.

Imported only by a gateway that traces (gateway/app.py), so an untraced gateway never loads
the SDK. What a request costs when tracing is on:

- **not sampled** (most requests at a ratio): a 128-bit trace id, one comparison, and a
  `traceparent` string per attempt (flag 00, so that the replica does not sample either). No
  span object is made.
- **sampled**: each span is made once, when it ends, as the SDK's own finished span
  (`ReadableSpan`, what its processors and exporters take) with its start time, all its
  attributes in one dict and its status, and handed to the span processor. A live SDK span
  (`Tracer.start_span`, `set_attribute`, `end`) runs the sampler, the id generator, a lock and
  the attribute checks on every call: 33 us for a request's two spans against 5 us made at
  the end (benchmarks/tracing_cost.py; benchmarks/README.md, "--observability"). The
  spans are the same to an exporter: ids, parent, kind, times, attributes, status,
  resource and scope.
- **exported** by `OtlpSpanExporter` (telemetry/otlp_spans.py): the SDK's OTLP/HTTP
  exporter with a faster encoder of the same message.

`Sampling` makes the decision of the standard `OTEL_TRACES_SAMPLER` values as the SDK's
samplers do (tests/unit/test_tracing.py checks the two agree on random trace ids).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fleetserve.telemetry import semconv as sc

TRACER_NAME = "fleetserve.gateway"
_LOW_64 = TraceIdRatioBased.TRACE_ID_LIMIT
_PROPAGATOR = TraceContextTextMapPropagator()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = Status(StatusCode.UNSET)
_FAILED = Status(StatusCode.ERROR)

Attributes = Mapping[str, str | bool | int | float | tuple[str, ...]]
Describe = Callable[[], tuple[str, Attributes]]
"""A request's span name and start attributes, asked for only when it is sampled."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """An `OTEL_TRACES_SAMPLER` decision: `parent_based` follows an incoming parent's
    sampled flag; otherwise (and for roots) `bound` decides: trace ids whose low 64 bits are
    under it are sampled (TraceIdRatioBased's rule; 0 is always_off, 2**64 always_on)."""

    parent_based: bool
    bound: int

    @classmethod
    def named(cls, name: str, ratio: float = 1.0) -> Sampling:
        parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        if root == "always_on":
            bound = _LOW_64 + 1
        elif root == "always_off":
            bound = 0
        elif root == "traceidratio":
            bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        else:
            raise ValueError(f"unknown sampler {name!r}")
        return cls(parent_based, bound)

    def samples(self, trace_id: int, parent_sampled: bool | None = None) -> bool:
        """Whether a trace is recorded; `parent_sampled` is None for a root."""
        if parent_sampled is not None and self.parent_based:
            return parent_sampled
        return trace_id & _LOW_64 < self.bound


def traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    """The W3C `traceparent` header value."""
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def _traceparent(trace_hex: str, span_id: int, flags: str) -> str:
    return f"00-{trace_hex}-{span_id:016x}-{flags}"


class Tracing:
    """One gateway worker's tracer: the span processor (the SDK's batch processor, in
    production) and the sampling rule. `shutdown()` exports what is queued."""

    def __init__(self, processor: SpanProcessor, sampling: Sampling, service_name: str) -> None:
        self.sampling = sampling
        self.processor = processor
        # What a TracerProvider would give its spans: the resource (with OTEL_RESOURCE_*
        # merged in) and the scope of its tracer.
        self.resource = Resource.create({SERVICE_NAME: service_name})
        self.scope = InstrumentationScope(TRACER_NAME)

    @classmethod
    def otlp(
        cls,
        url: str,
        headers: Mapping[str, str],
        sampling: Sampling,
        service_name: str,
        timeout_s: float = 10.0,
    ) -> Tracing:
        """Export over OTLP/HTTP (protobuf) to `url` (…/v1/traces), in batches off the event
        loop (the SDK's BatchSpanProcessor: its OTEL_BSP_* variables apply)."""
        # Imported here: the exporter pulls in `requests`, which only an exporting gateway needs.
        from fleetserve.telemetry.otlp_spans import OtlpSpanExporter  # noqa: PLC0415

        exporter = OtlpSpanExporter(endpoint=url, headers=dict(headers), timeout=timeout_s)
        return cls(BatchSpanProcessor(exporter), sampling, service_name)

    @classmethod
    def exporting_to(
        cls, exporter: SpanExporter, sampling: Sampling, service_name: str = "test"
    ) -> Tracing:
        """Batch-export to `exporter` (tests: the SDK's InMemorySpanExporter)."""
        return cls(BatchSpanProcessor(exporter), sampling, service_name)

    def begin(
        self, parent: bytes | None, describe: Describe, start_ns: int | None = None
    ) -> RequestTrace:
        """The trace of one request; `parent` is its `traceparent` header, if any (a malformed
        one is ignored, as the W3C spec says); `describe()` is called when it is sampled."""
        remote: SpanContext | None = None
        if parent is None:
            trace_id = random.getrandbits(128) or 1
            if not self.sampling.samples(trace_id):
                return RequestTrace(trace_id)
        else:
            extracted = _PROPAGATOR.extract({"traceparent": parent.decode("latin-1")})
            remote = trace.get_current_span(extracted).get_span_context()
            if not remote.is_valid:
                return self.begin(None, describe, start_ns)
            trace_id = remote.trace_id
            if not self.sampling.samples(trace_id, remote.trace_flags.sampled):
                return RequestTrace(trace_id)
        name, attributes = describe()
        start = time.time_ns() if start_ns is None else start_ns
        state = remote.trace_state if remote is not None else None  # the SDK's: the parent's
        context = SpanContext(trace_id, random.getrandbits(64) or 1, False, _SAMPLED, state)
        return RequestTrace(trace_id, _Recording(self, name, attributes, context, remote, start))

    def force_flush(self) -> bool:
        """Export what is queued now (tests)."""
        return self.processor.force_flush()

    def shutdown(self) -> None:
        self.processor.shutdown()


class _Recording:
    """A sampled request's spans while they are open: the SERVER span's fields and those
    of the CLIENT attempt under way; each becomes a ReadableSpan when it ends."""

    __slots__ = ("attempt", "attributes", "context", "name", "parent", "start_ns", "tracing")

    def __init__(
        self,
        tracing: Tracing,
        name: str,
        attributes: Attributes,
        context: SpanContext,
        parent: SpanContext | None,
        start_ns: int,
    ) -> None:
        self.tracing = tracing
        self.name = name
        self.attributes = attributes
        self.context = context
        self.parent = parent
        self.start_ns = start_ns
        self.attempt: tuple[SpanContext, str, Attributes, int] | None = None

    def finished(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Attributes,
        start_ns: int,
        failed: bool,
    ) -> None:
        tracing = self.tracing
        tracing.processor.on_end(
            ReadableSpan(
                name, context, parent, tracing.resource, attributes, kind=kind,
                status=_FAILED if failed else _OK, start_time=start_ns,
                end_time=time.time_ns(), instrumentation_scope=tracing.scope,
            )
        )  # fmt: skip


class RequestTrace:
    """One request's trace: its id, and (when sampled) its spans while they are open."""

    __slots__ = ("_hex", "_recording", "sampled", "trace_id")

    def __init__(self, trace_id: int, recording: _Recording | None = None) -> None:
        self.trace_id = trace_id
        self._recording = recording
        self.sampled = recording is not None
        self._hex = ""

    @property
    def trace_id_hex(self) -> str:
        """The trace id as in `traceparent` (formatted once: each attempt and the access
        line want it)."""
        if not self._hex:
            self._hex = f"{self.trace_id:032x}"
        return self._hex

    def begin_attempt(self, name: str, attributes: Attributes) -> str:
        """Start the CLIENT span of an upstream attempt (the previous one ends first);
        returns the `traceparent` to send with it."""
        span_id = random.getrandbits(64) or 1
        recording = self._recording
        if recording is None:
            return _traceparent(self.trace_id_hex, span_id, "00")
        self.end_attempt()
        state = recording.context.trace_state
        context = SpanContext(self.trace_id, span_id, False, _SAMPLED, state)
        recording.attempt = (context, name, attributes, time.time_ns())
        return _traceparent(self.trace_id_hex, span_id, "01")

    def end_attempt(self, error_type: str | None = None, status: int | None = None) -> None:
        recording = self._recording
        if recording is None or recording.attempt is None:
            return
        context, name, attributes, start_ns = recording.attempt
        recording.attempt = None
        if status is not None or error_type is not None:
            ended = dict(attributes)
            if status is not None:
                ended[sc.HTTP_RESPONSE_STATUS_CODE] = status
            if error_type is not None:
                ended[sc.ERROR_TYPE] = error_type
            attributes = ended
        recording.finished(
            name, context, recording.context, SpanKind.CLIENT, attributes,
            start_ns, error_type is not None,
        )  # fmt: skip

    def end(self, attributes: Attributes, error_type: str | None = None) -> None:
        """End the request's spans (an attempt still open ends with `error_type` too)."""
        self.end_attempt(error_type)
        recording = self._recording
        if recording is None:
            return
        self._recording = None
        merged = {**recording.attributes, **attributes}
        if error_type is not None:
            merged[sc.ERROR_TYPE] = error_type
        recording.finished(
            recording.name, recording.context, recording.parent, SpanKind.SERVER,
            merged, recording.start_ns, error_type is not None,
        )  # fmt: skip
