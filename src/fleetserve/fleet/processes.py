"""Local processes and ports: what `up`, the local actuator, tests and benchmarks share.

Every process fleetserve starts runs in its own session, so its process group can be stopped
by PID together with anything it started.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess

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
