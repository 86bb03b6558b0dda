"""`--workers N`: N gateway processes on one port, supervised by the parent process.

uvicorn's own `workers=` is not used: its workers run uvicorn's server (not the gateway's,
with its graceful shutdown), take their configuration from the environment (an admin key
would sit there), and leave a dead worker's gauges in /metrics. Here the parent binds the
port, makes the run directory the processes share (gateway/peers.py, with prometheus_client's
multiprocess files), and spawns the workers, each in a session of its own so that a
terminal's Ctrl-C reaches the parent alone, which forwards it once.

A worker that dies is restarted (after 1 s, doubling to 30 s while it keeps dying), after
`mark_process_dead` drops its live gauges and its report is removed; one that exits with
`STARTUP_FAILED` stops the gateway, since a restart would fail the same way. On SIGTERM or
SIGINT the parent forwards the signal to every worker, which drains as a single gateway does
(gateway/shutdown.py); a second signal is forwarded as well (open requests end now); a
worker still alive `KILL_AFTER_S` past the grace is killed. Services of the parent (the
autoscaler of an autoscaled `up`) start before the workers and stop after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol

import uvicorn
from prometheus_client.multiprocess import mark_process_dead

from fleetserve.config import FleetFile, GatewaySettings
from fleetserve.errors import FleetserveError
from fleetserve.gateway.peers import WAKE_SIGNAL, RunDir, WorkerContext

log = logging.getLogger("fleetserve.gateway")

STARTUP_FAILED = 3  # uvicorn's exit status for a start-up failure
KILL_AFTER_S = 10.0
RESTART_BASE_S = 1.0
RESTART_MAX_S = 30.0
POLL_S = 0.1


class ParentService(Protocol):
    """Runs in the parent beside the workers: started before them, stopped after them."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker is built from; pickled to the spawned process (not the env)."""

    settings: GatewaySettings
    fleet_file: FleetFile
    context: WorkerContext


def worker_main(spec: WorkerSpec, sock: socket.socket) -> None:
    """The spawned worker: one gateway serving on the parent's socket until told to stop."""
    os.setsid()  # the terminal's Ctrl-C goes to the parent, which forwards it once
    # Imported here: the parent imported these before it set PROMETHEUS_MULTIPROC_DIR, the
    # worker must import them after (it has, as a spawned process).
    from fleetserve.gateway.app import build_gateway  # noqa: PLC0415
    from fleetserve.gateway.serve import make_server  # noqa: PLC0415

    app = build_gateway(spec.settings, spec.fleet_file, worker=spec.context)
    server = make_server(app, spec.settings)
    try:
        server.run(sockets=[sock])
    except SystemExit:
        if app.startup_error is not None:
            print(f"error: {app.startup_error}", file=sys.stderr)
            sys.exit(STARTUP_FAILED)
        raise


@dataclass(eq=False)
class _Worker:
    index: int
    process: BaseProcess
    failures: int = 0
    restart_at: float | None = None
    pids: list[int] = field(default_factory=list)


