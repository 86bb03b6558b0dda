"""The SIMULATED engine's HTTP surface: a raw ASGI app, no framework on any route.

It is the "direct" baseline of gateway overhead benchmarks, so every request costs only what
it must: one pydantic validation, the planned text, one orjson dump (and a body seen recently
reuses its plan, see `api.PlanCache`). A framework's routing and request objects cost about
30% of throughput here.

Routes: POST /v1/chat/completions and /v1/completions, GET /v1/models and /health (all 503
until the simulated cold start is over, when a real vLLM would not listen yet), /metrics
(vLLM's names), /version, and POST /tokenize (vLLM's: the prompt's token count). A client
that disconnects aborts its request inside the engine, freeing its batch slot and KV blocks,
as vLLM does.

The HTTP server may stamp in the scope, under `RECEIVED_S`, when it began parsing a request
(`serve.stamping_protocol` does): the request log then counts arrival from there.

Simulation only: `GET /sim/requests` (`?since=ID&limit=N`) is the server's own timing of each
finished request and `DELETE /sim/requests` clears it (`fleetserve.engines.sim.request_log`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import urllib.parse
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fleetserve import __version__
from fleetserve.engines.sim.api import Job, PlanCache, StreamEvents, completion_body
from fleetserve.engines.sim.batching import CapacityError
from fleetserve.engines.sim.engine import SeqHandle, SimEngine
from fleetserve.engines.sim.request_log import DEFAULT_CAPACITY, RequestLog
from fleetserve.engines.sim.text import TextSource
from fleetserve.errors import (
    ApiError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
)
from fleetserve.protocol.asgi import (
    ClientGoneError,
    Message,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_bytes,
    send_error,
)
from fleetserve.protocol.envelope import api_error_body

MAX_BODY_BYTES = 32 * 1024 * 1024
# Scope key: the serving clock's time when the HTTP parser began the request (set by the server).
RECEIVED_S = "fleetserve.received_s"
REQUEST_LOG_PATH = "/sim/requests"
OWNED_BY = "fleetserve-sim"
SERVER_HEADER = (b"server", b"fleetserve-sim (simulated vLLM)")
JSON_TYPE = (b"content-type", b"application/json")
SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    SERVER_HEADER,
)


@dataclass(frozen=True, slots=True)
class Stamps:
    """When a request reached the server (see `request_log`), and who the client says it is."""

    arrival_s: float
    body_read_s: float
    request_id: str | None


class EngineUnavailableError(ApiError):
    """The simulated engine is still in its cold start, or shutting down."""

    status = 503
    error_type = "server_error"
    code = "engine_unavailable"


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes = JSON_TYPE[1]
) -> None:
    await send_bytes(send, status, body, content_type, [SERVER_HEADER])


async def _respond_error(send: Send, err: ApiError) -> None:
    await send_error(send, err, [SERVER_HEADER])


class SimServer:
    """ASGI app over one SimEngine. Its lifespan starts and stops the engine."""

    def __init__(
        self,
        engine: SimEngine,
        *,
        engine_seed: int = 0,
        request_log_capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        self.engine = engine
        self.engine_seed = engine_seed
        self.requests = RequestLog(request_log_capacity)
        self._id_prefix = os.urandom(6).hex()
        self._ids = itertools.count()
        self._created = int(engine.clock.wall())
        self._plans = PlanCache(
            model=engine.model_name,
            profile=engine.profile,
            source=TextSource(),
            engine_seed=engine_seed,
        )
        self._get_routes: dict[str, Callable[[Send], Awaitable[None]]] = {
            "/health": self._health,
            "/metrics": self._metrics,
            "/v1/models": self._models,
            "/version": self._version,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.engine.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.engine.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path in ("/v1/chat/completions", "/v1/completions"):
            if method != "POST":
                await _respond_error(send, _method_not_allowed(method, path))
                return
            await self._completion(path == "/v1/chat/completions", scope, receive, send)
            return
        if path == "/tokenize":
            if method != "POST":
                await _respond_error(send, _method_not_allowed(method, path))
                return
            await self._tokenize(receive, send)
            return
        if path == REQUEST_LOG_PATH:
            await self._request_log(method, scope.get("query_string", b""), send)
            return
        handler = self._get_routes.get(path)
        if handler is None:
            await _respond_error(send, NotFoundError(f"no route {path}"))
        elif method not in ("GET", "HEAD"):
            await _respond_error(send, _method_not_allowed(method, path))
        else:
            await handler(send)

    async def _health(self, send: Send) -> None:
        left = self.engine.cold_start_left_s()
        if left > 0:
            await _respond_error(send, _starting(left))
        else:
            await _respond(send, 200, b"")

    async def _metrics(self, send: Send) -> None:
        body = generate_latest(self.engine.registry)
        await _respond(send, 200, body, CONTENT_TYPE_LATEST.encode())

    async def _models(self, send: Send) -> None:
        engine = self.engine
        if not engine.ready:
            await _respond_error(send, _starting(engine.cold_start_left_s()))
            return
        profile = engine.profile
        card = {
            "id": engine.model_name,
            "object": "model",
            "created": self._created,
            "owned_by": OWNED_BY,
            "root": engine.model_name,
            "parent": None,
            "max_model_len": profile.max_model_len,
            "simulated": True,
            "simulation": {
                "profile": profile.name,
                "note": "fleetserve engine sim: a SIMULATED vLLM replica. No model runs; the "
                "text is synthetic and the timing comes from a latency model. "
                + profile.description,
            },
        }
        await _respond(send, 200, orjson.dumps({"object": "list", "data": [card]}))

    async def _version(self, send: Send) -> None:
        body = orjson.dumps({"version": f"fleetserve-sim {__version__}", "simulated": True})
        await _respond(send, 200, body)

    async def _request_log(self, method: str, query: bytes, send: Send) -> None:
        if method == "DELETE":
            await _respond(send, 200, orjson.dumps({"cleared": self.requests.clear()}))
        elif method in ("GET", "HEAD"):
            try:
                since, limit = _log_query(query)
            except InvalidRequestError as err:
                await _respond_error(send, err)
                return
            await _respond(send, 200, orjson.dumps(self.requests.page(since, limit)))
        else:
            await _respond_error(send, _method_not_allowed(method, REQUEST_LOG_PATH))

    def _log_request(
        self,
        job: Job,
        handle: SeqHandle,
        stamps: Stamps,
        writes: tuple[float | None, float | None, int],
        output_tokens: int,
        finish_reason: str,
    ) -> None:
        seq = handle.seq
        first_write, last_write, n_writes = writes
        self.requests.record(
            stamps.arrival_s, first_write, last_write, n_writes, seq.first_token_s,
            seq.finished_s, len(job.plan.prompt), output_tokens, finish_reason, job.plan.stream,
            stamps.request_id, stamps.body_read_s,
        )  # fmt: skip

    async def _tokenize(self, receive: Receive, send: Send) -> None:
        """vLLM's POST /tokenize: `{"model", "messages"}` (chat template applied) or
        `{"model", "prompt"}` -> `{"count", "max_model_len", "tokens"}`; the gateway counts a
        cancelled stream's prompt with it. Token ids are stable hashes of the token texts."""
        try:
            body = await read_body(receive, MAX_BODY_BYTES)
            plan = self._plans.plan(body, chat=b'"messages"' in body)
        except ApiError as err:
            await _respond_error(send, err)
            return
        except ClientGoneError:
            return
        tokens = [zlib.crc32(str(t).encode()) % 50_000 for t in plan.prompt]
        answer = {
            "count": len(tokens),
            "max_model_len": self.engine.profile.max_model_len,
            "tokens": tokens,
        }
        await _respond(send, 200, orjson.dumps(answer))

    async def _completion(self, chat: bool, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self.engine
        clock = engine.clock
        try:
            if not engine.ready:
                raise _starting(engine.cold_start_left_s())
            body = await read_body(receive, MAX_BODY_BYTES)
            body_read_s = clock.now()
            received_s: float | None = scope.get(RECEIVED_S)
            request_id = header(scope, b"x-request-id")
            stamps = Stamps(
                body_read_s if received_s is None else received_s,
                body_read_s,
                None if request_id is None else request_id.decode("latin-1"),
            )
            plan = self._plans.plan(body, chat=chat)
            prefix = "chatcmpl-" if chat else "cmpl-"
            job = Job(plan, f"{prefix}{self._id_prefix}{next(self._ids):x}", int(clock.wall()))
            try:
                handle = engine.submit(
                    plan.prompt, plan.output.steps, plan.output.finish_reason, stream=plan.stream
                )
            except CapacityError as exc:
                raise InvalidRequestError(str(exc), param="max_tokens") from None
        except ApiError as err:
            await _respond_error(send, err)
            return
        except ClientGoneError:
            return
        if plan.stream:
            await self._stream(job, handle, receive, send, stamps)
            return
        if not handle.finished and not await self._until_finished(handle, receive):
            self._log_request(job, handle, stamps, (None, None, 0), 0, "disconnect")
            return
        if handle.seq.finish_reason == "abort":
            await _respond_error(send, EngineUnavailableError("the engine is shutting down"))
            self._log_request(job, handle, stamps, (None, None, 0), 0, "abort")
            return
        await _respond(send, 200, completion_body(job))
        written = clock.now()
        pieces = len(plan.output.pieces)
        reason = plan.output.finish_reason
        self._log_request(job, handle, stamps, (written, written, 1), pieces, reason)

    async def _until_finished(self, handle: SeqHandle, receive: Receive) -> bool:
        """Wait for the request to finish; False (and abort it) if the client leaves first."""
        disconnect = asyncio.ensure_future(receive())
        try:
            while not handle.finished:
                await asyncio.wait(
                    (handle.progress(), disconnect), return_when=asyncio.FIRST_COMPLETED
                )
                if disconnect.done():
                    self.engine.abort(handle)
                    return False
            return True
        finally:
            disconnect.cancel()

    async def _stream(
        self, job: Job, handle: SeqHandle, receive: Receive, send: Send, stamps: Stamps
    ) -> None:
        """One SSE event per token, sent as the engine produces them.

        Tokens that arrived together (all of them, under `instant`) go out in one write. The
        first and the last write times go to the request log. A wake-up is one future per
        step: the client's disconnect (watched once per request) wakes the same future, so no
        `asyncio.wait` is needed per token.
        """
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        now = self.engine.clock.now
        render = StreamEvents(job)
        events = job.plan.events
        sent = 0
        first_write: float | None = None
        last_write: float | None = None
        writes = 0
        reason = "disconnect"
        disconnect: asyncio.Future[Message] = asyncio.ensure_future(receive())
        disconnect.add_done_callback(lambda _: handle.notify())
        try:
            while not disconnect.done():
                finished = handle.finished
                if finished and handle.seq.finish_reason == "abort":
                    reason = "abort"
                    err = EngineUnavailableError("the engine is shutting down")
                    body = b"data: " + api_error_body(err) + b"\n\n"
                    await send({"type": "http.response.body", "body": body})
                    return
                ready = events if finished else min(handle.generated, events - 1)
                if ready <= sent:
                    await handle.progress()
                    continue
                chunk = render.events(sent, ready)
                sent = ready
                if sent == events:
                    await send({"type": "http.response.body", "body": chunk + render.end()})
                    last_write = now()
                    first_write = last_write if first_write is None else first_write
                    writes += 1
                    reason = job.plan.output.finish_reason
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                last_write = now()
                first_write = last_write if first_write is None else first_write
                writes += 1
        finally:
            disconnect.cancel()
            if not handle.finished:
                self.engine.abort(handle)
            tokens = min(sent, len(job.plan.output.pieces))
            self._log_request(
                job, handle, stamps, (first_write, last_write, writes), tokens, reason
            )


def _log_query(query: bytes) -> tuple[int, int | None]:
    """`since` and `limit` from the request log's query string (both optional integers)."""
    since, limit = 0, None
    for name, raw in urllib.parse.parse_qsl(query.decode("latin-1")):
        if name not in ("since", "limit"):
            continue
        if not raw.isdigit():
            raise InvalidRequestError(f"{name} must be a non-negative integer", param=name)
        if name == "since":
            since = int(raw)
        else:
            limit = int(raw)
    return since, limit


def _method_not_allowed(method: str, path: str) -> ApiError:
    return MethodNotAllowedError(f"method {method} is not allowed on {path}")


def _starting(left_s: float) -> EngineUnavailableError:
    return EngineUnavailableError(
        f"the simulated engine is starting (cold start, {left_s:.1f} s left)",
        headers={"retry-after": str(max(1, round(left_s)))},
    )
