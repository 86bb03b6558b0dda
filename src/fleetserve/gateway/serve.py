"""Runs the gateway under uvicorn: one worker in-process, or N worker processes on one port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from types import FrameType

import uvicorn

from fleetserve.config import FleetFile, GatewaySettings
from fleetserve.gateway.app import build_gateway
from fleetserve.gateway.asgi import GatewayApp
from fleetserve.gateway.connection import GatewayHttpProtocol
from fleetserve.gateway.workers import run_workers
from fleetserve.telemetry.logs import configure_logging

log = logging.getLogger("fleetserve.gateway")

UVICORN_FAST = {
    "loop": "uvloop", "http": GatewayHttpProtocol, "access_log": False, "lifespan": "on",
}  # fmt: skip
# uvicorn waits this much longer than the grace before it cancels what is left, so the app
# ends open streams itself first, with an SSE error event rather than a cut body.
UVICORN_GRACE_MARGIN_S = 5.0


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Make SIGTERM raise KeyboardInterrupt, like Ctrl-C, so callers clean up in `finally`.

    uvicorn handles both signals while it serves, then restores the previous handlers and
    raises the signal again; with the default SIGTERM handler that kills the process before
    any `finally` runs (and before `up` stops its engines).
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class GatewayServer(uvicorn.Server):
    """uvicorn's server with the gateway's graceful shutdown (gateway/shutdown.py).

    The first SIGTERM or SIGINT begins it: the app stops being ready and answers what it holds,
    and after `shutdown_delay_s` (none for SIGINT: Ctrl-C has no load balancer to wait for)
    the server stops accepting, while in-flight requests get until the grace deadline. A
    second signal ends every open request now; a third stops without waiting, as uvicorn's
    second signal does.
    """

    def __init__(self, config: uvicorn.Config, app: GatewayApp) -> None:
        super().__init__(config)
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        loop = self._loop
        if loop is None or self._signals > 2:
            self._captured_signals.append(sig)
            self.should_exit = self.force_exit = True
            return
        if self._signals == 1:
            self._captured_signals.append(sig)
            delay_s = 0.0 if sig == signal.SIGINT else None
            loop.call_soon_threadsafe(self.drain, delay_s)
        else:
            loop.call_soon_threadsafe(self.app.shutdown.deadline_passed)

    def drain(self, delay_s: float | None = None) -> None:
        """Begin the graceful shutdown; stop accepting after `delay_s` (default: the
        settings' `shutdown_delay_s`). Runs in the event loop."""
        settings = self.app.settings
        if delay_s is None:
            delay_s = settings.shutdown_delay_s
        delay_s = min(delay_s, settings.shutdown_grace_s)
        self.app.shutdown.begin()
        in_flight = len(self.app.watchdog.open)
        if in_flight:
            log.warning("%d request(s) in flight; a second signal ends them now", in_flight)
        assert self._loop is not None
        self._loop.call_later(delay_s, self._stop_accepting)

    def _stop_accepting(self) -> None:
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # However the server was told to stop, requests get the rest of the grace period
        # (uvicorn's own wait is a little longer, so the app ends them first, in-stream).
        shutdown = self.app.shutdown
        shutdown.begin()
        deadline = shutdown.deadline
        assert deadline is not None
        left_s = max(deadline - self.app.clock.now(), 0.0)
        self.config.timeout_graceful_shutdown = left_s + UVICORN_GRACE_MARGIN_S  # type: ignore[assignment]
        await super().shutdown(sockets)


def run_gateway(settings: GatewaySettings, fleet_file: FleetFile) -> None:
    """Serve until SIGINT/SIGTERM, then raise KeyboardInterrupt. Blocks."""
    configure_logging(settings.log_format, settings.log_level)
    with terminate_as_interrupt():
        _run(settings, fleet_file)


def serve_app(app: GatewayApp, settings: GatewaySettings) -> None:
    """Serve a pre-built app (one worker, this process) until SIGINT/SIGTERM, then raise
    KeyboardInterrupt. Blocks; for a composition root that built the app with its hooks.

    A FleetserveError at start-up (an engine that cannot start) is raised as it was."""
    with terminate_as_interrupt():
        _serve(make_server(app, settings))


def make_server(app: GatewayApp, settings: GatewaySettings) -> GatewayServer:
    """A server for a pre-built app, to `await server.serve()` in a running loop.

    Set `server.should_exit = True` to stop it; the app's lifespan then stops its services.
    """
    configure_logging(settings.log_format, settings.log_level)
    config = uvicorn.Config(app, **_common(settings))  # type: ignore[arg-type]
    # uvicorn configured its loggers just now; the start-up failure is the app's to tell.
    logging.getLogger("uvicorn.error").addFilter(_StartupFailedFilter(app))
    return GatewayServer(config, app)


class _StartupFailedFilter(logging.Filter):
    """Drops uvicorn's "Application startup failed" line when the app keeps the reason to
    print it as one clear error itself."""

    def __init__(self, app: GatewayApp) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return self.app.startup_error is None or not record.getMessage().startswith(
            "Application startup failed"
        )


def _serve(server: GatewayServer) -> None:
    try:
        server.run()
    except SystemExit:
        if server.app.startup_error is not None:
            raise server.app.startup_error from None
        raise


def _common(settings: GatewaySettings) -> dict[str, object]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": settings.shutdown_grace_s + UVICORN_GRACE_MARGIN_S,
        "proxy_headers": False,  # no X-Forwarded-* rewriting: one middleware less per request
        **UVICORN_FAST,
        # json: the process's logging is configured already (telemetry/logs.py), uvicorn's too
        **({"log_config": None} if settings.log_format == "json" else {}),
    }


def _run(settings: GatewaySettings, fleet_file: FleetFile) -> None:
    if settings.workers == 1:
        _serve(make_server(build_gateway(settings, fleet_file), settings))
        return
    run_workers(settings, fleet_file)
