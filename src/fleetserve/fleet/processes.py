"""Local processes and ports: what `up`, the local actuator, tests and benchmarks share.

Every process fleetserve starts runs in its own session, so its process group can be stopped
by PID together with anything it started. `poll_http_ok` is the one blocking readiness wait
(engines at start-up, test stacks, benchmarks); each caller words its own failure.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 10.0


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True if a listening socket could bind host:port now; other bind errors propagate."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        return True


def http_status(url: str, timeout_s: float = 1.0) -> int | None:
    """The status of a blocking GET of an http:// URL, or None when nothing answered."""
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPConnection(parts.netloc, timeout=timeout_s)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


@dataclass(frozen=True, slots=True)
class Readiness:
    """How a wait for a URL to answer 200 ended."""

    ready: bool
    waited_s: float
    last: str  # the last probe's outcome, for the caller's message: "status 503", "no answer"
    exited: bool = False  # the process said by `alive` had exited first


def poll_http_ok(
    url: str,
    timeout_s: float,
    *,
    alive: Callable[[], bool] | None = None,
    poll_s: float = 0.05,
    probe_timeout_s: float = 1.0,
) -> Readiness:
    """Block until GET `url` answers 200, at most `timeout_s`; stop at once if `alive()`
    turns False (the process being waited for has exited)."""
    start = time.monotonic()
    deadline = start + timeout_s
    last = "no answer"
    while True:
        if alive is not None and not alive():
            return Readiness(False, time.monotonic() - start, last, exited=True)
        status = http_status(url, probe_timeout_s)
        if status == 200:
            return Readiness(True, time.monotonic() - start, "status 200")
        last = "no answer" if status is None else f"status {status}"
        if time.monotonic() >= deadline:
            return Readiness(False, time.monotonic() - start, last)
        time.sleep(poll_s)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_process_group(popen: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> int | None:
    """SIGTERM the group `popen` leads, SIGKILL it after `grace_s`; returns the exit status.

    Children that outlived their parent keep the group alive, so the group is SIGKILLed at
    the end whatever happened before.
    """
    if popen.poll() is None:
        _signal_group(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait(timeout=grace_s)
    _signal_group(popen.pid, signal.SIGKILL)
    return popen.returncode
