"""The gateway's ASGI app: a raw hot path for the OpenAI endpoints, Starlette for the rest.

The hot path avoids framework objects per request (measured: Starlette's Request/Response
cost about 30% of one worker's throughput here). A watcher on `receive()` cancels the work
when the client disconnects, which also closes the upstream request; the `Watchdog` cancels
it when the client is too slow or the shutdown deadline passes, and the request then answers
as its state allows (408, 503, or an SSE error event). The app runs the lifespan itself, so
a start-up failure (an engine that cannot start) is one line, not a traceback
(`startup_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from starlette.types import ASGIApp

from fleetserve.clock import Clock
from fleetserve.config import GatewaySettings
from fleetserve.errors import (
    ApiError,
    FleetserveError,
    MethodNotAllowedError,
    ModelNotFoundError,
    RequestTimeoutError,
)
from fleetserve.fleet.fleet import Fleet
from fleetserve.gateway.connection import ABORT_EXTENSION, WATCHDOG_STATE
from fleetserve.gateway.dashboard.trail import RequestTrail
from fleetserve.gateway.exchange import Exchange
from fleetserve.gateway.hold import HoldQueue
from fleetserve.gateway.proxy import Proxy
from fleetserve.gateway.shutdown import CONNECTION_CLOSE, Shutdown, shutting_down_error
from fleetserve.gateway.tenancy import TenantGate
from fleetserve.gateway.ticket import Ticket
from fleetserve.gateway.watchdog import Watchdog
from fleetserve.protocol.asgi import (
    ClientGoneError,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_error,
)
from fleetserve.protocol.inspect import inspect_request
from fleetserve.protocol.sse import encode_error_event
from fleetserve.telemetry.metrics import STREAM_ERROR, GatewayMetrics
from fleetserve.telemetry.names import NO_MODEL, OTHER_MODEL
from fleetserve.telemetry.window import LoadWindow, estimate_demand_tokens

if TYPE_CHECKING:
    from fleetserve.gateway.observe import Observer

log = logging.getLogger("fleetserve.gateway")

# path -> is it a chat request
OPENAI_PATHS = {"/v1/chat/completions": True, "/v1/completions": False}
REQUEST_ID_HEADER = b"x-request-id"
CLIENT_CLOSED = 499  # nginx's code for "client closed request", for metrics only
CLOSE = [CONNECTION_CLOSE]

Lifespan = Callable[[], AbstractAsyncContextManager[None]]


async def _watch_disconnect(receive: Receive, exchange: Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            exchange.end("client_gone")
            return


class GatewayApp:
    def __init__(
        self,
        proxy: Proxy,
        fleet: Fleet,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        clock: Clock,
        cold: ASGIApp,
        window: LoadWindow,
        holds: HoldQueue,
        *,
        watchdog: Watchdog,
        shutdown: Shutdown,
        lifespan: Lifespan,
        gate: TenantGate | None = None,
        trail: RequestTrail | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.proxy = proxy
        self.fleet = fleet
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.cold = cold
        self.window = window  # the autoscaler reads load here (same process) or at /admin/load
        self.holds = holds
        self.watchdog = watchdog
        self.shutdown = shutdown
        self.lifespan = lifespan
        self.gate = gate
        self.trail = trail or RequestTrail()  # the live page's: off until a page opens
        self.observer = observer  # traces and access lines (None: both off)
        self.startup_error: FleetserveError | None = None
        self._ids = itertools.count(1)
        # Unique across processes and restarts: the ledger's idempotent write keys on it.
        self._id_prefix = f"fs-{os.urandom(5).hex()}-"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            chat = OPENAI_PATHS.get(scope["path"])
            if chat is not None:
                if scope["method"] == "POST":
                    await self._openai(scope, receive, send, chat)
                else:
                    await send_error(
                        send, MethodNotAllowedError(f"{scope['path']} accepts POST only")
                    )
                return
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.cold(scope, receive, send)

    # -- lifespan -----------------------------------------------------------------------
    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the background services; a FleetserveError at start is kept for the caller
        to print (uvicorn is told without a message, so it logs no traceback) and the server
        exits."""
        await receive()  # lifespan.startup
        state = scope.get("state")
        if isinstance(state, dict):  # the connections find the watchdog here
            state[WATCHDOG_STATE] = self.watchdog
        running = contextlib.AsyncExitStack()
        try:
            await running.enter_async_context(self.lifespan())
        except FleetserveError as exc:
            self.startup_error = exc
            await send({"type": "lifespan.startup.failed", "message": ""})
            return
        # What start-up built (modules, the app, the fleet, the store's engine) lives as long
        # as the process: frozen out of the collector's reach, a full collection scans only
        # what requests made since (CPython's gc.freeze, for servers after their start).
        gc.collect()
        gc.freeze()
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await running.aclose()
        finally:
            await send({"type": "lifespan.shutdown.complete"})

    # -- the hot path ---------------------------------------------------------------------
    async def _openai(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        task = asyncio.current_task()
        assert task is not None
        exchange = Exchange(task=task, reading_since=self.clock.now())
        watched = self.watchdog.open
        watched.add(exchange)
        try:
            await self._serve(scope, receive, send, chat, exchange, task)
        finally:
            watched.discard(exchange)
            if self.observer is not None and exchange.observed is None:  # never admitted
                self.observer.refused(scope, exchange, exchange.status or CLIENT_CLOSED)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        chat: bool,
        exchange: Exchange,
        task: asyncio.Task[None],
    ) -> None:
        try:
            body = await read_body(
                receive, self.settings.max_body_bytes, header(scope, b"content-length")
            )
        except ClientGoneError:
            return
        except ApiError as err:
            await self._reject(send, err, exchange)
            return
        except asyncio.CancelledError:
            if exchange.ended_by is None:
                raise
            task.uncancel()
            exchange.status = await self._ended_early(scope, send, exchange)
            self.metrics.finished("-", exchange.status)
            return
        exchange.reading_since = 0.0
        t0 = self.clock.now()  # the budget, TTFT and e2e count from the end of the body
        gate = self.gate
        principal = None
        try:
            if gate is not None:  # auth before anything about the body is told
                principal = await gate.keys.principal(header(scope, b"authorization"))
            info = inspect_request(body, chat=chat)
            model = info.model
            if not self.fleet.serves(model):
                raise ModelNotFoundError(
                    f"the model {model!r} does not exist; served: {sorted(self.fleet.models())}",
                    param="model",
                )
        except ApiError as err:
            if gate is not None and principal is None:
                gate.rejected_key()
            await self._reject(send, err, exchange)
            return
        exchange.model = model
        rid = header(scope, b"x-request-id")
        ticket: Ticket | None = None
        if gate is not None:
            assert principal is not None
            request_id = f"{self._id_prefix}{next(self._ids)}"  # the client's may repeat
            try:
                ticket = await gate.admit(principal, info, body, request_id)
            except ApiError as err:
                await self._reject(send, err, exchange)
                return
            body = ticket.body
            exchange.ticket = ticket
            exchange.extra_headers = gate.headers(ticket)
        else:
            request_id = rid.decode("latin-1") if rid else f"{self._id_prefix}{next(self._ids)}"
            exchange.extra_headers = ((REQUEST_ID_HEADER, request_id.encode("latin-1")),)
        observer = self.observer
        if observer is not None:
            body, send = observer.begin(scope, info, chat, request_id, body, send, exchange, t0)
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, exchange))
        counted = self.metrics.of(model)
        counted.in_flight += 1
        self.window.arrived(model, t0, estimate_demand_tokens(len(body), info.max_tokens))
        status = 500
        try:
            await self.proxy.forward(info, scope["path"], body, request_id, send, t0, exchange)
            exchange.finishing = True
            status = exchange.status
        except ApiError as err:
            exchange.finishing = True
            status = err.status
            extra = [*exchange.extra_headers, *(CLOSE if self.shutdown.draining else ())]
            await send_error(send, err, extra)
        except asyncio.CancelledError:
            if exchange.ended_by is None:
                raise
            task.uncancel()
            exchange.finishing = True
            status = await self._ended_early(scope, send, exchange)
        finally:
            watcher.cancel()
            counted.in_flight -= 1
            now = self.clock.now()
            self.window.finished(model, now)
            ok = 200 <= status < 300
            if ok and exchange.stream_failed:  # a 200 head, then an error event
                counted.finished(STREAM_ERROR)
            else:
                counted.finished(status, now - t0 if ok else None)
            if self.trail.on:
                self.trail.add(request_id, exchange, status, now - t0, now)
            if observer is not None:
                observer.finish(exchange, status, now)
            if ticket is not None:
                assert gate is not None
                await self._account(gate, ticket, exchange, status, now - t0)

    async def _account(
        self, gate: TenantGate, ticket: Ticket, exchange: Exchange, status: int, e2e_s: float
    ) -> None:
        """Settle and write the ledger row; never raises (the answer is already out)."""
        try:
            await gate.finish(
                ticket, model=exchange.model, replica=exchange.replica, status=status,
                cancelled=status == CLIENT_CLOSED or exchange.ended_by is not None,
                failed=exchange.stream_failed, queue_s=exchange.hold_s, ttft_s=exchange.ttft_s,
                e2e_s=e2e_s,
            )  # fmt: skip
        except Exception:
            log.exception("accounting of request %s failed", ticket.request_id)

    async def _reject(self, send: Send, err: ApiError, exchange: Exchange) -> None:
        """A request refused before it reached a replica: counted, not timed."""
        exchange.finishing = True
        exchange.reading_since = 0.0
        exchange.status = err.status
        await send_error(send, err, CLOSE if self.shutdown.draining else None)
        if self.fleet.serves(exchange.model):
            model = exchange.model
        else:  # bounded labels: a model the fleet does not serve is `other`
            model = OTHER_MODEL if isinstance(err, ModelNotFoundError) else NO_MODEL
        self.metrics.finished(model, err.status)

    async def _ended_early(self, scope: Scope, send: Send, exchange: Exchange) -> int:
        """Answer a request the watchdog or the client ended; the status to count."""
        exchange.finishing = True
        reason = exchange.ended_by
        if reason == "body_timeout":
            err = RequestTimeoutError(
                f"the request body did not arrive within {self.settings.timeouts.body_read_s:g} s"
            )
            await send_error(send, err, CLOSE)
            return err.status
        if reason == "write_stall":
            abort = scope.get("extensions", {}).get(ABORT_EXTENSION)
            if abort is not None:
                abort()  # nothing more can be written to it
            return CLIENT_CLOSED
        if reason == "shutdown":
            gone = shutting_down_error(self.settings.retry_after_s)
            if not exchange.head_sent:
                await send_error(send, gone, CLOSE)
            else:
                event = encode_error_event(gone)
                await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                exchange.stream_failed = True
            return gone.status
        return CLIENT_CLOSED  # client_gone
