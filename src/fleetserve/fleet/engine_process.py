"""Engine replicas as child processes: launch one, wait for its health path, check memory.

Each engine runs in its own process group (its own session) with its output in a log file,
and is stopped by PID through `fleet.processes.stop_process_group`. What command to run comes
in from above (an `EngineAdapter` turns a model and a port into one): `fleet` sits beside
`engines` on one layer and does not import it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

from fleetserve.errors import EngineError
from fleetserve.fleet.processes import STOP_GRACE_S, poll_http_ok, stop_process_group

LOG_TAIL_LINES = 20
MEMORY_HEADROOM = 1.2  # a replica grows past its idle footprint under load


@dataclass
class EngineProcess:
    """One engine replica running as a child process in its own process group."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:]) or "(the log is empty)"

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM its process group, SIGKILL after `grace_s`; returns the exit status."""
        return stop_process_group(self.process, grace_s)


def launch(command: Sequence[str], url: str, name: str, log_dir: Path) -> EngineProcess:
    """Start `command` in its own session with stdout and stderr in `log_dir/name.log`.

    OSError (no such program, no permission) propagates for the caller to word.
    """
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stopping it stops its children too
        )
    return EngineProcess(name, url, process, log_path)


class HttpProbe:
    """Asynchronous GET probes (200 is healthy) over one pooled session, made on first use."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def ok(self, url: str) -> bool:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        try:
            async with self._session.get(url) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def wait_ready(
    engine: EngineProcess, health_path: str, timeout_s: float, poll_s: float = 0.1
) -> float:
    """Block until the engine's health path answers 200; return seconds waited."""

    def alive() -> bool:
        return engine.process.poll() is None

    wait = poll_http_ok(engine.url + health_path, timeout_s, alive=alive, poll_s=poll_s)
    if wait.exited:
        raise EngineError(
            f"{engine.name} exited with code {engine.process.returncode} while starting; "
            f"last lines of {engine.log_path}:\n{engine.log_tail()}"
        )
    if not wait.ready:
        raise EngineError(
            f"{engine.name} was not ready after {timeout_s:g}s ({wait.last}); last lines of "
            f"{engine.log_path}:\n{engine.log_tail()}"
        )
    return wait.waited_s


def replicas_that_fit(sample_pid: int, wanted: int) -> tuple[int, str]:
    """How many of `wanted` more replicas like the running `sample_pid` fit in free memory.

    Returns (count, explanation); the explanation is empty when all fit. If the sample has
    exited its footprint is unknown and all are allowed (its exit is reported elsewhere).
    """
    if wanted <= 0:
        return 0, ""
    try:
        rss = psutil.Process(sample_pid).memory_info().rss
    except psutil.Error:
        return wanted, ""
    per_replica = max(1, int(rss * MEMORY_HEADROOM))
    available = psutil.virtual_memory().available
    fit = min(wanted, available // per_replica)
    if fit >= wanted:
        return wanted, ""
    mib = 2**20
    return fit, (
        f"not enough memory for {wanted + 1} replicas: one uses {rss // mib} MiB (measured), "
        f"{wanted} more need about {per_replica * wanted // mib} MiB and "
        f"{available // mib} MiB is available"
    )


def check_memory(first: EngineProcess, more: int) -> None:
    """Refuse to start `more` replicas like `first` if this machine cannot hold them."""
    fit, why = replicas_that_fit(first.pid, more)
    if fit < more:
        raise EngineError(f"{why}; start fewer with --replicas")
