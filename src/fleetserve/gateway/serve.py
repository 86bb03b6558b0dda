"""Runs the gateway under uvicorn: one worker in-process, or N worker processes on one port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from types import FrameType

import uvicorn

from fleetserve.config import FleetFile, GatewaySettings
from fleetserve.gateway.app import CONFIG_ENV, build_gateway, encode_config
from fleetserve.gateway.asgi import GatewayApp

UVICORN_FAST = {"loop": "uvloop", "http": "httptools", "access_log": False, "lifespan": "on"}


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


def run_gateway(settings: GatewaySettings, fleet_file: FleetFile) -> None:
    """Serve until SIGINT/SIGTERM, then raise KeyboardInterrupt. Blocks."""
    with terminate_as_interrupt():
        _run(settings, fleet_file)


def serve_app(app: GatewayApp, settings: GatewaySettings) -> None:
    """Serve a pre-built app (one worker, this process) until SIGINT/SIGTERM, then raise
    KeyboardInterrupt. Blocks; for a composition root that built the app with its hooks."""
    with terminate_as_interrupt():
        uvicorn.run(app, **_common(settings))  # type: ignore[arg-type]


def make_server(app: GatewayApp, settings: GatewaySettings) -> uvicorn.Server:
    """A uvicorn server for a pre-built app, to `await server.serve()` in a running loop.

    Set `server.should_exit = True` to stop it; the app's lifespan then stops its services.
    """
    config = uvicorn.Config(app, **_common(settings))  # type: ignore[arg-type]
    return uvicorn.Server(config)


def _common(settings: GatewaySettings) -> dict[str, object]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": 10,
        **UVICORN_FAST,
    }


def _run(settings: GatewaySettings, fleet_file: FleetFile) -> None:
    common = _common(settings)
    if settings.workers == 1:
        app = build_gateway(settings, fleet_file)
        uvicorn.run(app, **common)  # type: ignore[arg-type]
        return
    # Several workers: prometheus_client sums them through files in a private directory.
    metrics_dir = tempfile.mkdtemp(prefix="fleetserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[CONFIG_ENV] = encode_config(settings, fleet_file)
    try:
        uvicorn.run(
            "fleetserve.gateway.app:app_from_env",
            factory=True,
            workers=settings.workers,
            **common,  # type: ignore[arg-type]
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
