"""Run a real gateway (uvicorn, real sockets) inside the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fleetserve.config import FleetFile, GatewaySettings
from fleetserve.fleet.fleet import Fleet
from fleetserve.fleet.processes import free_port
from fleetserve.gateway.app import build_gateway
from fleetserve.gateway.asgi import GatewayApp
from fleetserve.gateway.serve import GatewayServer, make_server

START_TIMEOUT_S = 10.0


async def wait_until(
    condition: Callable[[], bool], timeout_s: float = 5.0, poll_s: float = 0.02
) -> None:
    """Poll a condition in a bounded loop; TimeoutError if it never holds."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the condition is not an event we own
            await asyncio.sleep(poll_s)


class RunningGateway:
    def __init__(self, app: GatewayApp, url: str, server: GatewayServer) -> None:
        self.app = app
        self.url = url
        self.server = server

    @property
    def fleet(self) -> Fleet:
        return self.app.fleet


@contextlib.asynccontextmanager
async def running_gateway(
    fleet_file: FleetFile, settings: GatewaySettings | None = None
) -> AsyncIterator[RunningGateway]:
    settings = settings or GatewaySettings()
    port = free_port()
    settings = settings.model_copy(update={"port": port, "host": "127.0.0.1"})
    app = build_gateway(settings, fleet_file)
    server = make_server(app, settings)
    server.config.loop = "none"  # the test's own event loop
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("gateway exited during start-up")
                await asyncio.sleep(0.01)
        yield RunningGateway(app, f"http://127.0.0.1:{port}", server)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
