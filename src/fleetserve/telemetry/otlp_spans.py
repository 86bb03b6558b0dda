"""OTLP/HTTP export of finished spans: the SDK's exporter, with the message that its
`encode_spans` (opentelemetry-exporter-otlp-proto-common) makes built faster, with the same
generated `opentelemetry-proto` classes.

The SDK's encoder makes a `KeyValue` and an `AnyValue` per attribute, then copies each list
into its span, each span into its scope, each scope into its resource (upb copies a message
passed to a constructor), and hashes the resource (a `json.dumps`) once per span: 37 us per
span of ours in benchmarks/tracing_cost.py's run. Adding each message in place where it
belongs (`repeated.add(...)`, set fields on the child) makes the same message in 11 us
(benchmarks/README.md, "--observability"); protobuf serializes it as before. Spans with
events or links (fleetserve makes none), or an attribute of a kind outside the SDK's own,
go through the SDK's encoder unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope as SdkScope
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import Attributes

from fleetserve.telemetry import semconv as sc

log = logging.getLogger(__name__)

_KINDS = {
    SpanKind.INTERNAL: PbSpan.SpanKind.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: PbSpan.SpanKind.SPAN_KIND_SERVER,
    SpanKind.CLIENT: PbSpan.SpanKind.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: PbSpan.SpanKind.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: PbSpan.SpanKind.SPAN_KIND_CONSUMER,
}
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


class OtlpSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter (its transport, retries, headers, compression,
    size limit and own metrics) with `encode_spans` below in place of the SDK's."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        # OTLPSpanExporter.export (opentelemetry-exporter-otlp-proto-http 1.45) step by step,
        # but for the encoder: it offers no other seam for one.
        if self._shutdown:
            return super().export(spans)  # it warns and fails
        with self._metrics.export_operation(len(spans)) as result:
            data = encode_spans(spans).SerializePartialToString()
            limit = self._max_request_size
            if 0 < limit < len(data):
                log.warning("dropping a span batch of %d bytes: over max_request_size %d bytes",
                            len(data), limit)  # fmt: skip
                result.error = ValueError(f"a span batch of {len(data)} bytes")
                return SpanExportResult.FAILURE
            sent = self._client.export(data)
            if not sent.success:
                result.error = sent.error
                if sent.status_code is not None:
                    result.error_attrs = {sc.HTTP_RESPONSE_STATUS_CODE: sent.status_code}
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


def encode_spans(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The ExportTraceServiceRequest of `spans`, equal to the SDK encoder's (tested)."""
    try:
        return _encode(spans)
    except (TypeError, ValueError):  # a kind it does not know, an int over 64 bits: the
        # SDK's encoder logs and skips that attribute
        return sdk_encode(spans)


def _encode(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    # Grouped by resource, then scope, in order of first appearance, as the SDK's encoder does;
    # each distinct object is hashed once (a Resource's hash is a json.dumps), not each span.
    groups: dict[Resource, dict[SdkScope | None, list[ReadableSpan]]] = {}
    spans_of: dict[tuple[int, int], list[ReadableSpan]] = {}
    for span in spans:
        if span.events or span.links:  # fleetserve's spans have neither
            return sdk_encode(spans)
        resource, scope = span.resource, span.instrumentation_scope or None
        members = spans_of.get((id(resource), id(scope)))
        if members is None:
            members = groups.setdefault(resource, {}).setdefault(scope, [])
            spans_of[(id(resource), id(scope))] = members
        members.append(span)
    for resource, scopes in groups.items():
        resource_spans = request.resource_spans.add(schema_url=resource.schema_url or "")
        resource_spans.resource.SetInParent()
        _add_attributes(resource_spans.resource, resource.attributes)
        for scope, members in scopes.items():
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.SetInParent()
            if scope is not None:
                scope_spans.schema_url = scope.schema_url or ""
                _set_scope(scope_spans.scope, scope)
            add = scope_spans.spans.add
            for span in members:
                _add_span(add, span)
    return request


def _set_scope(message: InstrumentationScope, scope: SdkScope) -> None:
    message.name = scope.name
    if scope.version:
        message.version = scope.version
    _add_attributes(message, scope.attributes)


def _add_span(add: Callable[..., PbSpan], span: ReadableSpan) -> None:
    context = span.context
    assert context is not None
    parent = span.parent
    flags: int = _HAS_IS_REMOTE
    if parent is not None and parent.is_remote:
        flags |= _IS_REMOTE
    message = add(
        trace_id=context.trace_id.to_bytes(16, "big"),
        span_id=context.span_id.to_bytes(8, "big"),
        parent_span_id=parent.span_id.to_bytes(8, "big") if parent is not None else b"",
        name=span.name,
        kind=_KINDS[span.kind],
        start_time_unix_nano=span.start_time,
        end_time_unix_nano=span.end_time,
        dropped_attributes_count=span.dropped_attributes,
        flags=flags,
    )
    state = context.trace_state
    if state:
        message.trace_state = ",".join(f"{k}={v}" for k, v in state.items())
    _add_attributes(message, span.attributes)
    status, pb_status = span.status, message.status
    pb_status.SetInParent()  # the SDK's encoder always sends one, UNSET (0) or not
    if code := status.status_code.value:
        pb_status.code = code  # type: ignore[assignment]  # an int is a valid enum value
    if status.description:
        pb_status.message = status.description


def _add_attributes(
    message: PbResource | InstrumentationScope | PbSpan, attributes: Attributes
) -> None:
    if not attributes:
        return
    add = message.attributes.add
    for key, value in attributes.items():
        kind = type(value)  # the common kinds inline: this loop is most of the encoding
        if kind is str:
            add(key=key).value.string_value = value
        elif kind is int:
            add(key=key).value.int_value = value
        elif kind is float:
            add(key=key).value.double_value = value
        elif kind is bool:
            add(key=key).value.bool_value = value
        else:
            _set_value(add(key=key).value, value)


def _set_value(message: AnyValue, value: object) -> None:
    """`value` into `message` as the SDK's `_encode_value` does (the same type order)."""
    kind = type(value)
    if kind is str:
        message.string_value = value  # type: ignore[assignment]
    elif kind is int:
        message.int_value = value  # type: ignore[assignment]
    elif kind is float:
        message.double_value = value  # type: ignore[assignment]
    elif value is None:
        message.SetInParent()
    elif isinstance(value, bool):
        message.bool_value = value
    elif isinstance(value, str):
        message.string_value = value
    elif isinstance(value, int):
        message.int_value = value
    elif isinstance(value, float):
        message.double_value = value
    elif isinstance(value, bytes):
        message.bytes_value = value
    elif isinstance(value, Sequence):
        message.array_value.SetInParent()
        values = message.array_value.values
        for item in value:
            _set_value(values.add(), item)
    elif isinstance(value, Mapping):
        message.kvlist_value.SetInParent()
        pairs = message.kvlist_value.values
        for key, item in value.items():
            _set_value(pairs.add(key=str(key)).value, item)
    else:
        raise TypeError(f"an attribute value of type {kind.__name__}")
