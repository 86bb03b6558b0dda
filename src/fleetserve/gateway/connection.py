"""uvicorn's httptools protocol with the two things the gateway needs of a client connection.

- A bound on the time a request line and headers take to arrive: uvicorn bounds only the idle
  time between requests (`timeout_keep_alive`), so a client that connects and trickles its
  headers (slowloris) holds a connection forever. The gateway's `Watchdog` times such
  connections out with a 408 (see gateway/watchdog.py); this class stamps when a head starts
  arriving and registers itself with the watchdog the app put in the lifespan state.
- A way to drop the connection from the app (`scope["extensions"]["fleetserve.abort"]`):
  a stream whose client stopped reading cannot be ended by a write, and uvicorn's own close
  would wait for a write buffer that never drains.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fleetserve.gateway.watchdog import Watchdog
from fleetserve.protocol.envelope import error_body

WATCHDOG_STATE = "fleetserve.watchdog"  # the lifespan-state key the app puts its Watchdog under
ABORT_EXTENSION = "fleetserve.abort"

_TIMEOUT_BODY = error_body(
    "the request line and headers did not arrive in time", "invalid_request_error",
    "request_timeout",
)  # fmt: skip
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\nconnection: close\r\n\r\n"
    + _TIMEOUT_BODY
)  # fmt: skip


class GatewayHttpProtocol(HttpToolsProtocol):
    head_since: float = 0.0  # > 0 while a request head is arriving (the watchdog's clock)
    _watchdog: Watchdog | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._extensions: dict[str, object] = {ABORT_EXTENSION: transport.abort}
        watchdog = self.app_state.get(WATCHDOG_STATE)
        if isinstance(watchdog, Watchdog):
            self._watchdog = watchdog
            watchdog.connections.add(self)
            self.head_since = watchdog.clock.now()  # connected: the head is due from now

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watchdog is not None:
            self._watchdog.connections.discard(self)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._watchdog is not None and not self.head_since:
            self.head_since = self._watchdog.clock.now()
        self.scope["extensions"] = self._extensions  # type: ignore[typeddict-item]

    def on_headers_complete(self) -> None:
        self.head_since = 0.0
        super().on_headers_complete()

    def head_timed_out(self) -> None:
        """Answer 408 and close, unless a response is being written on this connection."""
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a pipelined head behind a response in progress: that one's bounds apply
        self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()
