"""A rolling window of each model's load as the gateway sees it: what the autoscaler reads.

Per model, a ring of fixed-width buckets (1 s by default) covers the last `window_s` seconds:
arrivals, completions, estimated token demand and a TTFT histogram per bucket. Writes are
O(1) (one dict lookup, an index, an add); reads merge the live buckets. `now` always comes
in from the caller, so the structure is pure data and tests drive it with plain floats.

TTFT percentiles come from log-spaced bins whose edges grow by 2% (`TTFT_BIN_RATIO`), and a
percentile reports the upper edge of its bin: never below the true sample, at most 2% above.
Rates divide by the span the window really covers: the buckets' width, or less while the
model's first event is younger than the window (a gateway that just started).

Demand in tokens is an estimate, stated here once: prompt tokens ~ body bytes / 4 (the
common ~4 characters per token of English BPE vocabularies; JSON keys and quoting make it
an over-estimate of a few percent for chat bodies), plus `max_tokens` when the request gives
it, else `DEFAULT_COMPLETION_TOKENS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BYTES_PER_PROMPT_TOKEN = 4
DEFAULT_COMPLETION_TOKENS = 256  # assumed answer length when a request sets no max_tokens
TTFT_BIN_RATIO = 1.02
TTFT_MIN_S = 1e-4  # faster first tokens count in the lowest bin
_LOG_RATIO = math.log(TTFT_BIN_RATIO)
_MIN_BIN = math.ceil(math.log(TTFT_MIN_S) / _LOG_RATIO)


def estimate_demand_tokens(body_bytes: int, max_tokens: int | None) -> int:
    """Tokens a request will cost an engine, prompt plus answer (see the module docstring)."""
    answer = max_tokens if max_tokens is not None else DEFAULT_COMPLETION_TOKENS
    return body_bytes // BYTES_PER_PROMPT_TOKEN + answer


def _ttft_bin(seconds: float) -> int:
    if seconds <= TTFT_MIN_S:
        return _MIN_BIN
    return max(math.ceil(math.log(seconds) / _LOG_RATIO), _MIN_BIN)


def _bin_upper_s(index: int) -> float:
    return float(TTFT_BIN_RATIO**index)


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """One model's load over the window, read at `now`. Rates are per second of window."""

    ttft_p95_s: float | None  # None: no stream's first token in the window
    ttft_samples: int
    arrival_rps: float
    demand_tps: float  # estimated tokens/s asked of the engines (module docstring)
    completed_rps: float  # requests answered (any status) per second
    held: int  # requests waiting for a replica now (scale from zero)
    in_flight: int  # requests accepted and not yet answered, held ones excluded
    window_s: float  # the span the rates are over


class _ModelLoad:
    __slots__ = ("arrivals", "completed", "first_at", "held", "open", "stamps", "tokens", "ttft")

    def __init__(self, buckets: int, first_at: float) -> None:
        self.stamps = [-1] * buckets  # which bucket number each slot holds now
        self.arrivals = [0] * buckets
        self.completed = [0] * buckets
        self.tokens = [0] * buckets
        self.ttft: list[dict[int, int]] = [{} for _ in range(buckets)]
        self.first_at = first_at
        self.open = 0  # arrived and not finished, held included
        self.held = 0

    def slot(self, number: int) -> int:
        """The ring slot of bucket `number`, emptied first if it held an older bucket."""
        i = number % len(self.stamps)
        if self.stamps[i] != number:
            self.stamps[i] = number
            self.arrivals[i] = 0
            self.completed[i] = 0
            self.tokens[i] = 0
            self.ttft[i] = {}
        return i


