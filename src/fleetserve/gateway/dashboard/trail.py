"""The dashboard's request trail: the last requests with their ids, and per replica and per
model what clients saw of them (TTFT p95, completions, errors) over the last minute.

Filled at the accounting step (`GatewayApp`), only once the page has been opened (`on`):
until then the hot path pays one attribute check and nothing else; after, one append and
three O(1) window writes per request. The per-replica and per-model figures reuse
`LoadWindow`'s 1-s buckets and TTFT bins: a window per key kind, keyed by replica id or
model, in which `finished` counts completions and `observe_ttft` the first tokens.

TTFT here is counted as clients see it: from the end of the request body to the first byte
of the stream, time held at the gateway included (the autoscaler's window leaves a cold-start
hold out). An error is a 5xx answer or a stream that ended with an error event.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from fleetserve.gateway.exchange import Exchange
from fleetserve.telemetry.window import LoadWindow

TRAIL_LENGTH = 200  # requests kept for the page's table
TRAIL_WINDOW_S = 60.0  # what the per-replica and per-model figures cover


@dataclass(frozen=True, slots=True)
class TrailEntry:
    """One finished request as the page lists it."""

    request_id: str
    at: float  # the gateway clock's now() when it finished
    model: str
    replica: str | None
    status: int
    stream_failed: bool
    ttft_s: float | None
    e2e_s: float
    attempts: int
    held_s: float
    tenant: str | None
    tokens_out: int | None  # the engine's usage, or stream events counted (tenancy only)

    @property
    def error(self) -> bool:
        return self.status >= 500 or self.stream_failed

    def as_json(self, now: float) -> dict[str, object]:
        return {
            "id": self.request_id,
            "at_s_ago": round(now - self.at, 3),
            "model": self.model,
            "replica": self.replica,
            "status": self.status,
            "error": self.error,
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            "e2e_s": round(self.e2e_s, 4),
            "attempts": self.attempts,
            "held_s": round(self.held_s, 4),
            "tenant": self.tenant,
            "tokens_out": self.tokens_out,
        }


class RequestTrail:
    """Off until `start()`; then every request the gateway accounts is added."""

    def __init__(self, length: int = TRAIL_LENGTH, window_s: float = TRAIL_WINDOW_S) -> None:
        self.on = False  # read on the hot path: one attribute
        self.since: float | None = None
        self._entries: deque[TrailEntry] = deque(maxlen=length)
        self.by_replica = LoadWindow(window_s)
        self.by_model = LoadWindow(window_s)
        self.errors_by_model = LoadWindow(window_s)  # `finished` only for errors

    def start(self, now: float) -> None:
        if not self.on:
            self.on = True
            self.since = now

    def add(
        self, request_id: str, exchange: Exchange, status: int, e2e_s: float, now: float
    ) -> None:
        ticket = exchange.ticket
        tenant = tokens = None
        if ticket is not None:
            tenant = ticket.tenant
            tokens = ticket.usage[1] if ticket.usage is not None else ticket.output_events
        entry = TrailEntry(
            request_id, now, exchange.model, exchange.replica, status, exchange.stream_failed,
            exchange.ttft_s, e2e_s, exchange.attempts, exchange.hold_s, tenant, tokens,
        )  # fmt: skip
        self._entries.append(entry)
        model = exchange.model
        self.by_model.finished(model, now)
        if entry.error:
            self.errors_by_model.finished(model, now)
        if exchange.ttft_s is not None:
            self.by_model.observe_ttft(model, now, exchange.ttft_s)
        replica = exchange.replica
        if replica is not None:
            self.by_replica.finished(replica, now)
            if exchange.ttft_s is not None:
                self.by_replica.observe_ttft(replica, now, exchange.ttft_s)

    def entries(self) -> list[TrailEntry]:
        return list(self._entries)

    def model_figures(self, model: str, now: float) -> dict[str, float | None]:
        """TTFT p95, completions/s and the error rate of a model over the trail's window."""
        done = self.by_model.snapshot(model, now)
        errors = self.errors_by_model.snapshot(model, now)
        rate = None
        if done.completed_rps > 0:
            rate = errors.completed_rps * errors.window_s / (done.completed_rps * done.window_s)
        return {
            "ttft_p95_s": done.ttft_p95_s,
            "completed_rps": done.completed_rps,
            "error_rate": rate,
        }

    def replica_figures(self, replica_id: str, now: float) -> dict[str, float | None]:
        load = self.by_replica.snapshot(replica_id, now)
        return {"ttft_p95_s": load.ttft_p95_s, "completed_rps": load.completed_rps}
