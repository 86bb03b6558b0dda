"""Shared CLI plumbing: clear one-line errors instead of tracebacks, and port checks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import NoReturn, ParamSpec, TypeVar

from rich.console import Console

from fleetserve.errors import FleetserveError
from fleetserve.fleet.processes import port_is_free

P = ParamSpec("P")
R = TypeVar("R")

err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # one error, one line


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}")
    sys.exit(code)


def clear_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn fleetserve's own errors into one clear line and a non-zero exit."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except FleetserveError as exc:
            fail(str(exc))

    return wrapper


def ensure_port_free(host: str, port: int, what: str) -> None:
    """Fail early with a clear message rather than deep inside the server's start-up."""
    if port == 0:
        return
    try:
        free = port_is_free(port, host)
    except OSError as exc:
        fail(f"cannot bind {host}:{port} for {what}: {exc.strerror}")
    if not free:
        fail(f"port {port} on {host} is already in use; choose another with --port ({what})")
