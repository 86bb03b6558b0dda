"""Real processes on loopback for integration tests and benchmarks: readiness, clean stops.

`ManagedProcess` starts a command in its own process group with its output in a log file, and
stops it by PID: SIGTERM to the group, then SIGKILL to the group if it has not exited in time,
so nothing it spawned outlives the test. Its waits (`wait_ready` blocking, `wait_http_ok` in
an event loop, `wait_for` a condition) fail at once, with the log's tail, if it exits. Every
wait here is bounded.
"""

from __future__ import annotations

import asyncio
import http.client
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp
import orjson

from fleetserve.fleet.processes import LOOPBACK, poll_http_ok, stop_process_group


class StartError(RuntimeError):
    """A process exited, or did not become ready in time, while starting; carries its log."""


def get_json(url: str, timeout_s: float = 5.0) -> Any:
    """GET an http:// URL and decode its JSON body; OSError when nothing answers or the
    status is not 200, ValueError when the body is not JSON."""
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPConnection(parts.netloc, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise OSError(f"GET {url} answered {response.status}: {body[:200]!r}")
    return orjson.loads(body)


async def wait_port_open(
    port: int, timeout_s: float, *, host: str = LOOPBACK, poll_s: float = 0.05
) -> None:
    """Wait until something accepts TCP connections on host:port; TimeoutError if nothing does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), poll_s * 20)
        except (OSError, TimeoutError):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"nothing listens on {host}:{port} after {timeout_s} s"
                ) from None
            await asyncio.sleep(poll_s)
        else:
            writer.close()
            await writer.wait_closed()
            return


async def wait_http_ok(
    url: str,
    timeout_s: float,
    *,
    poll_s: float = 0.05,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll GET `url` until it answers 200; TimeoutError (with the last outcome) if it never does.

    `alive`, if given, is checked on each round so that a process that died fails at once
    instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    probe_timeout = aiohttp.ClientTimeout(total=min(2.0, timeout_s))
    async with aiohttp.ClientSession(timeout=probe_timeout) as session:
        while True:
            if alive is not None and not alive():
                raise RuntimeError(f"the process exited before {url} answered ({last})")
            try:
                async with session.get(url) as response:
                    await response.read()
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s ({last})")
            await asyncio.sleep(poll_s)


class ManagedProcess:
    """`with ManagedProcess(argv, log_path=...) as proc:` runs argv for the block's duration.

    Also usable as `async with` (the stop then waits in a thread, not blocking the loop).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout_s: float = 10.0,
        name: str | None = None,
    ) -> None:
        self.name = name or log_path.stem  # in messages, and benchmarks' CPU tables
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        return self._started().poll()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # The child keeps its own copy of the descriptor; ours can close now.
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # own process group, whose id is the child's PID
            )
        return self

    def log_text(self, tail_chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[-tail_chars:]

    def send_signal(self, sig: int) -> None:
        """Signal the process itself (not its group)."""
        self._started().send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for exit; subprocess.TimeoutExpired if it is still running after timeout_s."""
        return self._started().wait(timeout=timeout_s)

    def stop(self) -> int | None:
        """SIGTERM the process group, SIGKILL it after `stop_timeout_s`; returns the exit status."""
        if self._proc is None:
            return None
        return stop_process_group(self._proc, self.stop_timeout_s)

    def wait_ready(self, url: str, timeout_s: float, poll_s: float = 0.05) -> float:
        """Block until GET `url` answers 200; seconds waited. StartError (with the log's tail)
        at once if the process exits, or when `timeout_s` passes."""
        wait = poll_http_ok(url, timeout_s, alive=lambda: self.running, poll_s=poll_s)
        if wait.exited:
            raise StartError(
                f"{self.name} exited with status {self.returncode} while starting; "
                f"{self.log_path}:\n{self.log_text()}"
            )
        if not wait.ready:
            raise StartError(
                f"{self.name}: GET {url} was not 200 within {timeout_s:g} s ({wait.last}); "
                f"{self.log_path}:\n{self.log_text()}"
            )
        return wait.waited_s

    def wait_for(
        self, check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2
    ) -> None:
        """Block until `check()` holds (an OSError or ValueError from it counts as not yet);
        StartError (with the log's tail) if the process exits first, TimeoutError after
        `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.running:
                raise StartError(
                    f"{self.name} exited with status {self.returncode} while waiting for "
                    f"{what}; {self.log_path}:\n{self.log_text()}"
                )
            try:
                if check():
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what}: not within {timeout_s:g} s")
            time.sleep(poll_s)

    async def wait_http_ok(self, url: str, timeout_s: float) -> None:
        """Like `wait_http_ok`, failing at once (with the log's tail) if the process exits."""
        try:
            await wait_http_ok(url, timeout_s, alive=lambda: self.running)
        except (TimeoutError, RuntimeError) as exc:
            raise type(exc)(f"{exc}\n--- {self.log_path} ---\n{self.log_text()}") from exc

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("the process has not been started")
        return self._proc

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)
