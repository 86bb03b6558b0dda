"""Runs the gateway under uvicorn: one worker in-process, or N worker processes on one port."""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from fleetserve.config import FleetFile, GatewaySettings
from fleetserve.gateway.app import CONFIG_ENV, build_gateway, encode_config

UVICORN_FAST = {"loop": "uvloop", "http": "httptools", "access_log": False, "lifespan": "on"}


def run_gateway(settings: GatewaySettings, fleet_file: FleetFile) -> None:
    """Serve until SIGINT/SIGTERM. Blocks."""
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": 10,
        **UVICORN_FAST,
    }
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
