"""`fleetserve bench --tenants FILE`: what the file says, and what each tenant runs once the
command's flags fill in what it leaves out.

```yaml
tenants:
  - name: search              # letters, digits, . _ - (as tenant names are)
    key_env: SEARCH_KEY       # or `key: fs-...`; neither: the command's --api-key
    users: 20                 # closed loop (`concurrency:` is the same), or a users pattern
    output_tokens: 64
  - name: batch
    key: fs-AbCd1234-...
    rate_rps: 2               # open loop: req/s, or a rate pattern (ramp:from=1,to=5,over=60)
    arrivals: constant
    stream: false
```

Everything a tenant does not give (load, arrivals, think time, model, API, stream, lengths,
shared prefix, dataset, temperature, request bound) is the command's flag. A tenant's seed is
the command's plus its position, so tenants do not send identical prompts.

A key is a secret: it is held as a `SecretStr`, goes only into the Authorization header, and
is never printed or written; the report names it by its public prefix (`fs-AbCd1234`) at most.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from fleetserve.bench.lengths import parse_length
from fleetserve.bench.patterns import parse_pattern, steady
from fleetserve.bench.schedule import Arrivals, ClosedLoop
from fleetserve.bench.session import ClosedLoad, OpenLoad, users_pattern_peak
from fleetserve.bench.workload import WorkloadSpec, read_dataset
from fleetserve.errors import ConfigError
from fleetserve.tenancy.keys import parse_key
from fleetserve.tenancy.model import valid_name

MAX_TENANTS = 1_000
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TenantLoadSpec = OpenLoad | ClosedLoad


def _number_or_text(value: float | str, what: str) -> tuple[float | None, str]:
    """(10.0, "10") for a number or a numeric string, (None, text) for a pattern."""
    if isinstance(value, int | float):
        return float(value), f"{value:g}"
    text = value.strip()
    if not text:
        raise ConfigError(f"{what} must not be empty")
    try:
        return float(text), text
    except ValueError:
        return None, text


def make_load(
    rate: float | str | None,
    users: float | str | None,
    *,
    arrivals: Arrivals,
    think_time_s: float,
    duration_s: float,
    names: tuple[str, str] = ("--rate", "--users"),
) -> TenantLoadSpec:
    """An open loop from `rate` (req/s or a rate pattern) or a closed loop from `users` (a
    count or a users pattern); `names` word the errors after the flags or fields given."""
    if (rate is None) == (users is None):
        raise ConfigError(f"give one of {names[0]} (open loop) or {names[1]} (closed loop)")
    if rate is not None:
        value, text = _number_or_text(rate, names[0])
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{names[0]} must be a finite number > 0, got {text!r}")
        pattern = steady(value) if value is not None else parse_pattern(text)
        shape = f"steady {value:g} req/s" if value is not None else text
        return OpenLoad(pattern, arrivals, f"open loop, {arrivals} arrivals, {shape}")
    assert users is not None
    value, text = _number_or_text(users, names[1])
    if value is not None:
        if not math.isfinite(value) or value != int(value) or value < 1:
            raise ConfigError(f"{names[1]} takes a whole number >= 1 or a pattern, not {text!r}")
        loop = ClosedLoop(int(value), think_time_s)
        shape = f"{int(value)} users"
    else:
        pattern = parse_pattern(text)
        loop = ClosedLoop(users_pattern_peak(pattern, duration_s), think_time_s, pattern)
        shape = f"users {text}"
    think = f", think {think_time_s:g}s" if think_time_s else ""
    return ClosedLoad(loop, f"closed loop, {shape}{think}")


def parse_shared_prefix(text: str) -> tuple[int, int]:
    """GROUPS:TOKENS, e.g. `8:1024`."""
    try:
        groups_text, _, tokens_text = text.partition(":")
        return int(groups_text), int(tokens_text)
    except ValueError:
        raise ConfigError("shared prefix takes GROUPS:TOKENS, e.g. 8:1024") from None


class _CheckedError(ValueError):
    """A ConfigError's message, re-raised where pydantic will name the field."""


