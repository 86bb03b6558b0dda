"""The dashboard's request trail: the last requests with their ids, and from them, per
replica and per model, what clients saw (TTFT p95, completions, errors) in the last minute.

Filled at the accounting step (`GatewayApp`), only once a page has been opened (`on`): until
then the hot path pays one attribute check; after, one tuple appended to a bounded deque
(benchmarks/dashboard_trail.py). Everything else is computed when a snapshot is built, at
most twice a second, by one pass over the trail.

The figures cover the requests of the last `window_s` that are still in the trail: at more
than `length / window_s` requests a second (2000 / 60 s: 33 req/s) that is the newest
`length` requests, and `figures()` says over how many seconds (`span_s`).

TTFT here is counted as clients see it: from the end of the request body to the first byte
of the stream, time held at the gateway included (the autoscaler's window leaves a cold-start
hold out). An error is a 5xx answer or a stream that ended with an error event.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from fleetserve.gateway.exchange import Exchange
from fleetserve.telemetry.quantiles import percentile

TRAIL_LENGTH = 2000  # requests kept
TRAIL_WINDOW_S = 60.0  # what the per-replica and per-model figures cover at most


class TrailEntry(NamedTuple):
    """One finished request (a tuple: the hot path builds it, nothing more)."""

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


@dataclass(slots=True)
class Figures:
    """What clients saw of one model or replica over the trail's window."""

    requests: int = 0
    errors: int = 0
    ttfts: list[float] = field(default_factory=list)

    def add(self, entry: TrailEntry) -> None:
        self.requests += 1
        if entry.error:
            self.errors += 1
        if entry.ttft_s is not None:
            self.ttfts.append(entry.ttft_s)

    def as_json(self, span_s: float) -> dict[str, float | int | None]:
        ttfts = sorted(self.ttfts)
        return {
            "requests": self.requests,
            "completed_rps": self.requests / span_s if span_s > 0 else None,
            "error_rate": self.errors / self.requests if self.requests else None,
            "ttft_p95_s": percentile(ttfts, 95) if ttfts else None,
        }


@dataclass(frozen=True, slots=True)
class TrailFigures:
    span_s: float  # the seconds the figures cover (the window, or less: see the docstring)
    models: dict[str, dict[str, float | int | None]]
    replicas: dict[str, dict[str, float | int | None]]

    def model(self, name: str) -> dict[str, float | int | None]:
        return self.models.get(name) or Figures().as_json(self.span_s)

    def replica(self, replica_id: str) -> dict[str, float | int | None]:
        return self.replicas.get(replica_id) or Figures().as_json(self.span_s)


class RequestTrail:
    """Off until `start()`; then every request the gateway accounts is added."""

    def __init__(self, length: int = TRAIL_LENGTH, window_s: float = TRAIL_WINDOW_S) -> None:
        self.on = False  # read on the hot path: one attribute
        self.since: float | None = None
        self.window_s = window_s
        self._entries: deque[TrailEntry] = deque(maxlen=length)

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

    def newest(self, count: int) -> list[TrailEntry]:
        """The newest `count` requests, newest first."""
        entries = self._entries
        return [entries[-i] for i in range(1, min(count, len(entries)) + 1)]

    def figures(self, now: float) -> TrailFigures:
        """Per model and per replica, over the requests of the last `window_s` still kept."""
        oldest = now - self.window_s
        models: dict[str, Figures] = {}
        replicas: dict[str, Figures] = {}
        first = now
        for entry in reversed(self._entries):
            if entry.at < oldest:
                truncated = False  # the trail reaches back past the window
                break
            first = entry.at
            figures = models.get(entry.model)
            if figures is None:
                figures = models[entry.model] = Figures()
            figures.add(entry)
            if entry.replica is not None:
                figures = replicas.get(entry.replica)
                if figures is None:
                    figures = replicas[entry.replica] = Figures()
                figures.add(entry)
        else:  # every request kept is in the window: older ones may have been dropped
            truncated = len(self._entries) == self._entries.maxlen
        since = self.since if self.since is not None else now
        start = first if truncated else max(oldest, since)
        span_s = max(now - start, 1.0)
        return TrailFigures(
            span_s,
            {m: f.as_json(span_s) for m, f in models.items()},
            {r: f.as_json(span_s) for r, f in replicas.items()},
        )
