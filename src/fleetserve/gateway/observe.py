"""Traces and access lines of /v1 requests: what the gateway tells about each one.

Built only when tracing is configured or the access log is on (gateway/app.py); otherwise
`GatewayApp.observer` is None and the hot path pays one attribute check. Per request:

- `begin` (after admission): the SERVER span when sampled (telemetry/tracing.py); for a
  stream, a `UsageTap` so that the engine's usage is known (asking for it, and stripping it
  again, when the client did not; tenancy's tap is used when tenancy has one); a `send` that
  counts the bytes of the answer when the access log is on.
- per upstream attempt (gateway/proxy.py): a CLIENT span and the `traceparent` to send.
- `finish`: the usage, cost and finish reasons onto the span; the access line.

Only fixed fields are ever written: never a key, a prompt or a completion.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import orjson

from fleetserve.clock import Clock
from fleetserve.gateway.exchange import Exchange
from fleetserve.protocol.asgi import Message, Scope, Send, header
from fleetserve.protocol.inspect import RequestInfo, rewrite_body
from fleetserve.protocol.sse import UsageTap, usage_of
from fleetserve.telemetry import semconv as sc
from fleetserve.telemetry.logs import AccessLog
from fleetserve.tenancy.model import Price, cost_micro_usd

if TYPE_CHECKING:
    from fleetserve.telemetry.tracing import Attributes, RequestTrace, Tracing

log = logging.getLogger("fleetserve.gateway")

CLIENT_CLOSED = 499
EXPORT_AT_EXIT_S = 5.0  # what a stopping gateway waits for its queued spans to go out
MICRO = 1e-6
_FINISH_REASON = re.compile(rb'"finish_reason"\s*:\s*"([^"\\]{1,64})"')
# How each engine is named as gen_ai.provider.name (none of them is a well-known value).
PROVIDERS = {"vllm": "vllm", "llamacpp": "llama.cpp", "sim": "fleetserve.sim"}


def finish_reasons_in(data: bytes) -> list[str]:
    if b"finish_reason" not in data:
        return []
    return [m.decode("latin-1") for m in _FINISH_REASON.findall(data)]


class ObservedTap(UsageTap):
    """A UsageTap that also collects the stream's finish reasons (for a sampled trace)."""

    __slots__ = ("reasons",)

    def __init__(self, *, strip: bool, reasons: bool) -> None:
        super().__init__(strip=strip)
        self.reasons: list[str] | None = [] if reasons else None

    def feed(self, chunk: bytes) -> bytes:
        reasons = self.reasons
        if reasons is not None and b"finish_reason" in chunk:
            reasons += finish_reasons_in(chunk)
        return super().feed(chunk)


@dataclass(slots=True, eq=False)
class Observation:
    """One request as the observer follows it (on `Exchange.observed`)."""

    request_id: str
    path: str
    model: str
    stream: bool
    t0: float  # the gateway's clock at the end of the body read
    trace: RequestTrace | None = None
    tap: UsageTap | None = None  # None: tenancy's tap reads the stream, or not a stream
    usage: tuple[int, int] | None = None  # a whole answer's (prompt, completion) tokens
    reasons: list[str] | None = None  # a whole answer's finish reasons (sampled only)
    bytes_out: int = 0
    began: float = 0.0  # the gateway's clock when the SERVER span started
    began_wall: float = 0.0  # the same instant as Unix time
    addresses: dict[str, tuple[str, int]] | None = None  # the observer's cache of replica URLs

    def attempt(self, replica_id: str, url: str, number: int) -> str | None:
        """An upstream attempt begins: its CLIENT span; the `traceparent` to send with it."""
        trace = self.trace
        if trace is None:
            return None
        if not trace.sampled:
            return trace.begin_attempt("", {})
        host, port = self._address(url)
        attributes: Attributes = {
            sc.SERVER_ADDRESS: host, sc.SERVER_PORT: port, sc.FLEETSERVE_REPLICA_ID: replica_id,
            sc.FLEETSERVE_ATTEMPT: number, sc.LANGFUSE_OBSERVATION_TYPE: "span",
        }  # fmt: skip
        return trace.begin_attempt(f"POST {self.path}", attributes)

    def attempt_failed(self, kind: str, status: int | None = None) -> None:
        if self.trace is not None:
            self.trace.end_attempt(kind, status)

    def answer(self, body: bytes, *, usage: bool = True) -> None:
        """A whole (non-stream) answer came: its usage (unless tenancy reads it) and, for a
        sampled trace, its finish reasons."""
        if usage:
            self.usage = usage_of(body)
        if self.trace is not None and self.trace.sampled:
            self.reasons = finish_reasons_in(body)

    def _address(self, url: str) -> tuple[str, int]:
        cache = self.addresses if self.addresses is not None else {}
        found = cache.get(url)
        if found is None:
            parts = urlsplit(url)
            default = 443 if parts.scheme == "https" else 80
            found = cache[url] = (parts.hostname or "", parts.port or default)
        return found


