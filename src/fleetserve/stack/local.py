"""A fixed local fleet (`fleetserve up`): engine processes on this machine plus the gateway.

`fleetserve up` calls `run_local_stack`. It owns every process it starts and stops each by
PID (SIGTERM to its process group, SIGKILL after a grace period), also on errors and signals.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleetserve.config import READY_TIMEOUT_S, FleetFile, GatewaySettings, ModelSpec, PickerName
from fleetserve.engines.adapter import EngineAdapter
from fleetserve.fleet.engine_process import EngineProcess, check_memory, launch, wait_ready
from fleetserve.fleet.processes import LOOPBACK, free_port
from fleetserve.gateway.serve import run_gateway, terminate_as_interrupt
from fleetserve.stack.launcher import AdapterLauncher


@dataclass(frozen=True)
class LocalStackSpec:
    adapter: EngineAdapter
    model: str
    replicas: int
    options: dict[str, str]
    engine_name: str
    picker: PickerName
    ready_timeout_s: float = READY_TIMEOUT_S


def run_local_stack(
    spec: LocalStackSpec,
    settings: GatewaySettings,
    say: Callable[[str], None],
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Start the engines, wait until each is ready, serve the gateway, stop all on exit."""
    engines: list[EngineProcess] = []
    launcher = AdapterLauncher(spec.adapter, spec.model, spec.options)
    log_dir = Path(tempfile.mkdtemp(prefix="fleetserve-up-"))

    def start(i: int) -> EngineProcess:
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        engine = launch(launcher.command(LOOPBACK, port), url, f"replica-{i}", log_dir)
        engines.append(engine)
        say(f"starting {engine.name} ({spec.engine_name}) at {engine.url}")
        return engine

    try:
        with terminate_as_interrupt():  # SIGTERM while engines start cleans up like Ctrl-C
            # The first replica alone: its measured memory tells whether the rest fit.
            first = start(0)
            waited = wait_ready(first, launcher.health_path, spec.ready_timeout_s)
            say(f"{first.name} ready in {waited:.1f}s")
            check_memory(first, spec.replicas - 1)
            rest = [start(i) for i in range(1, spec.replicas)]
            for engine in rest:
                waited = wait_ready(engine, launcher.health_path, spec.ready_timeout_s)
                say(f"{engine.name} ready in {waited:.1f}s")
        model = ModelSpec(
            name=spec.model,
            replicas=[e.url for e in engines],
            engine=spec.engine_name,
            picker=spec.picker,
        )
        say(f"engine logs in {log_dir}")
        on_ready()
        run_gateway(settings, FleetFile(models=[model]))
    finally:
        for engine in engines:
            engine.stop()
