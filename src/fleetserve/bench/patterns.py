"""Load patterns: a request rate over time r(t), and their text syntax for the CLI.

Each pattern is a frozen value validated on construction. `pieces()` lowers it to
a time-ordered run of pieces (flat, linear or sinusoidal rate) whose cumulative
rate has a closed form, so `fleetserve.bench.schedule` can invert it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from fleetserve.errors import ConfigError

_TOLERANCE_S = 1e-9  # bisection stops when the bracket is this narrow


# --- pieces: spans of time with an invertible cumulative rate -------------------------------


@dataclass(frozen=True, slots=True)
class Flat:
    """A constant rate over [t0, t1)."""

    t0: float
    t1: float
    rate_rps: float

    def area(self) -> float:
        return 0.0 if self.rate_rps == 0 else self.rate_rps * (self.t1 - self.t0)

    def value(self, t: float) -> float:
        return self.rate_rps

    def solve(self, d: float, lo: float) -> float:
        """The earliest t in the piece where the integral from t0 reaches d."""
        return self.t0 if d <= 0 else self.t0 + d / self.rate_rps


@dataclass(frozen=True, slots=True)
class Linear:
    """A rate going linearly from `r0_rps` at t0 with `slope` rps per second."""

    t0: float
    t1: float
    r0_rps: float
    slope: float

    def area(self) -> float:
        span = self.t1 - self.t0
        return self.r0_rps * span + self.slope * span * span / 2

    def value(self, t: float) -> float:
        return self.r0_rps + self.slope * (t - self.t0)

    def solve(self, d: float, lo: float) -> float:
        if d <= 0:
            return self.t0
        # r0*u + slope*u^2/2 = d, in the form that stays accurate when slope -> 0.
        root = math.sqrt(max(0.0, self.r0_rps * self.r0_rps + 2 * self.slope * d))
        return self.t0 + 2 * d / (self.r0_rps + root)


@dataclass(frozen=True, slots=True)
class Sine:
    """mean + amplitude * sin(2*pi*(t - origin)/period); no closed-form inverse."""

    t0: float
    t1: float
    mean_rps: float
    amplitude_rps: float
    period_s: float
    origin: float

    def _integral(self, t: float) -> float:
        w = 2 * math.pi / self.period_s
        swing = self.amplitude_rps / w
        return self.mean_rps * (t - self.t0) - swing * (
            math.cos(w * (t - self.origin)) - math.cos(w * (self.t0 - self.origin))
        )

    def area(self) -> float:
        return self._integral(self.t1)

    def value(self, t: float) -> float:
        w = 2 * math.pi / self.period_s
        return self.mean_rps + self.amplitude_rps * math.sin(w * (t - self.origin))

    def solve(self, d: float, lo: float) -> float:
        if d <= 0:
            return self.t0
        lo, hi = max(self.t0, lo), self.t1
        while hi - lo > _TOLERANCE_S:
            mid = (lo + hi) / 2
            if self._integral(mid) < d:
                lo = mid
            else:
                hi = mid
        return hi


Piece = Flat | Linear | Sine


def _shift(piece: Piece, by: float, end: float) -> Piece | None:
    """The piece moved `by` seconds later and cut at `end`; None when nothing is left."""
    t0, t1 = piece.t0 + by, min(piece.t1 + by, end)
    if t0 >= t1:
        return None
    if isinstance(piece, Sine):
        return replace(piece, t0=t0, t1=t1, origin=piece.origin + by)
    return replace(piece, t0=t0, t1=t1)


# --- patterns ---------------------------------------------------------------------------------


def _check(name: str, value: float, *, positive: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        wanted = "a finite number > 0" if positive else "a finite number >= 0"
        raise ConfigError(f"{name} must be {wanted}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Steady:
    rate_rps: float

    def __post_init__(self) -> None:
        _check("steady rate", self.rate_rps, positive=True)

    def pieces(self) -> Iterator[Piece]:
        yield Flat(0.0, math.inf, self.rate_rps)


@dataclass(frozen=True, slots=True)
class Ramp:
    """From `from_rps` to `to_rps` linearly over `over_s`, then holds `to_rps`."""

    from_rps: float
    to_rps: float
    over_s: float

    def __post_init__(self) -> None:
        _check("ramp from", self.from_rps)
        _check("ramp to", self.to_rps)
        _check("ramp over", self.over_s, positive=True)
        if self.from_rps == 0 and self.to_rps == 0:
            raise ConfigError("ramp needs from or to > 0")

    def pieces(self) -> Iterator[Piece]:
        slope = (self.to_rps - self.from_rps) / self.over_s
        yield Linear(0.0, self.over_s, self.from_rps, slope)
        yield Flat(self.over_s, math.inf, self.to_rps)


@dataclass(frozen=True, slots=True)
class Spike:
    """`base_rps`, except `peak_rps` during [at_s, at_s + for_s)."""

    base_rps: float
    peak_rps: float
    at_s: float
    for_s: float

    def __post_init__(self) -> None:
        _check("spike base", self.base_rps)
        _check("spike peak", self.peak_rps, positive=True)
        _check("spike at", self.at_s)
        _check("spike for", self.for_s, positive=True)

    def pieces(self) -> Iterator[Piece]:
        if self.at_s > 0:
            yield Flat(0.0, self.at_s, self.base_rps)
        yield Flat(self.at_s, self.at_s + self.for_s, self.peak_rps)
        yield Flat(self.at_s + self.for_s, math.inf, self.base_rps)


@dataclass(frozen=True, slots=True)
class Wave:
    """A sinusoid starting at the mean and rising: mean + amplitude*sin(2*pi*t/period)."""

    mean_rps: float
    amplitude_rps: float
    period_s: float

    def __post_init__(self) -> None:
        _check("wave mean", self.mean_rps, positive=True)
        _check("wave amplitude", self.amplitude_rps)
        _check("wave period", self.period_s, positive=True)
        if self.amplitude_rps > self.mean_rps:
            raise ConfigError(
                f"wave amplitude ({self.amplitude_rps}) must be <= mean ({self.mean_rps}):"
                " a rate cannot go below 0"
            )

    def pieces(self) -> Iterator[Piece]:
        # One piece per period keeps every bisection bracket finite and short.
        start = 0.0
        for cycle in range(1, 2**62):
            end = cycle * self.period_s
            yield Sine(start, end, self.mean_rps, self.amplitude_rps, self.period_s, 0.0)
            start = end


@dataclass(frozen=True, slots=True)
class Burst:
    """`base_rps`, with `burst_rps` for `for_s` starting at every multiple of `every_s`."""

    base_rps: float
    burst_rps: float
    every_s: float
    for_s: float

    def __post_init__(self) -> None:
        _check("burst base", self.base_rps)
        _check("burst rate", self.burst_rps, positive=True)
        _check("burst every", self.every_s, positive=True)
        _check("burst for", self.for_s, positive=True)
        if self.for_s >= self.every_s:
            raise ConfigError(f"burst for ({self.for_s}) must be < every ({self.every_s})")

    def pieces(self) -> Iterator[Piece]:
        yield Flat(0.0, self.every_s, self.base_rps)
        for cycle in range(1, 2**62):
            start = cycle * self.every_s
            yield Flat(start, start + self.for_s, self.burst_rps)
            yield Flat(start + self.for_s, start + self.every_s, self.base_rps)


@dataclass(frozen=True, slots=True)
class Stages:
    """Patterns one after another, each for its duration and in its own local time."""

    stages: tuple[tuple[float, Pattern], ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages needs at least one (duration_s, pattern) stage")
        for index, (duration_s, _) in enumerate(self.stages, start=1):
            _check(f"stage {index} duration", duration_s, positive=True)

    def pieces(self) -> Iterator[Piece]:
        offset = 0.0
        for duration_s, pattern in self.stages:
            end = offset + duration_s
            for piece in pattern.pieces():
                if piece.t0 + offset >= end:
                    break
                moved = _shift(piece, offset, end)
                if moved is not None:
                    yield moved
            offset = end


Pattern = Steady | Ramp | Spike | Wave | Burst | Stages


def value_at(pattern: Pattern, t: float) -> float:
    """The pattern's value at `t` >= 0 (a rate, or a number of users); 0 after its last stage.

    Each piece covers [t0, t1), so at a step the value is the new level.
    """
    for piece in pattern.pieces():
        if t < piece.t1:
            return max(0.0, piece.value(max(t, piece.t0)))
    return 0.0


def steady(rate_rps: float) -> Steady:
    return Steady(rate_rps)


def ramp(from_rps: float, to_rps: float, over_s: float) -> Ramp:
    return Ramp(from_rps, to_rps, over_s)


def spike(base_rps: float, peak_rps: float, at_s: float, for_s: float) -> Spike:
    return Spike(base_rps, peak_rps, at_s, for_s)


def wave(mean_rps: float, amplitude_rps: float, period_s: float) -> Wave:
    return Wave(mean_rps, amplitude_rps, period_s)


def burst(base_rps: float, burst_rps: float, every_s: float, for_s: float) -> Burst:
    return Burst(base_rps, burst_rps, every_s, for_s)


def stages(parts: list[tuple[float, Pattern]]) -> Stages:
    return Stages(tuple(parts))


# --- text syntax: `kind:key=value,...` ---------------------------------------------------------

_KINDS: dict[str, tuple[tuple[str, ...], Callable[..., Pattern]]] = {
    "steady": (("rate",), Steady),
    "ramp": (("from", "to", "over"), Ramp),
    "spike": (("base", "peak", "at", "for"), Spike),
    "wave": (("mean", "amplitude", "period"), Wave),
    "burst": (("base", "burst", "every", "for"), Burst),
}

SYNTAX_HELP = (
    "steady:rate=R | ramp:from=R,to=R,over=S | spike:base=R,peak=R,at=S,for=S"
    " | wave:mean=R,amplitude=R,period=S | burst:base=R,burst=R,every=S,for=S"
    " | stages:S=PATTERN;S=PATTERN..."
)


def _number(text: str, what: str, source: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"pattern {source!r}: {what} {text!r} is not a number") from None
    return value


def parse_pattern(text: str) -> Pattern:
    """Parse e.g. `spike:base=2,peak=40,at=30,for=60` or `stages:30=steady:rate=2;60=...`."""
    source = text.strip()
    kind, colon, body = source.partition(":")
    kind = kind.strip().lower()
    if not colon:
        raise ConfigError(f"pattern {source!r}: expected KIND:key=value,... ({SYNTAX_HELP})")
    if kind == "stages":
        parts: list[tuple[float, Pattern]] = []
        for stage in body.split(";"):
            duration, equals, inner = stage.partition("=")
            if not equals:
                raise ConfigError(f"pattern {source!r}: stage {stage!r} is not DURATION=PATTERN")
            parts.append(
                (_number(duration.strip(), "stage duration", source), parse_pattern(inner))
            )
        return stages(parts)
    if kind not in _KINDS:
        raise ConfigError(f"pattern {source!r}: unknown kind {kind!r} ({SYNTAX_HELP})")
    keys, build = _KINDS[kind]
    values: dict[str, float] = {}
    for item in body.split(","):
        key, equals, raw = item.partition("=")
        key = key.strip().lower()
        if not equals:
            raise ConfigError(f"pattern {source!r}: {item.strip()!r} is not key=value")
        if key not in keys:
            raise ConfigError(
                f"pattern {source!r}: {kind} has no {key!r} (keys: {', '.join(keys)})"
            )
        if key in values:
            raise ConfigError(f"pattern {source!r}: {key!r} given twice")
        values[key] = _number(raw.strip(), key, source)
    missing = [key for key in keys if key not in values]
    if missing:
        raise ConfigError(f"pattern {source!r}: {kind} needs {', '.join(missing)}")
    try:
        return build(*(values[key] for key in keys))
    except ConfigError as error:
        raise ConfigError(f"pattern {source!r}: {error}") from error
