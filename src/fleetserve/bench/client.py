"""Send one bench request and measure it into a `RequestRecord`.

Times are offsets (s) from the run's start on one injected clock. The transport stamps every
read of the body as it arrives (`transport.http1`, `stamp=clock.now`), so a chunk's time is
when its bytes came off the socket, not when this task got round to parsing them.

What counts (vLLM's benchmark definitions):
- first token: the first SSE event that carries generated output
  (`protocol.sse.chunk_has_content`: a delta's `content`, `reasoning_content`, `reasoning` or
  `tool_calls` for chat, `text` for completions). The role-only first chunk and the usage
  chunk do not count. Every text-bearing event's arrival is kept.
- tokens: from the final `usage` chunk (`tokens_from_usage=True`); without one, the number of
  text-bearing events (`False`: one event may carry several tokens).
- non-stream requests have no first token: `first_token_s` stays None and TTFT is undefined.
- `sent_s` is when this task handed the request to the transport (a new connection's connect
  time counts as latency, not as lag).

Failures become error kinds (`records.ErrorKind`): connect, timeout (the total timeout, from
send to the last byte, for every request; for streams also the idle timeout, for the head and
between reads), http_4xx/http_5xx (with the OpenAI error message), stream_error
(a `data: {"error": ...}` event, or the stream ending without `data: [DONE]`), disconnect,
protocol, cancelled. Nothing is raised out of `send` except the task's own cancellation.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson

from fleetserve.bench.records import ErrorKind, RequestRecord
from fleetserve.bench.workload import BuiltRequest
from fleetserve.clock import Clock
from fleetserve.config import IDLE_TIMEOUT_S
from fleetserve.errors import (
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeoutError,
)
from fleetserve.protocol.sse import SseDecoder, chunk_has_content
from fleetserve.transport.http1 import Http1Client, Response

REPLICA_HEADER = "x-fleetserve-replica"
REMAINING_REQUESTS_HEADER = "x-ratelimit-remaining-requests"  # OpenAI's, when limits apply
REMAINING_TOKENS_HEADER = "x-ratelimit-remaining-tokens"
ERROR_BODY_LIMIT = 64 * 1024  # bytes of a non-2xx body read for its error message
MAX_POOLED = 65_536  # keep-alive connections kept per origin: one per concurrent stream


@dataclass(frozen=True, slots=True)
class ClientSettings:
    base_url: str  # http://host:port, with or without a trailing /v1
    api_key: str | None = field(default=None, repr=False)  # sent as Authorization: Bearer
    total_timeout_s: float = 600.0  # a whole request, from send to its last byte (both kinds)
    idle_timeout_s: float = IDLE_TIMEOUT_S  # a stream's head, and between its reads
    connect_timeout_s: float = 10.0


class _FailedError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message


class BenchClient:
    """One per bench run: a pooled HTTP/1.1 client and the run's clock."""

    def __init__(self, settings: ClientSettings, clock: Clock, *, t0: float) -> None:
        base = settings.base_url.rstrip("/")
        self.base_url = base[:-3] if base.endswith("/v1") else base
        self.settings = settings
        self.clock = clock
        self.t0 = t0  # the run's start on `clock`
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.http = Http1Client(
            settings.connect_timeout_s,
            max_idle_per_origin=MAX_POOLED,
            headers=headers,
            stamp=clock.now,
            capture_headers=(REPLICA_HEADER, REMAINING_REQUESTS_HEADER, REMAINING_TOKENS_HEADER),
        )
        self._urls: dict[str, str] = {}

    async def close(self) -> None:
        await self.http.close()

    async def send(self, request: BuiltRequest, record: RequestRecord) -> None:
        """Send `request` now and fill `record` in place (times, tokens, status, error)."""
        url = self._urls.get(request.path) or self._urls.setdefault(
            request.path, self.base_url + request.path
        )
        clock, t0, settings = self.clock, self.t0, self.settings
        record.sent_s = clock.now() - t0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.total_timeout_s
        # A stream's head has the idle bound (then each read, within the total); a non-stream
        # answer arrives whole, head and body, so only the total bounds it.
        head_s = settings.total_timeout_s
        if request.stream:
            head_s = min(settings.idle_timeout_s, head_s)
        response: Response | None = None
        try:
            response = await self.http.request(
                url, request.body, f"bench-{record.index}", head_s, stream=request.stream
            )
            record.status = response.status
            headers = response.headers
            record.replica = headers.get(REPLICA_HEADER)
            if headers:
                record.ratelimit_remaining_requests = _count(headers, REMAINING_REQUESTS_HEADER)
                record.ratelimit_remaining_tokens = _count(headers, REMAINING_TOKENS_HEADER)
            if not 200 <= response.status < 300:
                await self._http_error(response, record)
            elif request.stream:
                await self._stream(response, record, deadline)
            else:
                self._buffered(response, record)
            response.finish()
            response = None
        except asyncio.CancelledError:
            _fail(record, "cancelled", "still in flight when the run ended", clock.now() - t0)
            raise
        except _FailedError as failure:
            _fail(record, failure.kind, failure.message, clock.now() - t0)
        except UpstreamError as error:
            kind, message = _classify(error, deadline <= loop.time(), settings)
            _fail(record, kind, message, clock.now() - t0)
        finally:
            if response is not None:
                response.abort()

    async def _stream(self, response: Response, record: RequestRecord, deadline: float) -> None:
        if not (response.content_type or "").startswith("text/event-stream"):
            raise _FailedError("protocol", f"expected an SSE stream, got {response.content_type!r}")
        loop = asyncio.get_running_loop()
        idle_s = self.settings.idle_timeout_s
        events = SseDecoder()
        done = False
        t0 = self.t0
        times = record.token_times_s
        last = record.sent_s
        while True:
            wait_s = min(idle_s, max(deadline - loop.time(), 0.0))
            parts, stamps = await response.next_parts(wait_s, "idle")
            if not parts:
                break
            for part, stamp in zip(parts, stamps, strict=True):
                last = stamp - t0
                for payload in events.feed(part):
                    if done:
                        continue
                    if payload == b"[DONE]":
                        done = True
                    elif _event(payload, record):
                        times.append(last)
        record.end_s = last
        if times:
            record.first_token_s = times[0]
        if record.output_tokens is None:
            record.output_tokens = len(times)
        if not done and record.error_kind is None:
            raise _FailedError("stream_error", "the stream ended without data: [DONE]")

    def _buffered(self, response: Response, record: RequestRecord) -> None:
        record.end_s = self.clock.now() - self.t0
        try:
            body = orjson.loads(response.body())
        except orjson.JSONDecodeError:
            raise _FailedError("protocol", "the response is not JSON") from None
        if not isinstance(body, dict):
            raise _FailedError("protocol", "the response is not a JSON object")
        if body.get("error") is not None:
            raise _FailedError("stream_error", _error_message(body))
        _usage(body.get("usage"), record)

    async def _http_error(self, response: Response, record: RequestRecord) -> None:
        status = response.status
        try:
            body = await response.read(self.settings.idle_timeout_s, ERROR_BODY_LIMIT)
        except UpstreamError:
            body = b""
        message = f"HTTP {status}"
        try:
            parsed = orjson.loads(body)
            if isinstance(parsed, dict):
                message = f"HTTP {status}: {_error_message(parsed)}"
                record.error_code = _error_code(parsed)
        except orjson.JSONDecodeError:
            if body.strip():
                message = f"HTTP {status}: {body[:200].decode('utf-8', 'replace').strip()}"
        raise _FailedError("http_4xx" if status < 500 else "http_5xx", message)


