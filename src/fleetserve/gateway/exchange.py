"""One client request on its way through the gateway: what the proxy did with it, and what the
watchdog needs to end it early (a body that does not come, a client that stops reading, the
shutdown deadline). One object per request, so the hot path allocates nothing more."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fleetserve.gateway.ticket import Ticket

if TYPE_CHECKING:
    from fleetserve.gateway.observe import Observation

EndReason = Literal["client_gone", "body_timeout", "write_stall", "shutdown"]
"""Why a request's task was cancelled from outside: set before `task.cancel()`."""


@dataclass(slots=True, eq=False)
class Exchange:
    task: asyncio.Task[None] | None = None
    model: str = "-"
    status: int = 0
    replica: str | None = None
    attempts: int = 0
    stream_failed: bool = False
    head_sent: bool = False  # the client has the response head: errors go in-stream now
    hold_started: float | None = None
    hold_s: float = 0.0  # time spent held: not charged to the first-byte budget
    cold_hold_s: float = 0.0  # the part held with no ready replica: left out of the window's TTFT
    ttft_s: float | None = None  # a stream's first byte, from the end of the body (hold included)
    reading_since: float = 0.0  # > 0 while the request body is being read
    sending_since: float = 0.0  # > 0 while a write to the client waits (flow control)
    ended_by: EndReason | None = None
    finishing: bool = False  # answered: a disconnect now is the client's normal close
    ticket: Ticket | None = None  # tenancy (auth = keys): the admitted request's accounting
    extra_headers: Sequence[tuple[bytes, bytes]] = ()  # x-request-id, the tenant's x-ratelimit-*
    observed: Observation | None = None  # tracing or the access log is on (gateway/observe.py)

    def end(self, reason: EndReason) -> bool:
        """Cancel the request's task for `reason`, once; False if it was already ended."""
        if self.ended_by is not None or self.finishing or self.task is None:
            return False
        self.ended_by = reason
        self.task.cancel()
        return True
