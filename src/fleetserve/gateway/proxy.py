"""Forwarding one request to a replica, with failover.

Failures before anything reached the client (connect errors, 5xx, timeouts before the first
byte) are retried on another replica, up to `max_attempts`. Once a stream has started, a
failure ends it with an SSE error event in OpenAI's shape. Upstream 4xx answers are the
client's problem and pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetserve.clock import Clock
from fleetserve.config import GatewaySettings
from fleetserve.errors import (
    ApiError,
    GatewayTimeoutError,
    NoReplicaError,
    UpstreamClosedError,
    UpstreamError,
    UpstreamFailedError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from fleetserve.fleet.fleet import Fleet
from fleetserve.gateway.upstream import UpstreamClient
from fleetserve.protocol.asgi import Send, send_bytes
from fleetserve.protocol.inspect import RequestInfo
from fleetserve.protocol.sse import encode_error_event
from fleetserve.routing.picker import Picker
from fleetserve.routing.snapshot import ReplicaSnapshot, RouteRequest
from fleetserve.telemetry.metrics import GatewayMetrics

REPLICA_HEADER = b"x-fleetserve-replica"  # which replica served: for debugging and fault tests
SSE_HEADERS_BASE = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


@dataclass(slots=True)
class Outcome:
    """What happened to a request, for metrics and logs."""

    status: int = 0
    replica: str | None = None
    attempts: int = 0
    stream_failed: bool = False


def _error_kind(err: UpstreamError) -> str:
    if isinstance(err, UpstreamTimeoutError):
        return f"timeout_{err.phase}"
    if isinstance(err, UpstreamStatusError):
        return f"status_{err.status // 100}xx"
    if isinstance(err, UpstreamClosedError):
        return "closed"
    return "connect"


def _final_error(err: UpstreamError | None, model: str, tried: int) -> ApiError:
    if isinstance(err, UpstreamTimeoutError):
        return GatewayTimeoutError(
            f"model {model!r}: {err} (tried {tried} replica{'s' if tried != 1 else ''})",
            code=f"upstream_{err.phase}_timeout",
        )
    return UpstreamFailedError(
        f"model {model!r}: every attempt failed, last: {err} (tried {tried} replica"
        f"{'s' if tried != 1 else ''})"
    )


class Proxy:
    def __init__(
        self,
        fleet: Fleet,
        pickers: dict[str, Picker],
        upstream: UpstreamClient,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        clock: Clock,
    ) -> None:
        self.fleet = fleet
        self.pickers = pickers
        self.upstream = upstream
        self.settings = settings
        self.metrics = metrics
        self.clock = clock

    def _pick(self, info: RequestInfo, tried: set[str]) -> ReplicaSnapshot | None:
        ready = self.fleet.ready(info.model)
        if not ready:
            return None
        route = RouteRequest(info.model, info.prefix_key, frozenset(tried))
        return self.pickers[info.model].pick(route, ready)

    def _no_replica(self, model: str) -> NoReplicaError:
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        counts = self.fleet.count_by_state(model)
        total = sum(counts.values())
        if any(r.state == "ready" for r in self.fleet.replicas(model)):
            return NoReplicaError(
                f"all ready replicas of model {model!r} are at their concurrency limit",
                code="replicas_at_capacity",
                headers=retry,
            )
        states = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none configured"
        return NoReplicaError(
            f"no replica of model {model!r} is ready ({total} replicas: {states})",
            headers=retry,
        )

    async def forward(
        self, info: RequestInfo, path: str, body: bytes, request_id: str, send: Send, t0: float
    ) -> Outcome:
        """Serve the request from some replica, or raise the ApiError to answer with."""
        outcome = Outcome()
        tried: set[str] = set()
        last: UpstreamError | None = None
        for attempt in range(self.settings.max_attempts):
            replica = self._pick(info, tried)
            if replica is None:
                break
            if attempt:
                self.metrics.retries.labels(info.model, _error_kind(last) if last else "").inc()
            tried.add(replica.id)
            outcome.attempts = attempt + 1
            outcome.replica = replica.id
            url = replica.url + path
            tag = [(REPLICA_HEADER, replica.id.encode())]
            self.fleet.begin(replica.id)
            try:
                if info.stream:
                    await self._stream(info, url, body, request_id, send, t0, outcome, tag)
                else:
                    response = await self.upstream.send(url, body, request_id)
                    await send_bytes(
                        send, response.status, response.body, response.content_type.encode(), tag
                    )
                    outcome.status = response.status
            except UpstreamStatusError as err:
                if not err.retryable:  # 4xx: the request's fault, not the replica's
                    content_type = (err.content_type or "application/json").encode()
                    await send_bytes(send, err.status, err.body, content_type, tag)
                    outcome.status = err.status
                    self.fleet.record_success(replica.id, self.clock.now())
                    return outcome
                last = err
                self._failed(info.model, replica.id, err)
                continue
            except UpstreamError as err:
                last = err
                self._failed(info.model, replica.id, err)
                continue
            finally:
                self.fleet.end(replica.id)
            if not outcome.stream_failed:
                self.fleet.record_success(replica.id, self.clock.now())
            return outcome
        if not tried:
            raise self._no_replica(info.model)
        if isinstance(last, UpstreamStatusError):  # pass the engine's own 5xx answer on
            content_type = (last.content_type or "application/json").encode()
            tag = [(REPLICA_HEADER, (outcome.replica or "").encode())]
            await send_bytes(send, last.status, last.body, content_type, tag)
            outcome.status = last.status
            return outcome
        raise _final_error(last, info.model, len(tried))

    def _failed(self, model: str, replica_id: str, err: UpstreamError) -> None:
        self.metrics.upstream_errors.labels(model, _error_kind(err)).inc()
        self.fleet.record_failure(replica_id, self.clock.now(), str(err))

    async def _stream(
        self,
        info: RequestInfo,
        url: str,
        body: bytes,
        request_id: str,
        send: Send,
        t0: float,
        outcome: Outcome,
        tag: list[tuple[bytes, bytes]],
    ) -> None:
        clock = self.clock
        first_byte_s = self.settings.timeouts.first_byte_s
        async with self.upstream.stream(url, body, request_id) as stream:
            remaining = max(first_byte_s - (clock.now() - t0), 0.001)
            first = await stream.next_chunk(timeout_s=remaining)
            if not first:
                raise UpstreamClosedError("replica ended the stream before sending anything")
            # Committed: from here on a failure cannot be retried, only reported in-stream.
            now = clock.now()
            self.metrics.observe_ttft(info.model, now - t0)
            headers = [(b"content-type", stream.content_type.encode()), *SSE_HEADERS_BASE, *tag]
            await send({"type": "http.response.start", "status": stream.status, "headers": headers})
            await send({"type": "http.response.body", "body": first, "more_body": True})
            outcome.status = stream.status
            itl = self.metrics.itl_child(info.model)
            last_at = now
            while True:
                try:
                    chunk = await stream.next_chunk()
                except UpstreamError as err:
                    self._failed(info.model, outcome.replica or "", err)
                    outcome.stream_failed = True
                    gone = UpstreamFailedError(
                        f"the replica serving this stream failed mid-way: {err}",
                        code="upstream_stream_error",
                    )
                    await send(
                        {
                            "type": "http.response.body",
                            "body": encode_error_event(gone),
                            "more_body": True,
                        }
                    )
                    break
                if not chunk:
                    break
                now = clock.now()
                itl.observe(now - last_at)
                last_at = now
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