class WorkerSupervisor:
    def __init__(
        self,
        settings: GatewaySettings,
        fleet_file: FleetFile,
        run: RunDir,
        *,
        services: Sequence[ParentService] = (),
        on_wake: Callable[[], None] | None = None,
        follow: bool = False,
    ) -> None:
        self.settings = settings
        self.fleet_file = fleet_file
        self.run = run
        self.services = services
        self.on_wake = on_wake
        self.follow = follow
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._sock: socket.socket | None = None
        self._signals = 0
        self._stopping = asyncio.Event()
        self._last_signal = signal.SIGTERM
        self.failure: FleetserveError | None = None

    # -- the whole run ------------------------------------------------------------------
    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled, sig)
        if self.on_wake is not None:
            loop.add_signal_handler(WAKE_SIGNAL, self.on_wake)
        self._sock = self._bind()
        async with contextlib.AsyncExitStack() as running:
            for service in self.services:
                await service.start()
                running.push_async_callback(service.stop)
            self._workers = [self._spawn(i) for i in range(self.settings.workers)]
            try:
                await self._supervise()
            finally:
                await self._stop_workers()
                self._sock.close()
        if self.failure is not None:
            raise self.failure

    def _bind(self) -> socket.socket:
        config = uvicorn.Config(app=None, host=self.settings.host, port=self.settings.port)  # type: ignore[arg-type]
        return config.bind_socket()

    def _spawn(self, index: int, worker: _Worker | None = None) -> _Worker:
        assert self._sock is not None
        context = WorkerContext(
            run=self.run,
            parent_pid=os.getpid(),
            index=index,
            workers=self.settings.workers,
            follow=self.follow,
        )
        spec = WorkerSpec(self.settings, self.fleet_file, context)
        process = self._context.Process(
            target=worker_main, args=(spec, self._sock), name=f"gateway-worker-{index}"
        )
        process.start()
        if worker is None:
            worker = _Worker(index, process)
        worker.process = process
        assert process.pid is not None
        worker.pids.append(process.pid)
        return worker

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), POLL_S)
            now = loop.time()
            for worker in self._workers:
                if worker.restart_at is not None:
                    if now >= worker.restart_at and not self._stopping.is_set():
                        worker.restart_at = None
                        self._spawn(worker.index, worker)
                    continue
                code = worker.process.exitcode
                if code is None or self._stopping.is_set():
                    continue
                self._forget(worker.process)
                if code == STARTUP_FAILED:
                    self.failure = FleetserveError(
                        f"gateway worker {worker.index} failed to start (its error is above)"
                    )
                    self._stopping.set()
                    break
                worker.failures += 1
                delay_s = min(RESTART_BASE_S * 2 ** (worker.failures - 1), RESTART_MAX_S)
                log.warning(
                    "gateway worker %d (pid %s) exited with code %s; restarting in %g s",
                    worker.index, worker.process.pid, code, delay_s,
                )  # fmt: skip
                worker.restart_at = now + delay_s

    def _signalled(self, sig: int) -> None:
        self._signals += 1
        self._last_signal = signal.Signals(sig)
        for worker in self._workers:
            if worker.process.exitcode is None and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, sig)
        self._stopping.set()

    async def _stop_workers(self) -> None:
        if self._signals == 0:  # a failure, not a signal: stop them as SIGTERM would
            self._signalled(signal.SIGTERM)
        settings = self.settings
        limit_s = settings.shutdown_delay_s + settings.shutdown_grace_s + KILL_AFTER_S
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while any(w.process.exitcode is None for w in self._workers):
            if loop.time() >= deadline:
                for worker in self._workers:
                    if worker.process.exitcode is None:
                        log.warning("gateway worker %d did not stop: killed", worker.index)
                        worker.process.kill()
                break
            await asyncio.sleep(POLL_S)
        for worker in self._workers:
            await asyncio.to_thread(worker.process.join, KILL_AFTER_S)
            self._forget(worker.process)

    def _forget(self, process: BaseProcess) -> None:
        """A worker is gone: its live gauges leave /metrics, its report the admin views."""
        if process.pid is None:
            return
        mark_process_dead(process.pid, str(self.run.metrics))  # type: ignore[no-untyped-call]
        with contextlib.suppress(FileNotFoundError):
            self.run.report_of(process.pid).unlink()


def new_run_dir() -> RunDir:
    run = RunDir(Path(tempfile.mkdtemp(prefix="fleetserve-gateway-")))
    run.create()
    return run


def run_workers(
    settings: GatewaySettings,
    fleet_file: FleetFile,
    *,
    run: RunDir | None = None,
    services: Sequence[ParentService] = (),
    on_wake: Callable[[], None] | None = None,
    follow: bool = False,
) -> None:
    """Serve with `settings.workers` worker processes until SIGINT/SIGTERM. Blocks.

    FleetserveError when a service or a worker cannot start."""
    run = run or new_run_dir()
    # Before the workers start: they inherit it, and prometheus_client reads it at import.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run.metrics)
    supervisor = WorkerSupervisor(
        settings, fleet_file, run, services=services, on_wake=on_wake, follow=follow
    )
    try:
        asyncio.run(supervisor.run_until_stopped())
    finally:
        shutil.rmtree(run.path, ignore_errors=True)
