"""Forwarding one request to a replica, with failover.

Failures before anything reached the client (connect errors, 5xx, timeouts before the first
byte) are retried on another replica, up to `max_attempts`, within ONE first-byte budget per
request (`timeouts.first_byte_s`, counted from the end of the body read, less time held at
the gateway): each attempt gets what its predecessors left, so a request never waits
attempts x first_byte_s. For a non-stream request the budget covers the whole answer. Once a
stream has started, a failure ends it with an SSE error event in OpenAI's shape. Upstream 4xx
answers are the client's problem and pass through unchanged.

When the model has no ready replica but can get one, or every ready replica is at its
`max_concurrency`, the request is held (gateway/hold.py) and then sent to the replica whose slot
was granted to it, or routed as usual. A held stream gets its 200 SSE head after
`stream_head_after_s` and comment lines while it waits; from then on any failure is told
in-stream, as above. Time held for capacity counts in the load window's TTFT (more replicas
shorten it); time held for a cold start does not.
"""

from __future__ import annotations

import functools

from fleetserve.clock import Clock
from fleetserve.config import DEFAULT_PICKER, GatewaySettings
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
from fleetserve.fleet.replica import Replica
from fleetserve.gateway.exchange import Exchange
from fleetserve.gateway.hold import ANONYMOUS, HoldQueue, Share, burst_cap
from fleetserve.gateway.keepalive import SSE_HEADERS_BASE, StreamKeepAlive, answer_as_event
from fleetserve.gateway.shutdown import CONNECTION_CLOSE, Shutdown
from fleetserve.gateway.upstream import UpstreamClient
from fleetserve.protocol.asgi import Send, send_bytes
from fleetserve.protocol.inspect import RequestInfo
from fleetserve.protocol.sse import OutputCounter, encode_error_event, usage_of
from fleetserve.routing.picker import Picker
from fleetserve.routing.pickers import make_picker
from fleetserve.routing.snapshot import ReplicaSnapshot, ReplicaState, RouteRequest
from fleetserve.telemetry.metrics import GatewayMetrics, observe_zeros
from fleetserve.telemetry.window import LoadWindow
from fleetserve.tenancy.fairness import Priority

REPLICA_HEADER = b"x-fleetserve-replica"  # which replica served: for debugging and fault tests
MIN_ATTEMPT_S = 0.001  # the first attempt always gets a try, however little budget is left


def _phase(err: UpstreamError) -> str:
    """Where an attempt failed, for metrics: connect, or first_byte (nothing sent yet)."""
    if isinstance(err, UpstreamTimeoutError):
        return "connect" if err.phase == "connect" else "first_byte"
    if isinstance(err, (UpstreamStatusError, UpstreamClosedError)):
        return "first_byte"
    return "connect"


