"""A small OTLP/HTTP trace receiver on 127.0.0.1, standing in for an OpenTelemetry collector
or Langfuse's /api/public/otel (neither runs on this machine).

It answers `POST <prefix>/v1/traces` as the OTLP/HTTP spec says (protobuf in, an empty
ExportTraceServiceResponse out), checks the `Authorization` header when told what it must be
(401 otherwise, as Langfuse answers a wrong key pair), and keeps the decoded spans, or
drops them (`keep=False`, the benchmark's sink).

    async with OtlpReceiver(authorization="Basic ...") as receiver:
        ... receiver.endpoint ...          # for OTEL_EXPORTER_OTLP_ENDPOINT
        await receiver.wait_for_spans(3, timeout_s=10)

Run as a process (`python -m fleetserve.testing.otlp --port N`) it accepts and drops.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import socket
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

PROTOBUF = "application/x-protobuf"
_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()


def any_value(value: AnyValue) -> object:
    """An OTLP attribute value as Python (arrays as tuples)."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived, ids as hex like traceparent writes them."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int  # Span.SpanKind: 2 server, 3 client
    start_ns: int
    end_ns: int
    status_code: int  # Status.StatusCode: 0 unset, 1 ok, 2 error
    attributes: Mapping[str, object]
    resource: Mapping[str, object]

    @property
    def is_server(self) -> bool:
        return self.kind == Span.SPAN_KIND_SERVER

    @property
    def is_client(self) -> bool:
        return self.kind == Span.SPAN_KIND_CLIENT


@dataclass
class OtlpReceiver:
    authorization: str | None = None  # the Authorization header every export must carry
    keep: bool = True
    path_prefix: str = ""  # e.g. /api/public/otel, as Langfuse serves it
    port: int = 0
    spans: list[ReceivedSpan] = field(default_factory=list)
    exports: int = 0
    refused: int = 0  # exports answered 401
    _runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        """The base URL, for OTEL_EXPORTER_OTLP_ENDPOINT (/v1/traces is appended to it)."""
        return f"http://127.0.0.1:{self.port}{self.path_prefix}"

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(f"{self.path_prefix}/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _traces(self, request: web.Request) -> web.Response:
        if self.authorization is not None and request.headers.get("Authorization") != (
            self.authorization
        ):
            self.refused += 1
            return web.Response(status=401, text="unauthorized")
        if request.content_type != PROTOBUF:
            return web.Response(status=415, text=f"expected {PROTOBUF}")
        raw = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            raw = gzip.decompress(raw)
        elif encoding == "deflate":
            raw = zlib.decompress(raw)
        self.exports += 1
        if self.keep:
            self.spans += decode(raw)
        return web.Response(body=_EMPTY_RESPONSE, content_type=PROTOBUF)

    async def wait_for_spans(self, count: int, timeout_s: float = 15.0) -> list[ReceivedSpan]:
        """At least `count` spans, or TimeoutError (the gateway exports in batches)."""
        async with asyncio.timeout(timeout_s):
            while len(self.spans) < count:  # noqa: ASYNC110 - filled by the server's handler
                await asyncio.sleep(0.05)
        return self.spans


def decode(raw: bytes) -> list[ReceivedSpan]:
    """The spans of one ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest.FromString(raw)
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: any_value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), name=span.name,
                        kind=span.kind, start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano, status_code=span.status.code,
                        attributes={a.key: any_value(a.value) for a in span.attributes},
                        resource=resource,
                    )
                )  # fmt: skip
    return out


async def _serve(port: int) -> None:
    async with OtlpReceiver(keep=False, port=port):
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="An OTLP/HTTP receiver that accepts and drops")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port))


if __name__ == "__main__":
    main()
