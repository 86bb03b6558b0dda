"""Ends what the gateway must not keep waiting on: clients too slow to send or to read.

One sweep a second (`tick_s`) over the open requests and connections, instead of a timer per
request, so the hot path only stamps two floats:

- a connection whose request line and headers have not all arrived `header_read_s` after its
  first byte (or after it connected) gets a 408 and is closed (slowloris);
- a request whose body has not all arrived within `body_read_s` gets a 408 in OpenAI's
  envelope and `Connection: close`;
- a stream whose client has not read for `write_stall_s` (a write waits on flow control that
  long) is cut: the upstream request is cancelled, the replica slot freed, and the
  connection dropped.

At the shutdown deadline (gateway/shutdown.py) every request still open is ended the same
way, each answering as its state allows (see `GatewayApp`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from fleetserve.clock import Clock
from fleetserve.config import TimeoutSettings
from fleetserve.gateway.exchange import EndReason, Exchange
from fleetserve.supervisor import Supervisor, cancel_all
from fleetserve.telemetry.metrics import GatewayMetrics

log = logging.getLogger("fleetserve.gateway")

MAX_TICK_S = 1.0
# The `kind` label of fleetserve_client_timeouts_total, per reason a request was ended.
CLIENT_TIMEOUT_KINDS: dict[EndReason, str] = {
    "body_timeout": "body_read",
    "write_stall": "write_stall",
}


class SlowConnection(Protocol):
    """A client connection that can be timed out while its request head arrives."""

    head_since: float  # > 0 while a request line and headers are arriving

    def head_timed_out(self) -> None:
        """Answer 408 and close (only called while no response is in progress)."""


class Watchdog:
    def __init__(
        self,
        clock: Clock,
        timeouts: TimeoutSettings,
        metrics: GatewayMetrics,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.clock = clock
        self.supervisor = supervisor or Supervisor(clock)
        self.timeouts = timeouts
        self.metrics = metrics
        self.open: set[Exchange] = set()
        self.connections: set[SlowConnection] = set()
        self.tick_s = min(
            MAX_TICK_S,
            timeouts.header_read_s / 10,
            timeouts.body_read_s / 10,
            timeouts.write_stall_s / 10,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = self.supervisor.spawn("gateway/watchdog", self._run)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_all([task])

    async def _run(self) -> None:
        while True:
            await self.clock.sleep(self.tick_s)
            self.sweep(self.clock.now())

    def sweep(self, now: float) -> None:
        """End every request and connection past its bound at `now`."""
        body_s = self.timeouts.body_read_s
        stall_s = self.timeouts.write_stall_s
        for exchange in list(self.open):
            if exchange.reading_since and now - exchange.reading_since > body_s:
                self._end(exchange, "body_timeout")
            elif (
                exchange.sending_since
                and now - exchange.sending_since > stall_s
                and self._end(exchange, "write_stall")
            ):
                log.warning(
                        "client of a %s stream read nothing for %.0f s: cut off, replica %s freed",
                        exchange.model, now - exchange.sending_since, exchange.replica,
                    )  # fmt: skip
        head_s = self.timeouts.header_read_s
        for connection in list(self.connections):
            if connection.head_since and now - connection.head_since > head_s:
                connection.head_since = 0.0
                self.metrics.client_timeouts.labels("header_read").inc()
                connection.head_timed_out()

    def end_all(self, reason: EndReason) -> int:
        """End every open request (the shutdown deadline); how many were still open."""
        ended = 0
        for exchange in list(self.open):
            ended += self._end(exchange, reason)
        return ended

    def _end(self, exchange: Exchange, reason: EndReason) -> bool:
        if not exchange.end(reason):
            return False
        kind = CLIENT_TIMEOUT_KINDS.get(reason)
        if kind is not None:
            self.metrics.client_timeouts.labels(kind).inc()
        return True
