"""Intended send times for `fleetserve bench`: pure functions of a load shape.

Latency is counted from the intended time, not the actual send, so a slow client
cannot hide queueing (coordinated omission). Nothing here reads a clock or does
I/O except `read_trace`; randomness comes only from an injected `random.Random`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from fleetserve.bench.patterns import Pattern, value_at
from fleetserve.errors import ConfigError

Arrivals = Literal["constant", "poisson"]

DEFAULT_MAX_REQUESTS = 100_000


def _check_bounds(duration_s: float, max_requests: int) -> None:
    if not math.isfinite(duration_s) or duration_s <= 0:
        raise ConfigError(f"duration_s must be a finite number > 0, got {duration_s!r}")
    if max_requests < 1:
        raise ConfigError(f"max_requests must be >= 1, got {max_requests!r}")


def _targets(arrivals: Arrivals, rng: random.Random | None) -> Iterator[float]:
    """Cumulative counts at which requests go: 0, 1, 2... or a unit-rate Poisson process."""
    if arrivals not in ("constant", "poisson"):
        raise ConfigError(f"arrivals must be 'constant' or 'poisson', got {arrivals!r}")
    if arrivals == "poisson" and rng is None:
        raise ConfigError("poisson arrivals need an rng (a seeded random.Random)")
    poisson = rng if arrivals == "poisson" else None
    total = 0.0 if poisson is None else poisson.expovariate(1.0)
    while True:
        yield total
        total += 1.0 if poisson is None else poisson.expovariate(1.0)


def schedule(
    pattern: Pattern,
    *,
    duration_s: float,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    arrivals: Arrivals = "constant",
    rng: random.Random | None = None,
) -> list[float]:
    """Sorted send offsets (s) in [0, duration_s), at most `max_requests` of them.

    Constant arrivals send the k-th request (k = 0, 1, ...) at the earliest t where
    the integral of the rate from 0 to t equals k. Poisson arrivals map a unit-rate
    Poisson process through the inverse of that integral (time-rescaling).
    """
    _check_bounds(duration_s, max_requests)
    targets = _targets(arrivals, rng)
    target = next(targets)  # validates arrivals and rng before any work
    offsets: list[float] = []
    reached = 0.0  # integral of the rate up to the current piece's start
    last = 0.0
    for piece in pattern.pieces():
        if piece.t0 >= duration_s:
            break
        area = piece.area()
        while target <= reached + area:
            last = piece.solve(target - reached, last)
            if last >= duration_s:
                return offsets
            offsets.append(last)
            if len(offsets) >= max_requests:
                return offsets
            target = next(targets)
        reached += area
    return offsets


@dataclass(frozen=True, slots=True)
class ClosedLoop:
    """Not a schedule: each user sends, waits for the response, thinks, and sends again.

    With a `pattern`, the number of active users follows it over time: at t it is the
    pattern's value at t, rounded (`spike:base=2,peak=40,at=30,for=60` goes from 2 to 40
    users and back), never more than `users`. A user above the count finishes its request
    and stops; one below it that is not running starts.
    """

    users: int
    think_time_s: float = 0.0
    pattern: Pattern | None = None

    def __post_init__(self) -> None:
        if isinstance(self.users, bool) or self.users < 1:
            raise ConfigError(f"closed loop users must be >= 1, got {self.users!r}")
        if not math.isfinite(self.think_time_s) or self.think_time_s < 0:
            raise ConfigError(
                f"closed loop think_time_s must be a finite number >= 0, got {self.think_time_s!r}"
            )


def active_users(loop: ClosedLoop, t: float) -> int:
    """How many users of `loop` are active `t` seconds into the run."""
    if loop.pattern is None:
        return loop.users
    return min(loop.users, max(0, round(value_at(loop.pattern, t))))


# --- trace replay ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One recorded request: when to send it relative to the trace's start, and its shape."""

    offset_s: float
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    prompt: str | None = None


TraceFormat = Literal["csv", "jsonl"]


def _timestamp(value: object, line: int) -> float:
    """Seconds as a number, or ISO-8601 (naive times are taken as UTC)."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"trace line {line}: timestamp is missing")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                raise ConfigError(
                    f"trace line {line}: timestamp {text!r} is neither seconds nor ISO-8601"
                ) from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            seconds = moment.timestamp()
    if not math.isfinite(seconds):
        raise ConfigError(f"trace line {line}: timestamp {value!r} is not finite")
    return seconds


def _tokens(value: object, name: str, line: int) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and value.strip().isdigit():
        count = int(value.strip())
    else:
        raise ConfigError(f"trace line {line}: {name} {value!r} is not a whole number >= 0")
    if count < 0:
        raise ConfigError(f"trace line {line}: {name} {value!r} is not a whole number >= 0")
    return count


def _entry(row: dict[str, object], line: int) -> tuple[float, TraceEntry]:
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ConfigError(f"trace line {line}: prompt must be a string")
    stamp = _timestamp(row.get("timestamp"), line)
    entry = TraceEntry(
        0.0,
        _tokens(row.get("prompt_tokens"), "prompt_tokens", line),
        _tokens(row.get("output_tokens"), "output_tokens", line),
        prompt if prompt else None,
    )
    return stamp, entry


def _csv_rows(text: str) -> Iterator[tuple[dict[str, object], int]]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "timestamp" not in reader.fieldnames:
        raise ConfigError("trace line 1: the CSV header has no 'timestamp' column")
    for row in reader:
        if None in row:
            raise ConfigError(f"trace line {reader.line_num}: more fields than the header")
        yield dict(row), reader.line_num


def _jsonl_rows(text: str) -> Iterator[tuple[dict[str, object], int]]:
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ConfigError(f"trace line {line}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"trace line {line}: expected a JSON object")
        yield row, line


def parse_trace(text: str, *, fmt: TraceFormat, speedup: float = 1.0) -> list[TraceEntry]:
    """Entries sorted by offset from the earliest timestamp, offsets divided by `speedup`."""
    if not math.isfinite(speedup) or speedup <= 0:
        raise ConfigError(f"trace speedup must be a finite number > 0, got {speedup!r}")
    if fmt not in ("csv", "jsonl"):
        raise ConfigError(f"trace format must be 'csv' or 'jsonl', got {fmt!r}")
    rows = _csv_rows(text) if fmt == "csv" else _jsonl_rows(text)
    stamped = [_entry(row, line) for row, line in rows]
    if not stamped:
        raise ConfigError("trace has no requests")
    start = min(stamp for stamp, _ in stamped)
    entries = [
        TraceEntry((stamp - start) / speedup, e.prompt_tokens, e.output_tokens, e.prompt)
        for stamp, e in stamped
    ]
    entries.sort(key=lambda e: e.offset_s)  # stable: ties keep file order
    return entries


def read_trace(path: Path, *, speedup: float = 1.0) -> list[TraceEntry]:
    """Read and parse a trace file; `.jsonl`/`.ndjson` are JSONL, anything else CSV."""
    fmt: TraceFormat = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read trace {path}: {error}") from error
    return parse_trace(text, fmt=fmt, speedup=speedup)


def bound_trace(
    entries: list[TraceEntry], *, duration_s: float, max_requests: int = DEFAULT_MAX_REQUESTS
) -> list[TraceEntry]:
    """The entries a bench run sends: offsets before `duration_s`, at most `max_requests`."""
    _check_bounds(duration_s, max_requests)
    return [e for e in entries if e.offset_s < duration_s][:max_requests]