class CountingSend:
    """The ASGI `send` of one request, counting the body bytes of the answer."""

    __slots__ = ("_observation", "_send")

    def __init__(self, send: Send, observation: Observation) -> None:
        self._send = send
        self._observation = observation

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            self._observation.bytes_out += len(message.get("body", b""))
        await self._send(message)


class Observer:
    """Traces (when `tracing` is set) and access lines (when `access` is) of /v1 requests."""

    def __init__(
        self,
        tracing: Tracing | None,
        access: AccessLog | None,
        prices: Mapping[str, Price],
        engines: Mapping[str, str],
        clock: Clock,
    ) -> None:
        self.tracing = tracing
        self.access = access
        self.prices = dict(prices)
        self.providers = {model: PROVIDERS.get(e, e) for model, e in engines.items()}
        self.clock = clock
        self._addresses: dict[str, tuple[str, int]] = {}

    def begin(
        self,
        scope: Scope,
        info: RequestInfo,
        chat: bool,
        request_id: str,
        body: bytes,
        send: Send,
        exchange: Exchange,
        t0: float,
    ) -> tuple[bytes, Send]:
        """Follow an admitted request: the body to send upstream and the `send` to answer
        with (either may be the one given)."""
        obs = exchange.observed = Observation(request_id, scope["path"], info.model,
                                              info.stream, t0)  # fmt: skip
        tracing = self.tracing
        sampled = False
        if tracing is not None:
            trace = obs.trace = tracing.begin(
                header(scope, b"traceparent"),
                lambda: self._describe(info, chat, request_id),
            )
            sampled = trace.sampled
            if sampled:  # for completion_start_time: the wall clock at t0 + TTFT
                obs.began = self.clock.now()
                obs.began_wall = time.time()
                obs.addresses = self._addresses
        ticket = exchange.ticket
        if info.stream:
            if ticket is None:
                add_usage = not info.include_usage
                if add_usage:
                    body = rewrite_body(body, info, include_usage=True, max_tokens=None)
                obs.tap = ObservedTap(strip=add_usage, reasons=sampled)
            elif sampled and ticket.tap is not None:  # tenancy's tap, reading reasons too
                ticket.tap = ObservedTap(strip=ticket.tap.strip, reasons=True)
        if self.access is not None:
            send = CountingSend(send, obs)
        return body, send

    def _describe(self, info: RequestInfo, chat: bool, request_id: str) -> tuple[str, Attributes]:
        """The SERVER span's name and start attributes (a sampled request only)."""
        operation = sc.OPERATION_CHAT if chat else sc.OPERATION_TEXT_COMPLETION
        attributes: dict[str, str | bool | int] = {
            sc.GEN_AI_OPERATION_NAME: operation,
            sc.GEN_AI_PROVIDER_NAME: self.providers.get(info.model, "fleetserve"),
            sc.GEN_AI_REQUEST_MODEL: info.model,
            sc.GEN_AI_REQUEST_STREAM: info.stream,
            sc.LANGFUSE_OBSERVATION_TYPE: "generation",
            sc.FLEETSERVE_REQUEST_ID: request_id,
        }
        if info.max_tokens is not None:
            attributes[sc.GEN_AI_REQUEST_MAX_TOKENS] = info.max_tokens
        return f"{operation} {info.model}", attributes

    def finish(self, exchange: Exchange, status: int, now: float) -> None:
        """The request is answered: end its spans, write its access line. Never raises
        into the request (the answer is out)."""
        obs = exchange.observed
        if obs is None:
            return
        ticket = exchange.ticket
        usage: tuple[int, int] | None
        tap = ticket.tap if ticket is not None and ticket.tap is not None else obs.tap
        if tap is not None:
            usage = tap.usage
        elif ticket is not None:
            usage = ticket.usage
        else:
            usage = obs.usage
        error_type = _error_type(exchange, status)
        trace = obs.trace
        if trace is not None:
            if trace.sampled:
                reasons = tap.reasons if isinstance(tap, ObservedTap) else obs.reasons
                attributes = self._end_attributes(exchange, obs, status, usage, reasons)
                trace.end_attempt(error_type, exchange.status or None)
                trace.end(attributes, error_type)
            else:
                trace.end({}, error_type)
        access = self.access
        if access is not None:
            ttft = exchange.ttft_s
            access.write({
                "request_id": obs.request_id,
                "trace_id": trace.trace_id_hex if trace is not None else None,
                "tenant": ticket.tenant if ticket is not None else None,
                "model": obs.model, "path": obs.path, "stream": obs.stream,
                "replica": exchange.replica, "attempts": exchange.attempts, "status": status,
                "error": error_type,
                "input_tokens": usage[0] if usage else None,
                "output_tokens": usage[1] if usage else None,
                "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
                "e2e_ms": round((now - obs.t0) * 1000, 3), "bytes": obs.bytes_out,
            })  # fmt: skip

    def refused(self, scope: Scope, exchange: Exchange, status: int) -> None:
        """A request answered before it was admitted (bad body, unknown model, auth, limits)."""
        access = self.access
        if access is None:
            return
        rid = header(scope, b"x-request-id")
        access.write({
            "request_id": rid.decode("latin-1") if rid else None, "trace_id": None,
            "tenant": None, "model": exchange.model, "path": scope["path"], "stream": None,
            "replica": None, "attempts": 0, "status": status, "error": None,
            "input_tokens": None, "output_tokens": None, "ttft_ms": None, "e2e_ms": None,
            "bytes": None,
        })  # fmt: skip

    def _end_attributes(
        self,
        exchange: Exchange,
        obs: Observation,
        status: int,
        usage: tuple[int, int] | None,
        reasons: list[str] | None,
    ) -> Attributes:
        attributes: dict[str, str | int | float | tuple[str, ...]] = {
            sc.HTTP_RESPONSE_STATUS_CODE: status,
        }
        if exchange.replica is not None:
            attributes[sc.FLEETSERVE_REPLICA_ID] = exchange.replica
        if reasons:
            attributes[sc.GEN_AI_RESPONSE_FINISH_REASONS] = tuple(reasons)
        if usage is not None:
            attributes[sc.GEN_AI_USAGE_INPUT_TOKENS] = usage[0]
            attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] = usage[1]
            price = self.prices.get(obs.model)
            if price is not None:
                cost_in = cost_micro_usd(price, usage[0], 0) * MICRO
                cost_out = cost_micro_usd(price, 0, usage[1]) * MICRO
                total = cost_micro_usd(price, *usage) * MICRO
                attributes[sc.GEN_AI_USAGE_COST] = total
                attributes[sc.LANGFUSE_COST_DETAILS] = orjson.dumps(
                    {"input": cost_in, "output": cost_out, "total": total}
                ).decode()
        ttft_s = exchange.ttft_s
        if ttft_s is not None:
            attributes[sc.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = ttft_s
            first_at = obs.began_wall + (obs.t0 + ttft_s - obs.began)
            attributes[sc.LANGFUSE_COMPLETION_START_TIME] = _iso(first_at)
        ticket = exchange.ticket
        if ticket is not None:
            attributes[sc.USER_ID] = ticket.tenant
            attributes[sc.FLEETSERVE_TENANT] = ticket.tenant
        return attributes

    async def close(self) -> None:
        """Write what is queued: access lines now, spans within EXPORT_AT_EXIT_S."""
        if self.access is not None:
            self.access.close()
        if self.tracing is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.tracing.shutdown), EXPORT_AT_EXIT_S)
            except TimeoutError:
                log.warning("traces queued at shutdown were not all exported within %g s",
                            EXPORT_AT_EXIT_S)  # fmt: skip


def _error_type(exchange: Exchange, status: int) -> str | None:
    """The span's `error.type`: why the request did not end well, in a few fixed words."""
    ended = exchange.ended_by
    if ended in ("client_gone", "write_stall") or status == CLIENT_CLOSED:
        return "cancelled"
    if ended == "shutdown":
        return "shutdown"
    if exchange.stream_failed:
        return "upstream_stream_error" if status < 400 else str(status)
    if status >= 500:
        return str(status)
    return None


def _iso(unix_s: float) -> str:
    whole = int(unix_s)
    micros = int((unix_s - whole) * 1e6)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"
