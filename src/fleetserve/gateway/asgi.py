"""The gateway's ASGI app: a raw hot path for the OpenAI endpoints, Starlette for the rest.

The hot path avoids framework objects per request (measured: Starlette's Request/Response
cost about 30% of one worker's throughput here). A watcher on `receive()` cancels the work
when the client disconnects, which also closes the upstream request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

from starlette.types import ASGIApp

from fleetserve.clock import Clock
from fleetserve.config import GatewaySettings
from fleetserve.errors import ApiError, MethodNotAllowedError, ModelNotFoundError
from fleetserve.fleet.fleet import Fleet
from fleetserve.gateway.hold import HoldQueue
from fleetserve.gateway.proxy import Proxy
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
from fleetserve.telemetry.metrics import GatewayMetrics
from fleetserve.telemetry.window import LoadWindow, estimate_demand_tokens

log = logging.getLogger("fleetserve.gateway")

# path -> is it a chat request
OPENAI_PATHS = {"/v1/chat/completions": True, "/v1/completions": False}
CLIENT_CLOSED = 499  # nginx's code for "client closed request", for metrics only


class _Guard:
    __slots__ = ("disconnected", "finishing")

    def __init__(self) -> None:
        self.disconnected = False
        self.finishing = False


async def _watch_disconnect(receive: Receive, task: asyncio.Task[None], guard: _Guard) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not guard.finishing:
                guard.disconnected = True
                task.cancel()
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
    ) -> None:
        self.proxy = proxy
        self.fleet = fleet
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.cold = cold
        self.window = window  # the autoscaler reads load here (same process) or at /admin/load
        self.holds = holds
        self._ids = itertools.count(1)
        self._id_prefix = f"fs-{os.getpid():x}-"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            chat = OPENAI_PATHS.get(scope["path"])
            if chat is not None:
                if scope["method"] == "POST":
                    await self._openai(scope, receive, send, chat)
                else:
                    await send_error(
                        send, MethodNotAllowedError(f"{scope['path']} accepts POST only")
                    )
                return
        await self.cold(scope, receive, send)

    async def _openai(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        t0 = self.clock.now()
        model = "-"
        status = 500
        try:
            body = await read_body(
                receive, self.settings.max_body_bytes, header(scope, b"content-length")
            )
            info = inspect_request(body, chat=chat)
            model = info.model
            if not self.fleet.serves(model):
                raise ModelNotFoundError(
                    f"the model {model!r} does not exist; served: {sorted(self.fleet.models())}",
                    param="model",
                )
        except ClientGoneError:
            return
        except ApiError as err:
            await send_error(send, err)
            self.metrics.finished(model if self.fleet.serves(model) else "-", err.status, 0.0)
            return
        rid = header(scope, b"x-request-id")
        request_id = rid.decode("latin-1") if rid else f"{self._id_prefix}{next(self._ids)}"
        task = asyncio.current_task()
        assert task is not None
        guard = _Guard()
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, task, guard))
        gauge = self.metrics.in_flight_child(model)
        gauge.inc()
        self.window.arrived(model, t0, estimate_demand_tokens(len(body), info.max_tokens))
        try:
            outcome = await self.proxy.forward(info, scope["path"], body, request_id, send, t0)
            guard.finishing = True
            status = outcome.status
        except ApiError as err:
            guard.finishing = True
            status = err.status
            await send_error(send, err)
        except asyncio.CancelledError:
            if not guard.disconnected:
                raise
            status = CLIENT_CLOSED
            task.uncancel()
        finally:
            watcher.cancel()
            gauge.dec()
            now = self.clock.now()
            self.window.finished(model, now)
            self.metrics.finished(model, status, now - t0)
