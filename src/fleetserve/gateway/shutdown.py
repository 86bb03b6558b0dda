"""The gateway's graceful shutdown, so rolling updates and scale-in do not cut LLM streams.

On the first SIGTERM (gateway/serve.py `GatewayServer`):

1. at once: `/ready` answers 503, so load balancers stop sending; requests held at the gateway
   (and any that would be held from now on) get 503 with `Retry-After`
   (`gateway_shutting_down`); every response carries `Connection: close`;
2. for `shutdown_delay_s` new requests are still served (endpoints take a moment to leave a
   load balancer); SIGINT (Ctrl-C, no load balancer) skips this;
3. then the gateway stops accepting and closes idle keep-alive connections; in-flight requests
   and streams go on;
4. at `shutdown_grace_s` after the signal (delay included, to match Kubernetes'
   `terminationGracePeriodSeconds`) whatever is still open ends: a stream with an SSE error
   event in OpenAI's shape (`code: "gateway_shutting_down"`), never a cut body; a request
   still waiting for its answer with a 503. Then background services stop.

A second signal stops at once, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fleetserve.clock import Clock
from fleetserve.errors import NoReplicaError

log = logging.getLogger("fleetserve.gateway")

SHUTTING_DOWN = "gateway_shutting_down"
CONNECTION_CLOSE = (b"connection", b"close")


def shutting_down_error(retry_after_s: int) -> NoReplicaError:
    return NoReplicaError(
        "the gateway is shutting down; retry the request (another gateway replica answers it)",
        code=SHUTTING_DOWN,
        headers={"Retry-After": str(retry_after_s)},
    )


class Shutdown:
    """Whether the gateway is shutting down, and the deadline of its grace period."""

    def __init__(self, clock: Clock, grace_s: float) -> None:
        self.clock = clock
        self.grace_s = grace_s
        self.began_at: float | None = None
        self.draining = False  # read on the hot path: one attribute, no call
        self._deadline_task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], object]] = []
        self._at_deadline: list[Callable[[], object]] = []

    @property
    def deadline(self) -> float | None:
        return None if self.began_at is None else self.began_at + self.grace_s

    def on_begin(self, listener: Callable[[], object]) -> None:
        self._listeners.append(listener)

    def on_deadline(self, listener: Callable[[], object]) -> None:
        self._at_deadline.append(listener)

    def begin(self) -> None:
        """Start draining now; at the deadline the `on_deadline` listeners run (once)."""
        if self.draining:
            return
        self.draining = True
        self.began_at = self.clock.now()
        log.warning(
            "shutting down: not ready, in-flight requests have %.0f s to finish", self.grace_s
        )
        for listener in self._listeners:
            listener()
        self._deadline_task = asyncio.get_running_loop().create_task(self._wait_deadline())

    async def _wait_deadline(self) -> None:
        await self.clock.sleep(self.grace_s)
        self.deadline_passed()

    def deadline_passed(self) -> None:
        listeners, self._at_deadline = self._at_deadline, []
        for listener in listeners:
            listener()

    def cancel(self) -> None:
        """Forget the deadline (the server stopped first)."""
        task, self._deadline_task = self._deadline_task, None
        if task is not None:
            task.cancel()
