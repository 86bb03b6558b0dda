"""OpenTelemetry traces of /v1 requests: one SERVER span per request, one CLIENT child per
upstream attempt, exported over OTLP/HTTP by the SDK's batch processor.

Imported only by a gateway that traces (gateway/app.py), so an untraced gateway never loads
the SDK. What a request costs when tracing is on:

- **not sampled** (most requests at a ratio): a 128-bit trace id, one comparison, and a
  `traceparent` string per attempt (flag 00, so that the replica does not sample either). No
  span object is made: the SDK's own sampler call and non-recording span cost about ten
  times more (measured, benchmarks/README.md), which at thousands of requests a second is
  most of the tracing cost.
- **sampled**: real SDK spans, started with the same trace id (`_ChosenIds`) and the SDK's
  equivalent sampler, so that both decide alike by construction.

`Sampling` makes the decision of the standard `OTEL_TRACES_SAMPLER` values as the SDK's
samplers do (tests/unit/test_tracing.py checks the two agree on random trace ids).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fleetserve.telemetry import semconv as sc

TRACER_NAME = "fleetserve.gateway"
_LOW_64 = TraceIdRatioBased.TRACE_ID_LIMIT
_PROPAGATOR = TraceContextTextMapPropagator()

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

    def sdk_sampler(self) -> Sampler:
        """The SDK's sampler that decides the same."""
        if self.bound > _LOW_64:
            root: Sampler = ALWAYS_ON
        elif self.bound == 0:
            root = ALWAYS_OFF
        else:
            root = TraceIdRatioBased(self.bound / (_LOW_64 + 1))
        return ParentBased(root) if self.parent_based else root


class _ChosenIds(IdGenerator):
    """The SDK's id generator, except that the next root span takes the trace id that
    `Tracing.begin` sampled (`chosen`); one event loop thread sets and takes it."""

    def __init__(self) -> None:
        self.chosen = 0

    def generate_span_id(self) -> int:
        return random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        trace_id, self.chosen = self.chosen, 0
        return trace_id or random.getrandbits(128) or 1


def traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    """The W3C `traceparent` header value."""
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


class Tracing:
    """One gateway worker's tracer: the SDK provider with its batch processor, and the
    sampling rule. `shutdown()` exports what is queued."""

    def __init__(self, processor: SpanProcessor, sampling: Sampling, service_name: str) -> None:
        self.sampling = sampling
        self._ids = _ChosenIds()
        self.provider = TracerProvider(
            sampler=sampling.sdk_sampler(),
            resource=Resource.create({SERVICE_NAME: service_name}),
            id_generator=self._ids,
        )
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer(TRACER_NAME)

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
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter(endpoint=url, headers=dict(headers), timeout=timeout_s)
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
        context: Context | None = None
        if parent is None:
            trace_id = random.getrandbits(128) or 1
            if not self.sampling.samples(trace_id):
                return RequestTrace(trace_id)
            self._ids.chosen = trace_id
        else:
            context = _PROPAGATOR.extract({"traceparent": parent.decode("latin-1")})
            remote = trace.get_current_span(context).get_span_context()
            if not remote.is_valid:
                return self.begin(None, describe, start_ns)
            if not self.sampling.samples(remote.trace_id, remote.trace_flags.sampled):
                return RequestTrace(remote.trace_id)
        name, attributes = describe()
        span = self.tracer.start_span(
            name, context, SpanKind.SERVER, attributes, start_time=start_ns
        )
        self._ids.chosen = 0
        if not span.is_recording():  # the SDK disagreed: keep its (unsampled) ids
            return RequestTrace(span.get_span_context().trace_id)
        return RequestTrace(span.get_span_context().trace_id, self.tracer, span)

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestTrace:
    """One request's trace: its SERVER span (None when not sampled) and the CLIENT span of
    the upstream attempt under way."""

    __slots__ = ("_context", "_tracer", "attempt", "span", "trace_id")

    def __init__(
        self, trace_id: int, tracer: trace.Tracer | None = None, span: Span | None = None
    ) -> None:
        self.trace_id = trace_id
        self._tracer = tracer
        self.span = span
        self.attempt: Span | None = None
        self._context: Context | None = None

    @property
    def sampled(self) -> bool:
        return self.span is not None

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def begin_attempt(self, name: str, attributes: Attributes) -> str:
        """Start the CLIENT span of an upstream attempt (the previous one ends first);
        returns the `traceparent` to send with it."""
        if self.span is None or self._tracer is None:
            return traceparent(self.trace_id, random.getrandbits(64) or 1, False)
        self.end_attempt()
        if self._context is None:
            self._context = trace.set_span_in_context(self.span)
        attempt = self.attempt = self._tracer.start_span(
            name, self._context, SpanKind.CLIENT, attributes
        )
        return traceparent(self.trace_id, attempt.get_span_context().span_id, True)

    def end_attempt(self, error_type: str | None = None, status: int | None = None) -> None:
        attempt = self.attempt
        if attempt is None:
            return
        self.attempt = None
        if status is not None:
            attempt.set_attribute(sc.HTTP_RESPONSE_STATUS_CODE, status)
        if error_type is not None:
            attempt.set_attribute(sc.ERROR_TYPE, error_type)
            attempt.set_status(Status(StatusCode.ERROR))
        attempt.end()

    def end(self, attributes: Attributes, error_type: str | None = None) -> None:
        """End the request's spans (an attempt still open ends with `error_type` too)."""
        self.end_attempt(error_type)
        span = self.span
        if span is None:
            return
        span.set_attributes(attributes)
        if error_type is not None:
            span.set_attribute(sc.ERROR_TYPE, error_type)
            span.set_status(Status(StatusCode.ERROR))
        span.end()


def wall_ns() -> int:
    """Now, in the spans' clock (Unix epoch nanoseconds)."""
    return time.time_ns()