def _event(payload: bytes, record: RequestRecord) -> bool:
    """Read one event's JSON into `record`; True when it carries generated text."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise _FailedError("protocol", f"an SSE event is not JSON: {payload[:80]!r}") from None
    if type(event) is not dict:
        raise _FailedError("protocol", f"an SSE event is not a JSON object: {payload[:80]!r}")
    if event.get("error") is not None:
        if record.error_kind is None:
            record.error_kind, record.error = "stream_error", _error_message(event)
        return False
    usage = event.get("usage")
    if usage:
        _usage(usage, record)
    return chunk_has_content(event)


def _usage(usage: Any, record: RequestRecord) -> None:
    if type(usage) is not dict:
        return
    completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    if type(completion) is int:
        record.output_tokens = completion
        record.tokens_from_usage = True
    if type(prompt) is int:
        record.prompt_tokens = prompt


def _error_message(body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return str(body.get("message") or body)[:200]


def _error_code(body: dict[str, Any]) -> str | None:
    """OpenAI's error `code` (`rate_limit_exceeded`, ...), else its `type`."""
    error = body.get("error")
    if not isinstance(error, dict):
        return None
    for name in ("code", "type"):
        value = error.get(name)
        if isinstance(value, str) and value:
            return value[:64]
    return None


def _count(headers: dict[str, str], name: str) -> int | None:
    """A whole-number header, or None when absent or not a number."""
    value = headers.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _fail(record: RequestRecord, kind: ErrorKind, message: str, now_s: float) -> None:
    if record.error_kind is None or kind == "cancelled":
        record.error_kind, record.error = kind, message
    record.end_s = now_s
    if record.token_times_s and record.first_token_s is None:
        record.first_token_s = record.token_times_s[0]


def _classify(
    error: UpstreamError, total_expired: bool, settings: ClientSettings
) -> tuple[ErrorKind, str]:
    if isinstance(error, UpstreamTimeoutError):
        if error.phase == "connect":
            return "connect", f"connect timed out after {settings.connect_timeout_s} s"
        if total_expired:
            return "timeout", f"no complete response within {settings.total_timeout_s} s"
        what = "response head" if error.phase == "first_byte" else "next chunk"
        return "timeout", f"no {what} within {settings.idle_timeout_s} s (idle timeout)"
    if isinstance(error, UpstreamConnectError):
        return "connect", str(error)
    if isinstance(error, UpstreamClosedError):
        text = str(error)
        return ("protocol" if "malformed" in text or " over " in text else "disconnect"), text
    return "protocol", str(error)