def _check(build: Any, value: Any) -> Any:
    try:
        build(value)
    except ConfigError as error:
        raise _CheckedError(str(error)) from None
    return value


class TenantEntry(BaseModel):
    """One tenant as the file gives it; None: inherit the command's flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    key: SecretStr | None = None
    key_env: StrictStr | None = None
    rate_rps: StrictFloat | StrictInt | StrictStr | None = None
    users: StrictInt | StrictStr | None = None
    concurrency: StrictInt | StrictStr | None = None  # the same as `users`
    arrivals: Literal["constant", "poisson"] | None = None
    think_time_s: StrictFloat | StrictInt | None = Field(None, ge=0, allow_inf_nan=False)
    max_requests: StrictInt | None = Field(None, ge=1)
    model: StrictStr | None = Field(None, min_length=1)
    api: Literal["chat", "completions"] | None = None
    stream: StrictBool | None = None
    prompt_tokens: StrictInt | StrictStr | None = None
    output_tokens: StrictInt | StrictStr | None = None
    shared_prefix: StrictStr | None = None
    dataset: Path | None = None  # relative to the tenants file's folder
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, allow_inf_nan=False)
    seed: StrictInt | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not valid_name(value):
            raise ValueError(
                "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        # The value is never part of a message: it is a secret.
        if value is not None and not _header_safe(value.get_secret_value()):
            raise ValueError("a key is printable ASCII without spaces (e.g. fs-...)")
        return value

    @field_validator("key_env")
    @classmethod
    def _key_env(cls, value: str | None) -> str | None:
        if value is not None and not ENV_NAME.fullmatch(value):
            raise ValueError("an environment variable name (letters, digits, _)")
        return value

    @field_validator("rate_rps")
    @classmethod
    def _rate(cls, value: float | str | None) -> float | str | None:
        return None if value is None else _check(lambda v: _try_load(v, None), value)

    @field_validator("users", "concurrency")
    @classmethod
    def _users(cls, value: int | str | None) -> int | str | None:
        return None if value is None else _check(lambda v: _try_load(None, v), value)

    @field_validator("prompt_tokens", "output_tokens")
    @classmethod
    def _length(cls, value: int | str | None) -> int | str | None:
        return None if value is None else _check(lambda v: parse_length(str(v)), value)

    @field_validator("shared_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        return None if value is None else _check(parse_shared_prefix, value)

    @model_validator(mode="after")
    def _one_of_each(self) -> TenantEntry:
        if self.key is not None and self.key_env is not None:
            raise ValueError("give key or key_env, not both")
        loads = [n for n in ("rate_rps", "users", "concurrency") if getattr(self, n) is not None]
        if len(loads) > 1:
            given = " and ".join(loads)
            raise ValueError(f"give one of rate_rps, users or concurrency, not {given}")
        if self.arrivals is not None and loads and loads[0] != "rate_rps":
            raise ValueError("arrivals applies to an open loop (rate_rps), not to users")
        if self.think_time_s is not None and loads == ["rate_rps"]:
            raise ValueError("think_time_s applies to a closed loop (users), not to rate_rps")
        return self

    @property
    def own_users(self) -> int | str | None:
        return self.users if self.users is not None else self.concurrency


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: list[TenantEntry] = Field(min_length=1, max_length=MAX_TENANTS)

    @field_validator("tenants")
    @classmethod
    def _unique(cls, tenants: list[TenantEntry]) -> list[TenantEntry]:
        seen: set[str] = set()
        for entry in tenants:
            if entry.name in seen:
                raise ValueError(f"tenant name {entry.name!r} is given twice")
            seen.add(entry.name)
        return tenants


def _try_load(rate: float | str | None, users: float | str | None) -> TenantLoadSpec:
    """Whether a load field parses (its shape does not depend on the command's flags)."""
    names = ("rate_rps", "users")
    return make_load(rate, users, arrivals="constant", think_time_s=0, duration_s=1, names=names)


def _header_safe(text: str) -> bool:
    return bool(text) and all(33 <= ord(c) < 127 for c in text)


def _where(loc: Sequence[int | str], raw: Any) -> str:
    """`tenants[2] (batch).rate_rps` from pydantic's ("tenants", 2, "rate_rps")."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int) and parts:
            parts[-1] += f"[{part}]"
            name = _raw_name(raw, part)
            if name:
                parts[-1] += f" ({name})"
        else:
            parts.append(str(part))
    return ".".join(parts) or "file"


def _raw_name(raw: Any, index: int) -> str | None:
    tenants = raw.get("tenants") if isinstance(raw, dict) else None
    if isinstance(tenants, list) and 0 <= index < len(tenants):
        entry = tenants[index]
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            return str(entry["name"])[:63]
    return None


def _message(error: Mapping[str, Any]) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def parse_tenants(text: str, source: str) -> TenantsFile:
    """Validate a tenants file's text; ConfigError is one line naming `source` and the field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        # Only the problem and its place: a YAML error's snippet of the line could be a key.
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ConfigError(f"tenants file {source}: {problem}{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"tenants file {source}: expected a mapping with a 'tenants:' list")
    try:
        return TenantsFile.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"tenants file {source}: {_first_problem(error, raw)}") from None


def _first_problem(error: ValidationError, raw: Any) -> str:
    """The first problem as `where: what`. A field of several types (`users: 2` or a
    pattern) fails once per type: those are one problem, worded as one."""
    problems = error.errors(include_url=False)
    # ("tenants", 2, "users", "int"): the fourth part names a member of the field's union.
    field_of = [tuple(p["loc"][:3]) if p["loc"][:1] == ("tenants",) else p["loc"] for p in problems]
    same = [p for p, loc in zip(problems, field_of, strict=True) if loc == field_of[0]]
    if len(same) > 1:
        wanted = " or ".join(_message(p).removeprefix("input should be ") for p in same)
        what = f"input should be {wanted}"
    else:
        what = _message(same[0])
    more = len(problems) - len(same)
    tail = f" (and {more} more)" if more else ""
    return f"{_where(field_of[0], raw)}: {what}{tail}"


def read_tenants(path: Path) -> TenantsFile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise ConfigError(f"cannot read tenants file {path}: {reason}") from None
    return parse_tenants(text, str(path))


# --- what each tenant runs ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantDefaults:
    """The command's flags, which a tenant inherits for whatever it does not give."""

    workload: WorkloadSpec  # `model` is "" when --model was not given
    duration_s: float
    rate: str | None = None  # --rate as given
    users: str | None = None  # --users as given
    arrivals: Arrivals = "poisson"
    think_time_s: float = 0.0
    api_key: str | None = field(default=None, repr=False)
    max_requests: int = 100_000
    seed: int = 0


@dataclass(frozen=True, slots=True)
class TenantPlan:
    """One tenant, resolved: everything it sends and how the report names it."""

    name: str
    key: str | None = field(repr=False)  # the secret: only for the Authorization header
    key_prefix: str | None  # `fs-XXXXXXXX`, when the key is a fleetserve key
    key_source: str  # "key", "key_env NAME", "--api-key" or "none"
    workload: WorkloadSpec
    load: TenantLoadSpec
    max_requests: int
    seed: int


def resolve_tenants(
    tenants: TenantsFile,
    defaults: TenantDefaults,
    *,
    source: Path,
    environ: Mapping[str, str] | None = None,
) -> list[TenantPlan]:
    """Each tenant with the command's flags filled in; ConfigError names the file and field."""
    env = os.environ if environ is None else environ
    plans: list[TenantPlan] = []
    for index, entry in enumerate(tenants.tenants):
        where = f"tenants file {source}: tenants[{index}] ({entry.name})"
        try:
            plans.append(_resolve(entry, index, defaults, source.parent, env))
        except _FieldError as error:
            raise ConfigError(f"{where}.{error.field}: {error.message}") from None
    return plans


class _FieldError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = name, message


def _resolve(
    entry: TenantEntry, index: int, defaults: TenantDefaults, folder: Path, env: Mapping[str, str]
) -> TenantPlan:
    key, source = _key(entry, defaults, env)
    parsed = parse_key(key) if key is not None else None
    return TenantPlan(
        name=entry.name,
        key=key,
        key_prefix=f"fs-{parsed.prefix}" if parsed is not None else None,
        key_source=source,
        workload=_workload(entry, defaults.workload, folder),
        load=_load(entry, defaults),
        max_requests=entry.max_requests or defaults.max_requests,
        seed=entry.seed if entry.seed is not None else defaults.seed + index,
    )


def _key(
    entry: TenantEntry, defaults: TenantDefaults, env: Mapping[str, str]
) -> tuple[str | None, str]:
    if entry.key is not None:
        return entry.key.get_secret_value(), "key"
    if entry.key_env is not None:
        value = env.get(entry.key_env, "").strip()
        if not value:
            raise _FieldError("key_env", f"the environment variable {entry.key_env} is not set")
        if not _header_safe(value):
            raise _FieldError(
                "key_env", f"{entry.key_env} holds a key that is not printable ASCII without spaces"
            )
        return value, f"key_env {entry.key_env}"
    if defaults.api_key:
        return defaults.api_key, "--api-key"
    return None, "none"


def _load(entry: TenantEntry, defaults: TenantDefaults) -> TenantLoadSpec:
    rate, users = entry.rate_rps, entry.own_users
    field_name = "rate_rps" if rate is not None else "users"
    if rate is None and users is None:
        rate, users = defaults.rate, defaults.users
        field_name = "rate_rps" if rate is not None else "users"
        if rate is None and users is None:
            raise _FieldError("rate_rps", "no load: give rate_rps or users, or --rate or --users")
    if entry.arrivals is not None and rate is None:
        raise _FieldError("arrivals", "applies to an open loop (rate_rps), not to users")
    if entry.think_time_s is not None and users is None:
        raise _FieldError("think_time_s", "applies to a closed loop (users), not to a rate")
    think = float(entry.think_time_s) if entry.think_time_s is not None else defaults.think_time_s
    try:
        return make_load(
            rate, users, arrivals=entry.arrivals or defaults.arrivals, think_time_s=think,
            duration_s=defaults.duration_s, names=("rate_rps", "users"),
        )  # fmt: skip
    except ConfigError as error:
        raise _FieldError(field_name, str(error)) from None


def _workload(entry: TenantEntry, base: WorkloadSpec, folder: Path) -> WorkloadSpec:
    changes: dict[str, Any] = {}
    if entry.model is not None:
        changes["model"] = entry.model
    elif not base.model:
        raise _FieldError("model", "no model: give model: here or --model on the command")
    if entry.api is not None:
        changes["api"] = entry.api
    if entry.stream is not None:
        changes["stream"] = entry.stream
    if entry.prompt_tokens is not None:
        changes["prompt_tokens"] = parse_length(str(entry.prompt_tokens))
    if entry.output_tokens is not None:
        changes["output_tokens"] = parse_length(str(entry.output_tokens))
    if entry.shared_prefix is not None:
        changes["prefix_groups"], changes["prefix_tokens"] = parse_shared_prefix(
            entry.shared_prefix
        )
    if entry.dataset is not None:
        path = entry.dataset if entry.dataset.is_absolute() else folder / entry.dataset
        try:
            changes["dataset"] = read_dataset(path)
        except ConfigError as error:
            raise _FieldError("dataset", str(error)) from None
    if entry.temperature is not None:
        changes["extra_body"] = {**base.extra_body, "temperature": float(entry.temperature)}
    try:
        return replace(base, **changes)
    except ConfigError as error:
        raise _FieldError("workload", str(error)) from None