def _interactive(exchange: Exchange) -> bool:
    ticket = exchange.ticket
    return ticket is not None and ticket.principal.tenant.priority is Priority.INTERACTIVE


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
        window: LoadWindow,
        holds: HoldQueue | None = None,
        shutdown: Shutdown | None = None,
    ) -> None:
        self.fleet = fleet
        self.pickers = pickers
        self.upstream = upstream
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.window = window
        self.holds = holds
        self.shutdown = shutdown or Shutdown(clock, settings.shutdown_grace_s)

    def _pick(self, info: RequestInfo, tried: set[str]) -> ReplicaSnapshot | None:
        ready = self.fleet.ready(info.model)
        if not ready:
            return None
        route = RouteRequest(info.model, info.prefix_key, frozenset(tried))
        picker = self.pickers.get(info.model)
        if picker is None:  # a model declared in the fleet at run time
            picker = self.pickers[info.model] = make_picker(DEFAULT_PICKER)
        return picker.pick(route, ready)

    def _pick_headroom(
        self, info: RequestInfo, tried: set[str], headroom: float
    ) -> ReplicaSnapshot | None:
        """For an interactive request when every replica is at its cap: the least loaded one
        still under its cap plus the interactive headroom (hold.burst_cap), if any."""
        best: ReplicaSnapshot | None = None
        for replica in self.fleet.ready(info.model):
            cap = replica.max_concurrency
            if cap is None or replica.id in tried:
                continue
            if replica.in_flight < burst_cap(cap, headroom) and (
                best is None or replica.in_flight < best.in_flight
            ):
                best = replica
        return best

    async def _hold(self, info: RequestInfo, send: Send, exchange: Exchange) -> str | None:
        """Hold until a replica can take the request; the id of one reserved for it, or None."""
        holds = self.holds
        assert holds is not None
        now = self.clock.now()
        if exchange.hold_started is None:
            exchange.hold_started = now
        started = exchange.hold_started
        cold = not self.fleet.ready(info.model)
        ticker = None
        if info.stream:
            ticker = StreamKeepAlive(send, holds.settings, started, exchange.head_sent)
            ticker.next_at = max(ticker.next_at, now)  # a second hold: tick on from now
        ticket = exchange.ticket
        share = ANONYMOUS
        if ticket is not None:
            tenant = ticket.principal.tenant
            share = Share(tenant.name, tenant.weight, tenant.priority, ticket.prompt_estimate)
        try:
            return await holds.hold(info.model, started, ticker, share)
        finally:
            end = self.clock.now()
            exchange.hold_s = end - started
            if cold:
                exchange.cold_hold_s += end - now
            if ticker is not None and ticker.head_sent:
                exchange.head_sent = True
                exchange.status = 200

    def _granted(self, replica_id: str, tried: set[str]) -> Replica | None:
        """The replica whose slot a hold reserved, if it can still serve and this request has
        not failed on it; else the slot back (to the next waiter, if the replica serves)."""
        replica = self.fleet.get(replica_id)
        ready = replica is not None and replica.state is ReplicaState.READY
        if ready and replica_id not in tried:
            return replica
        self.fleet.end(replica_id)
        if ready and replica is not None and self.holds is not None:
            self.holds.freed(replica_id, replica.model)
        return None

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
        self,
        info: RequestInfo,
        path: str,
        body: bytes,
        request_id: str,
        send: Send,
        t0: float,
        exchange: Exchange,
    ) -> None:
        """Serve the request from some replica, or raise the ApiError to answer with.

        `t0` is when the body was read: the first-byte budget counts from there. What
        happened is written on `exchange` as it happens (the watchdog and metrics read it).
        """
        try:
            await self._forward(info, path, body, request_id, send, t0, exchange)
        except ApiError as err:
            if not exchange.head_sent:
                raise
            # A held stream's head is out: the failure can only be told in-stream.
            exchange.status = err.status
            exchange.stream_failed = True
            await send(
                {"type": "http.response.body", "body": encode_error_event(err), "more_body": True}
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if exchange.hold_started is not None:  # once per request, all its holds together
                self.metrics.of(info.model).hold.observe(exchange.hold_s)

    async def _forward(
        self,
        info: RequestInfo,
        path: str,
        body: bytes,
        request_id: str,
        send: Send,
        t0: float,
        exchange: Exchange,
    ) -> None:
        tried: set[str] = set()
        last: UpstreamError | None = None
        attempt = 0
        holds = self.holds
        budget_s = self.settings.timeouts.first_byte_s
        while attempt < self.settings.max_attempts:
            remaining_s = budget_s - (self.clock.now() - t0 - exchange.hold_s)
            if attempt and remaining_s <= 0:  # earlier attempts spent the request's budget
                last = UpstreamTimeoutError("first_byte", budget_s)
                break
            replica: ReplicaSnapshot | Replica | None = self._pick(info, tried)
            reserved = False
            if replica is None and holds is not None and _interactive(exchange):
                replica = self._pick_headroom(info, tried, holds.settings.interactive_headroom)
            if replica is None:
                if holds is None or not holds.should_hold(info.model, tried):
                    break
                granted = await self._hold(info, send, exchange)
                if granted is None:
                    continue
                replica = self._granted(granted, tried)
                if replica is None:
                    continue
                reserved = True  # the hold counted it in flight already
                remaining_s = budget_s - (self.clock.now() - t0 - exchange.hold_s)
            if attempt:
                self.metrics.retried(info.model, _error_kind(last) if last else "")
            tried.add(replica.id)
            attempt += 1
            exchange.attempts = attempt
            exchange.replica = replica.id
            url = replica.url + path
            tag = self._tag(replica.id, exchange)
            obs = exchange.observed
            traceparent = None if obs is None else obs.attempt(replica.id, replica.url, attempt)
            if not reserved:
                self.fleet.begin(replica.id)
            try:
                timeout_s = max(remaining_s, MIN_ATTEMPT_S)
                if info.stream:
                    await self._stream(
                        info, url, body, request_id, send, t0, timeout_s, exchange, tag,
                        traceparent,
                    )  # fmt: skip
                else:
                    response = await self.upstream.send(
                        url, body, request_id, timeout_s, traceparent
                    )
                    exchange.finishing = True  # the answer is in hand: shutdown lets it out
                    if response.status < 300:
                        usage = usage_of(response.body)  # read once: metrics, ledger, trace
                        if usage is not None:
                            self.metrics.of(info.model).tokens(*usage)
                        if exchange.ticket is not None:
                            exchange.ticket.usage = usage
                        if obs is not None:
                            if exchange.ticket is None:
                                obs.usage = usage
                            obs.answer(response.body, usage=False)
                    await send_bytes(
                        send, response.status, response.body, response.content_type.encode(), tag
                    )
                    exchange.status = response.status
            except UpstreamStatusError as err:
                if not err.retryable:  # 4xx: the request's fault, not the replica's
                    await self._pass_on(send, err, tag, exchange)
                    self.fleet.record_success(replica.id, self.clock.now())
                    return
                last = err
                self._failed(info.model, replica.id, err)
                if obs is not None:
                    obs.attempt_failed(_error_kind(err), err.status)
                continue
            except UpstreamError as err:
                last = err
                self._failed(info.model, replica.id, err)
                if obs is not None:
                    obs.attempt_failed(_error_kind(err))
                continue
            finally:
                self.fleet.end(replica.id)
                if holds is not None:
                    holds.freed(replica.id, info.model)
            if not exchange.stream_failed:
                self.fleet.record_success(replica.id, self.clock.now())
            if attempt > 1:
                self.metrics.of(info.model).failovers += 1
            return
        if not tried:
            raise self._no_replica(info.model)
        if isinstance(last, UpstreamStatusError):  # pass the engine's own 5xx answer on
            tag = self._tag(exchange.replica or "", exchange)
            await self._pass_on(send, last, tag, exchange)
            return
        raise _final_error(last, info.model, len(tried))

    def _tag(self, replica_id: str, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        """Headers of an answer: which replica served it; the tenant's rate-limit state;
        `Connection: close` while the gateway shuts down (clients reconnect to another
        gateway replica)."""
        tag = [(REPLICA_HEADER, replica_id.encode()), *exchange.extra_headers]
        if self.shutdown.draining:
            tag.append(CONNECTION_CLOSE)
        return tag

    async def _pass_on(
        self,
        send: Send,
        err: UpstreamStatusError,
        tag: list[tuple[bytes, bytes]],
        exchange: Exchange,
    ) -> None:
        """Answer with the replica's own error, or end the held stream with it as an event."""
        exchange.status = err.status
        if exchange.head_sent:
            exchange.stream_failed = True
            event = answer_as_event(err.status, err.body)
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        content_type = (err.content_type or "application/json").encode()
        await send_bytes(send, err.status, err.body, content_type, tag)

    def _failed(
        self, model: str, replica_id: str, err: UpstreamError, phase: str | None = None
    ) -> None:
        self.metrics.upstream_error(model, _error_kind(err), phase or _phase(err))
        self.fleet.record_failure(replica_id, self.clock.now(), str(err))

    async def _stream(
        self,
        info: RequestInfo,
        url: str,
        body: bytes,
        request_id: str,
        send: Send,
        t0: float,
        first_byte_s: float,
        exchange: Exchange,
        tag: list[tuple[bytes, bytes]],
        traceparent: str | None = None,
    ) -> None:
        clock = self.clock
        deadline = clock.now() + first_byte_s
        async with self.upstream.stream(url, body, request_id, first_byte_s, traceparent) as stream:
            left_s = max(deadline - clock.now(), MIN_ATTEMPT_S)
            first = await stream.next_chunk(timeout_s=left_s)
            if not first:
                raise UpstreamClosedError("replica ended the stream before sending anything")
            # Committed: from here on a failure cannot be retried, only reported in-stream.
            now = clock.now()
            exchange.ttft_s = now - t0
            self.metrics.observe_ttft(info.model, now - t0)
            ticket = exchange.ticket
            tap = None
            charge = None
            if ticket is not None:
                tap = ticket.tap
                holds = self.holds
                if holds is not None:
                    charge = functools.partial(holds.charge, info.model, ticket.tenant)
            obs = exchange.observed
            if tap is None and obs is not None:
                tap = obs.tap
            # The autoscaler's window leaves a cold-start hold out (more replicas cannot
            # shorten it) but keeps time held at capacity (more replicas would).
            self.window.observe_ttft(info.model, now, now - t0 - exchange.cold_hold_s)
            outputs = OutputCounter()
            events = outputs.count(first)
            if ticket is not None:
                ticket.output_events = events
                if charge is not None and events:
                    charge(events)
                if tap is not None:
                    first = tap.feed(first)
            elif tap is not None:  # the observer's (gateway/observe.py)
                first = tap.feed(first)
            # Writes to the client are stamped: the watchdog cuts a client that stops reading.
            exchange.sending_since = now
            if not exchange.head_sent:
                headers = [
                    (b"content-type", stream.content_type.encode()), *SSE_HEADERS_BASE, *tag
                ]  # fmt: skip
                await send(
                    {"type": "http.response.start", "status": stream.status, "headers": headers}
                )
                exchange.head_sent = True
            if first:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            exchange.sending_since = 0.0
            exchange.status = stream.status
            # Inter-token latency: the gap from one event with generated output to the next
            # (several in one read are 0 s apart, as the client sees them), not between reads.
            itl = self.metrics.itl_child(info.model)
            if events > 1:
                observe_zeros(itl, events - 1)
            content_at = now if events else None
            while True:
                try:
                    chunk = await stream.next_chunk()
                except UpstreamError as err:
                    self._failed(info.model, exchange.replica or "", err, "stream")
                    exchange.stream_failed = True
                    gone = UpstreamFailedError(
                        f"the replica serving this stream failed mid-way: {err}",
                        code="upstream_stream_error",
                    )
                    exchange.sending_since = clock.now()
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
                events = outputs.count(chunk)
                if events:
                    if content_at is not None:
                        itl.observe(now - content_at)
                    if events > 1:
                        observe_zeros(itl, events - 1)
                    content_at = now
                    if ticket is not None:
                        ticket.output_events += events
                        if charge is not None:
                            charge(events)
                if tap is not None:
                    chunk = tap.feed(chunk)
                    if not chunk:
                        continue
                exchange.sending_since = now
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                exchange.sending_since = 0.0
            exchange.sending_since = clock.now()
            if tap is not None and (rest := tap.finish()):
                await send({"type": "http.response.body", "body": rest, "more_body": True})
            if tap is not None and (usage := tap.usage) is not None:
                self.metrics.of(info.model).tokens(*usage)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            exchange.sending_since = 0.0
