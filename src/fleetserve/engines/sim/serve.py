"""Run one SIMULATED vLLM replica under uvicorn (httptools, uvloop, no access log) until a signal.

The listening socket is bound here, before uvicorn starts, so that a port in use is one clear
error rather than a log line and an exit from deep inside the server.
"""

from __future__ import annotations

import errno
import gc
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fleetserve.clock import RealClock
from fleetserve.engines.sim.engine import SimEngine
from fleetserve.engines.sim.profiles import SimProfile
from fleetserve.engines.sim.server import RECEIVED_S, SimServer
from fleetserve.errors import EngineError

# Streams still running at shutdown get this long to finish before they are cut.
GRACEFUL_SHUTDOWN_S = 3


@dataclass(frozen=True, slots=True)
class SimServeSettings:
    host: str
    port: int
    model: str
    profile: SimProfile
    seed: int = 0
    log_level: str = "warning"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; EngineError (one line) if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise EngineError(f"port {port} on {host} is already in use") from None
        raise EngineError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def stamping_protocol(now: Callable[[], float]) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, stamping in each request's scope (`server.RECEIVED_S`)
    when its parser began the request: the moment its first bytes were read off the socket,
    before the request waits in the event loop for its handler to run."""

    class StampingHttpToolsProtocol(HttpToolsProtocol):
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope[RECEIVED_S] = now()  # type: ignore[literal-required]

    return StampingHttpToolsProtocol


def _ignore_signal(signum: int, frame: object) -> None:
    """Stand-in handler: uvicorn re-raises the signal it shut down on once it has finished."""


def run_sim_server(settings: SimServeSettings) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly and return. Blocks."""
    sock = bind_socket(settings.host, settings.port)
    engine = SimEngine(settings.profile, settings.model, RealClock())
    app = SimServer(engine, engine_seed=settings.seed)
    config = uvicorn.Config(
        app,
        http=stamping_protocol(engine.clock.now),
        loop="uvloop",
        lifespan="on",
        access_log=False,
        log_level=settings.log_level,
        server_header=False,
        # No proxy stands in front of an engine; the middleware would cost every request.
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    config.load()  # imports the protocol modules now, so their objects are frozen below
    # Everything built so far (modules, pydantic schemas, the profile) lives as long as the
    # process: keep it out of every later collection, whose pauses would land in a request's
    # time before the server can stamp its arrival.
    gc.collect()
    gc.freeze()
    profile = settings.profile
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = sock.getsockname()[1]  # the one the OS chose, if asked for port 0
    print(
        f"fleetserve engine sim: SIMULATED vLLM replica (profile {profile.name}) serving "
        f"{settings.model!r} on http://{host}:{port}; ready after a "
        f"{profile.cold_start_s:g} s simulated cold start. No model runs here.",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn handles SIGINT/SIGTERM itself and, once shut down, raises the signal again for
    # the handlers that were installed before it: make those no-ops, so the process ends with
    # status 0 instead of KeyboardInterrupt's traceback.
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
