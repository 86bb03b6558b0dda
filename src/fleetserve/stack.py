"""The composition root for a local fleet: engine processes on this machine plus the gateway.

`fleetserve up` calls `run_local_stack`. It owns every process it starts and stops each by
PID (SIGTERM to its process group, SIGKILL after a grace period), also on errors and signals.
"""

from __future__ import annotations

import http.client
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from fleetserve.config import FleetFile, GatewaySettings, ModelSpec, PickerName
from fleetserve.engines.adapter import EngineAdapter, LaunchSpec
from fleetserve.errors import EngineError
from fleetserve.fleet.processes import STOP_GRACE_S, free_port, stop_process_group
from fleetserve.gateway.serve import run_gateway, terminate_as_interrupt

LOG_TAIL_LINES = 20


@dataclass
class EngineProcess:
    """One engine replica running as a child process in its own process group."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:])

    def stop(self) -> None:
        stop_process_group(self.process, STOP_GRACE_S)


def launch(adapter: EngineAdapter, spec: LaunchSpec, name: str, log_dir: Path) -> EngineProcess:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            adapter.launch_command(spec),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stopping it stops its children too
        )
    return EngineProcess(name, f"http://{spec.host}:{spec.port}", process, log_path)


def _http_ok(base_url: str, path: str) -> bool:
    host_port = base_url.split("://", 1)[1]
    connection = http.client.HTTPConnection(host_port, timeout=1.0)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def wait_ready(
    engine: EngineProcess, adapter: EngineAdapter, timeout_s: float, poll_s: float = 0.1
) -> float:
    """Block until the engine's health path answers 200; return seconds waited."""
    start = time.monotonic()
    deadline = start + timeout_s
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            raise EngineError(
                f"{engine.name} exited with code {engine.process.returncode} while starting; "
                f"last lines of {engine.log_path}:\n{engine.log_tail()}"
            )
        if _http_ok(engine.url, adapter.health_path):
            return time.monotonic() - start
        time.sleep(poll_s)
    raise EngineError(
        f"{engine.name} was not ready after {timeout_s:g}s; last lines of {engine.log_path}:\n"
        f"{engine.log_tail()}"
    )


MEMORY_HEADROOM = 1.2  # a replica grows past its idle footprint under load


def check_memory(first: EngineProcess, more: int) -> None:
    """Refuse to start `more` replicas like `first` if this machine cannot hold them."""
    if more <= 0:
        return
    try:
        rss = psutil.Process(first.process.pid).memory_info().rss
    except psutil.Error:
        return  # it exited; wait_ready of the next replica reports that with its log
    needed = int(rss * more * MEMORY_HEADROOM)
    available = psutil.virtual_memory().available
    if needed > available:
        mib = 2**20
        raise EngineError(
            f"not enough memory for {more + 1} replicas: one uses {rss // mib} MiB (measured), "
            f"{more} more need about {needed // mib} MiB and {available // mib} MiB is available; "
            "start fewer with --replicas"
        )


@dataclass(frozen=True)
class LocalStackSpec:
    adapter: EngineAdapter
    model: str
    replicas: int
    options: dict[str, str]
    engine_name: str
    picker: PickerName
    ready_timeout_s: float = 120.0


def run_local_stack(
    spec: LocalStackSpec,
    settings: GatewaySettings,
    say: Callable[[str], None],
    on_ready: Callable[[], None] = lambda: None,
) -> None:
    """Start the engines, wait until each is ready, serve the gateway, stop all on exit."""
    engines: list[EngineProcess] = []
    log_dir = Path(tempfile.mkdtemp(prefix="fleetserve-up-"))

    def start(i: int) -> EngineProcess:
        launch_spec = LaunchSpec(spec.model, free_port(), options=spec.options)
        engine = launch(spec.adapter, launch_spec, f"replica-{i}", log_dir)
        engines.append(engine)
        say(f"starting {engine.name} ({spec.engine_name}) at {engine.url}")
        return engine

    try:
        with terminate_as_interrupt():  # SIGTERM while engines start cleans up like Ctrl-C
            # The first replica alone: its measured memory tells whether the rest fit.
            first = start(0)
            waited = wait_ready(first, spec.adapter, spec.ready_timeout_s)
            say(f"{first.name} ready in {waited:.1f}s")
            check_memory(first, spec.replicas - 1)
            rest = [start(i) for i in range(1, spec.replicas)]
            for engine in rest:
                waited = wait_ready(engine, spec.adapter, spec.ready_timeout_s)
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
