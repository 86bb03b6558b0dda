"""A local fleet as real processes, for integration tests and benchmarks: sim engines + gateway.

Each process is a `ManagedProcess` (own process group, log file, stopped by PID) running
`python -m fleetserve ...` on 127.0.0.1. Start-up waits are bounded; everything started is
stopped when the context exits, also when start-up fails. The API is synchronous so that it
serves sync fixtures (the OpenAI sync client) and scripts alike.

    with sim_stack(3, profile="a10g") as stack:
        ...                       # stack.url is the gateway
        stack.engines[1].crash()  # SIGKILL to the replica's process group
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetserve.fleet.processes import LOOPBACK, free_port
from fleetserve.testing.processes import ManagedProcess

START_TIMEOUT_S = 30.0
# Health checks fast enough that the gateway notices a dead replica well within a second.
FAST_HEALTH_ENV = {
    "FLEETSERVE_HEALTH__INTERVAL_S": "0.25",
    "FLEETSERVE_HEALTH__PROBE_TIMEOUT_S": "1",
    "FLEETSERVE_HEALTH__SCRAPE_INTERVAL_S": "0.5",
}


def env_without_settings(**extra: str) -> dict[str, str]:
    """This process's environment without FLEETSERVE_* settings, plus `extra`: what a command
    started by a test reads is what the test gives it."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FLEETSERVE_")}
    return {**env, **extra}


def fleetserve_argv(*args: str) -> list[str]:
    """`fleetserve ARGS` as run by this interpreter (and so this environment)."""
    return [sys.executable, "-m", "fleetserve", *args]


@dataclass
class Service:
    """A server process listening on 127.0.0.1:port."""

    name: str
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ok(self, path: str, timeout_s: float = START_TIMEOUT_S, poll_s: float = 0.05) -> None:
        """Block until GET path answers 200; StartError at once if the process exits."""
        self.process.wait_ready(self.url + path, timeout_s, poll_s)

    def crash(self) -> None:
        """SIGKILL the whole process group: the process dies without cleaning anything up."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def sim_engine_argv(port: int, model: str, profile: str, extra: Sequence[str] = ()) -> list[str]:
    return fleetserve_argv(
        "engine", "sim", "--port", str(port), "--model", model, "--profile", profile, *extra
    )


def gateway_argv(
    port: int, model: str, upstreams: Sequence[str], engine: str = "sim", extra: Sequence[str] = ()
) -> list[str]:
    ups = [arg for url in upstreams for arg in ("--upstream", url)]
    return fleetserve_argv(
        "gateway", "--port", str(port), "--model", model, "--engine", engine, *ups, *extra
    )


class Services:
    """Starts services into one log directory and stops them all (newest first) on exit."""

    def __init__(self, stack: contextlib.ExitStack, log_dir: Path) -> None:
        self._stack = stack
        self.log_dir = log_dir

    def start(
        self, name: str, argv: Sequence[str], port: int, env: Mapping[str, str] | None = None
    ) -> Service:
        process = ManagedProcess(
            argv, log_path=self.log_dir / f"{name}.log", env={**os.environ, **(env or {})}
        )
        self._stack.enter_context(process)
        return Service(name, port, process)


@contextlib.contextmanager
def services() -> Iterator[Services]:
    with contextlib.ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fleetserve-")))
        yield Services(stack, log_dir)


@dataclass
class SimStack:
    """Sim engine processes and a gateway process in front of them."""

    model: str
    engines: list[Service]
    gateway: Service

    @property
    def url(self) -> str:
        return self.gateway.url

    @staticmethod
    def replica_id(engine: Service) -> str:
        """The gateway's id of a replica, as its `x-fleetserve-replica` header names it."""
        return f"{LOOPBACK}:{engine.port}"


@contextlib.contextmanager
def sim_stack(
    replicas: int = 2,
    *,
    model: str = "sim-model",
    profile: str = "instant",
    engine_args: Sequence[str] = ("--cold-start-s", "0"),
    gateway_args: Sequence[str] = (),
    gateway_env: Mapping[str, str] | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
) -> Iterator[SimStack]:
    """`replicas` sim engines and a gateway over them, all ready (the gateway's /ready is 200)."""
    with services() as started:
        engines: list[Service] = []
        for i in range(replicas):
            port = free_port()
            argv = sim_engine_argv(port, model, profile, engine_args)
            engines.append(started.start(f"engine-{i}", argv, port))
        for engine in engines:
            engine.wait_ok("/health", start_timeout_s)
        port = free_port()
        argv = gateway_argv(port, model, [e.url for e in engines], "sim", gateway_args)
        gateway = started.start("gateway", argv, port, {**FAST_HEALTH_ENV, **(gateway_env or {})})
        gateway.wait_ok("/ready", start_timeout_s)
        yield SimStack(model, engines, gateway)
