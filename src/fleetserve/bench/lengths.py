"""Token lengths for bench workloads: fixed, or drawn from a distribution, with a text syntax.

Every draw is a whole number >= 1 (a distribution's draws are rounded and clipped to
[lo, hi]), and randomness comes only from the `random.Random` passed in.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from fleetserve.errors import ConfigError

MAX_TOKENS = 1_000_000  # a sanity bound on any length


def _clip(value: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(value)))


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not 1 <= value <= MAX_TOKENS:
        raise ConfigError(f"{name} must be a whole number in 1..{MAX_TOKENS}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Fixed:
    tokens: int

    def __post_init__(self) -> None:
        _check_count("fixed length", self.tokens)

    def draw(self, rng: random.Random) -> int:
        return self.tokens


@dataclass(frozen=True, slots=True)
class Uniform:
    """Every whole number in lo..hi equally likely."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        _check_count("uniform lo", self.lo)
        _check_count("uniform hi", self.hi)
        if self.lo > self.hi:
            raise ConfigError(f"uniform lo ({self.lo}) must be <= hi ({self.hi})")

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.lo, self.hi)


@dataclass(frozen=True, slots=True)
class Normal:
    """Normal with `mean` and `sd`, rounded and clipped to [lo, hi]."""

    mean: float
    sd: float
    lo: int = 1
    hi: int = MAX_TOKENS

    def __post_init__(self) -> None:
        _check_moments("normal", self.mean, self.sd)
        _check_range("normal", self.lo, self.hi)

    def draw(self, rng: random.Random) -> int:
        return _clip(rng.gauss(self.mean, self.sd), self.lo, self.hi)


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Lognormal whose own mean and sd (in tokens) are `mean` and `sd`; clipped to [lo, hi]."""

    mean: float
    sd: float
    lo: int = 1
    hi: int = MAX_TOKENS

    def __post_init__(self) -> None:
        _check_moments("lognormal", self.mean, self.sd)
        if self.mean <= 0:
            raise ConfigError(f"lognormal mean must be > 0, got {self.mean!r}")
        _check_range("lognormal", self.lo, self.hi)

    def draw(self, rng: random.Random) -> int:
        sigma2 = math.log1p((self.sd / self.mean) ** 2)
        mu = math.log(self.mean) - sigma2 / 2
        return _clip(rng.lognormvariate(mu, math.sqrt(sigma2)), self.lo, self.hi)


@dataclass(frozen=True, slots=True)
class Choice:
    """One of `values`, each equally likely (repeat a value to weight it)."""

    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ConfigError("choice needs at least one value")
        for value in self.values:
            _check_count("choice value", value)

    def draw(self, rng: random.Random) -> int:
        return self.values[rng.randrange(len(self.values))]


Length = Fixed | Uniform | Normal | LogNormal | Choice


def _check_moments(kind: str, mean: float, sd: float) -> None:
    if not (math.isfinite(mean) and math.isfinite(sd)) or mean < 0 or sd < 0:
        raise ConfigError(f"{kind} mean and sd must be finite numbers >= 0, got {mean}, {sd}")


def _check_range(kind: str, lo: int, hi: int) -> None:
    _check_count(f"{kind} lo", lo)
    _check_count(f"{kind} hi", hi)
    if lo > hi:
        raise ConfigError(f"{kind} lo ({lo}) must be <= hi ({hi})")


LENGTH_SYNTAX = (
    "N | uniform:lo=N,hi=N | normal:mean=X,sd=X[,lo=N,hi=N]"
    " | lognormal:mean=X,sd=X[,lo=N,hi=N] | choice:N,N,..."
)


def _int(text: str, source: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"length {source!r}: {text.strip()!r} is not a whole number") from None


def _float(text: str, source: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"length {source!r}: {text.strip()!r} is not a number") from None


def parse_length(text: str) -> Length:
    """Parse `128`, `uniform:lo=64,hi=256`, `normal:mean=200,sd=50`, `choice:64,128`..."""
    source = text.strip()
    kind, colon, body = source.partition(":")
    kind = kind.strip().lower()
    if not colon:
        return Fixed(_int(source, source))
    if kind == "choice":
        return Choice(tuple(_int(v, source) for v in body.split(",")))
    keys = {"uniform": ("lo", "hi"), "normal": ("mean", "sd"), "lognormal": ("mean", "sd")}
    if kind not in keys:
        raise ConfigError(f"length {source!r}: unknown kind {kind!r} ({LENGTH_SYNTAX})")
    values: dict[str, str] = {}
    for item in body.split(","):
        key, equals, raw = item.partition("=")
        key = key.strip().lower()
        allowed = ("lo", "hi") if kind == "uniform" else ("mean", "sd", "lo", "hi")
        if not equals or key not in allowed or key in values:
            raise ConfigError(f"length {source!r}: bad item {item.strip()!r} ({LENGTH_SYNTAX})")
        values[key] = raw
    missing = [key for key in keys[kind] if key not in values]
    if missing:
        raise ConfigError(f"length {source!r}: {kind} needs {', '.join(missing)}")
    if kind == "uniform":
        return Uniform(_int(values["lo"], source), _int(values["hi"], source))
    lo = _int(values["lo"], source) if "lo" in values else 1
    hi = _int(values["hi"], source) if "hi" in values else MAX_TOKENS
    mean, sd = _float(values["mean"], source), _float(values["sd"], source)
    return Normal(mean, sd, lo, hi) if kind == "normal" else LogNormal(mean, sd, lo, hi)