class LoadWindow:
    """Per-model rolling load. Not thread-safe; one per gateway worker (asyncio only)."""

    def __init__(self, window_s: float = 30.0, bucket_s: float = 1.0) -> None:
        if bucket_s <= 0 or window_s < bucket_s:
            raise ValueError(f"need 0 < bucket_s <= window_s, got {bucket_s=} {window_s=}")
        self.window_s = window_s
        self.bucket_s = bucket_s
        self._buckets = math.ceil(window_s / bucket_s)
        self._models: dict[str, _ModelLoad] = {}

    def _load(self, model: str, now: float) -> _ModelLoad:
        load = self._models.get(model)
        if load is None:
            load = self._models[model] = _ModelLoad(self._buckets, now)
        return load

    def models(self) -> list[str]:
        return list(self._models)

    # -- writes (hot path) ------------------------------------------------------------------
    def arrived(self, model: str, now: float, demand_tokens: int) -> None:
        load = self._load(model, now)
        i = load.slot(int(now // self.bucket_s))
        load.arrivals[i] += 1
        load.tokens[i] += demand_tokens
        load.open += 1

    def finished(self, model: str, now: float) -> None:
        load = self._load(model, now)
        i = load.slot(int(now // self.bucket_s))
        load.completed[i] += 1
        if load.open > 0:
            load.open -= 1

    def observe_ttft(self, model: str, now: float, ttft_s: float) -> None:
        load = self._load(model, now)
        bins = load.ttft[load.slot(int(now // self.bucket_s))]
        b = _ttft_bin(ttft_s)
        bins[b] = bins.get(b, 0) + 1

    def hold_started(self, model: str, now: float) -> None:
        self._load(model, now).held += 1

    def hold_ended(self, model: str, now: float) -> None:
        load = self._load(model, now)
        if load.held > 0:
            load.held -= 1

    # -- several processes -------------------------------------------------------------------
    def export(self, now: float) -> dict[str, object]:
        """This window's live buckets as plain JSON data, for another process to merge
        (`absorb`): the gateway's worker processes each keep a window of their own."""
        current = int(now // self.bucket_s)
        oldest = current - self._buckets + 1
        models: dict[str, object] = {}
        for model, load in self._models.items():
            buckets = [
                [stamp, load.arrivals[i], load.completed[i], load.tokens[i], load.ttft[i]]
                for i, stamp in enumerate(load.stamps)
                if oldest <= stamp <= current
            ]
            models[model] = {
                "first_at": load.first_at, "open": load.open, "held": load.held,
                "buckets": buckets,
            }  # fmt: skip
        return {"window_s": self.window_s, "bucket_s": self.bucket_s, "models": models}

    def absorb(self, exported: dict[str, object], now: float) -> None:
        """Add another window's `export()` into this one (same window and bucket widths);
        buckets older than this window at `now` are left out.

        Buckets are numbered from the monotonic clock, which all processes of one machine
        share, so the same second lands in the same bucket; the sum is exact, TTFT bins too.
        ValueError if the data does not have the shape `export()` gives."""
        if exported.get("bucket_s") != self.bucket_s or exported.get("window_s") != self.window_s:
            raise ValueError("windows of different widths cannot be merged")
        models = exported.get("models")
        if not isinstance(models, dict):
            raise ValueError("no models in the exported window")  # noqa: TRY004 (bad data)
        oldest = int(now // self.bucket_s) - self._buckets + 1
        try:
            for model, data in models.items():
                load = self._load(str(model), float(data["first_at"]))
                load.first_at = min(load.first_at, float(data["first_at"]))
                load.open += int(data["open"])
                load.held += int(data["held"])
                for stamp, arrivals, completed, tokens, ttft in data["buckets"]:
                    if int(stamp) < oldest:
                        continue
                    i = load.slot(int(stamp))
                    load.arrivals[i] += int(arrivals)
                    load.completed[i] += int(completed)
                    load.tokens[i] += int(tokens)
                    bins = load.ttft[i]
                    for b, n in ttft.items():
                        bins[int(b)] = bins.get(int(b), 0) + int(n)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not an exported load window: {exc}") from exc

    # -- reads --------------------------------------------------------------------------------
    def snapshot(self, model: str, now: float) -> LoadSnapshot:
        load = self._models.get(model)
        if load is None:
            return LoadSnapshot(None, 0, 0.0, 0.0, 0.0, 0, 0, 0.0)
        current = int(now // self.bucket_s)
        oldest = current - self._buckets + 1
        arrivals = completed = tokens = 0
        merged: dict[int, int] = {}
        for i, stamp in enumerate(load.stamps):
            if oldest <= stamp <= current:
                arrivals += load.arrivals[i]
                completed += load.completed[i]
                tokens += load.tokens[i]
                for b, n in load.ttft[i].items():
                    merged[b] = merged.get(b, 0) + n
        covered_s = now - oldest * self.bucket_s  # full buckets plus the current partial one
        span_s = max(min(covered_s, now - load.first_at), self.bucket_s)
        samples = sum(merged.values())
        return LoadSnapshot(
            ttft_p95_s=_histogram_quantile(merged, samples, 0.95),
            ttft_samples=samples,
            arrival_rps=arrivals / span_s,
            demand_tps=tokens / span_s,
            completed_rps=completed / span_s,
            held=load.held,
            in_flight=max(load.open - load.held, 0),
            window_s=span_s,
        )


def _histogram_quantile(bins: dict[int, int], total: int, q: float) -> float | None:
    """The q-quantile (0-1) of a histogram: the upper edge of the bin that holds the
    nearest-rank q-quantile (rank ceil(q * total)), so at most one bin's width above the
    sample's own; None if empty. Not `telemetry.quantiles.percentile`: the samples are gone,
    only their bins are kept (as Prometheus' histogram_quantile, without interpolation)."""
    if total == 0:
        return None
    rank = max(math.ceil(q * total), 1)
    seen = 0
    for b in sorted(bins):
        seen += bins[b]
        if seen >= rank:
            return _bin_upper_s(b)
    raise AssertionError("unreachable: ranks never exceed the total")
