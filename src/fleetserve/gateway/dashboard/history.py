"""What the dashboard remembers between its samples: replicas over the last 15 minutes and
each replica's generated tokens per second.

`FleetHistory` keeps one sample a second per model (ready, all replicas, and the autoscaler's
desired count when there is one), bounded to `span_s`: 900 small tuples a model. It is
filled by the dashboard's sampler whether or not anyone watches, so that a page opened now
shows the last 15 minutes.

`TokenRates` turns the engines' cumulative generated-token counters (engine signals, read at
each /metrics scrape) into a rate between the last two scrapes; a counter that went down (an
engine restarted) gives no rate until the next scrape.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

HISTORY_SPAN_S = 900.0  # 15 minutes
HISTORY_STEP_S = 1.0


@dataclass(frozen=True, slots=True)
class FleetSample:
    at: float
    ready: int
    replicas: int
    desired: int | None


class FleetHistory:
    def __init__(self, span_s: float = HISTORY_SPAN_S, step_s: float = HISTORY_STEP_S) -> None:
        self.span_s = span_s
        self.step_s = step_s
        self._size = int(span_s / step_s) + 1
        self._models: dict[str, deque[FleetSample]] = {}

    def add(self, model: str, sample: FleetSample) -> None:
        samples = self._models.get(model)
        if samples is None:
            samples = self._models[model] = deque(maxlen=self._size)
        samples.append(sample)

    def view(self, now: float) -> dict[str, object]:
        """Per model, parallel lists oldest first: seconds ago, ready, replicas, desired."""
        models: dict[str, object] = {}
        for model, samples in self._models.items():
            kept = [s for s in samples if now - s.at <= self.span_s]
            models[model] = {
                "s_ago": [round(now - s.at, 1) for s in kept],
                "ready": [s.ready for s in kept],
                "replicas": [s.replicas for s in kept],
                "desired": [s.desired for s in kept],
            }
        return {"span_s": self.span_s, "step_s": self.step_s, "models": models}


class TokenRates:
    """Generated tokens/s per replica from successive scrapes of its counter."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}  # replica -> (counter, scraped at)
        self._rates: dict[str, float | None] = {}

    def observe(self, replica_id: str, total: float | None, scraped_at: float | None) -> None:
        if total is None or scraped_at is None:  # no counter, or stale signals dropped
            self.forget(replica_id)
            return
        last = self._last.get(replica_id)
        if last is not None and scraped_at <= last[1]:
            return  # the same scrape as before
        self._last[replica_id] = (total, scraped_at)
        if last is None or total < last[0]:
            self._rates[replica_id] = None
            return
        self._rates[replica_id] = (total - last[0]) / (scraped_at - last[1])

    def rate(self, replica_id: str) -> float | None:
        return self._rates.get(replica_id)

    def forget(self, replica_id: str) -> None:
        self._last.pop(replica_id, None)
        self._rates.pop(replica_id, None)
