"""Typed settings (env prefix FLEETSERVE_) and the fleet file (YAML).

Settings hold how a process behaves (ports, timeouts, limits); the fleet file says what it
serves (models, their replicas and pickers). Both are passed down explicitly.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from fleetserve.errors import ConfigError


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where fleetserve keeps its state (database, key pepper, ledger spool, a detached
    fleet's state file): FLEETSERVE_STATE_DIR, else $XDG_DATA_HOME/fleetserve, else
    ~/.local/share/fleetserve."""
    env = os.environ if environ is None else environ
    if explicit := env.get("FLEETSERVE_STATE_DIR"):
        return Path(explicit).expanduser()
    data_home = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "fleetserve"


PickerName = Literal["round_robin", "least_outstanding", "p2c", "prefix_affinity"]
EngineName = Literal["vllm", "sim", "llamacpp"]
# Chosen by benchmarks/routing_compare.py (README there): with shared system prompts at 85% load,
# prefix affinity's TTFT p95 was 768 ms against 2,149 (least outstanding), 2,801 (p2c) and
# 4,647 (round robin), because it keeps ~79% of prompt tokens in the engines' prefix caches.
DEFAULT_PICKER: PickerName = "prefix_affinity"

# Defaults used in more than one place; each has its home here.
READY_TIMEOUT_S = 120.0  # a launched engine replica has this long to pass its health check
DRAIN_GRACE_S = 30.0  # a replica being removed may finish its requests for this long
IDLE_TIMEOUT_S = 60.0  # longest gap between two reads of a stream (gateway and bench)
ENV_PREFIX = "FLEETSERVE_"
ADMIN_KEY_FIELDS = ("admin_key", "admin_key_file")  # one setting: the key, or a file holding it


class TimeoutSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    connect_s: float = Field(3.0, gt=0, description="TCP connect to a replica")
    first_byte_s: float = Field(
        300.0,
        gt=0,
        description="one budget per request, across all its attempts: to a stream's first "
        "chunk, or to a whole non-stream answer (covers queueing + prefill; time held at the "
        "gateway does not count)",
    )
    idle_s: float = Field(IDLE_TIMEOUT_S, gt=0, description="longest gap between two stream chunks")
    header_read_s: float = Field(
        10.0, gt=0, description="a client's request line and headers must arrive within this"
    )
    body_read_s: float = Field(
        30.0, gt=0, description="a client's request body must arrive within this (else 408)"
    )
    write_stall_s: float = Field(
        60.0,
        gt=0,
        description="a client that reads nothing of its stream for this long is cut off and "
        "its replica slot freed",
    )


class HealthSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: float = Field(2.0, gt=0, description="active /health probe period")
    probe_timeout_s: float = Field(2.0, gt=0)
    scrape_interval_s: float = Field(1.0, gt=0, description="engine /metrics scrape period")
    eject_after_failures: int = Field(3, ge=1, description="consecutive failures that eject")
    eject_base_s: float = Field(2.0, gt=0, description="first ejection; doubles each time")
    eject_max_s: float = Field(60.0, gt=0)
    eject_decay_s: float = Field(
        10.0,
        gt=0,
        description="each this long a replica stays healthy takes one ejection off its count "
        "(Envoy's outlier `interval`), so its later ejections are short again",
    )


class HoldSettings(BaseModel):
    """Holding requests while a model that can scale has no ready replica (scale from zero)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(120.0, gt=0, description="longest a request waits for a replica")
    max_held: int = Field(1000, ge=1, description="held requests per model; more get 503")
    stream_head_after_s: float = Field(
        1.0, ge=0, description="held streams get the 200 SSE head after this long"
    )
    keepalive_s: float = Field(5.0, gt=0, description="SSE comment period while a stream waits")


class GatewaySettings(BaseSettings):
    """Settings of the gateway process. Every field can be set as FLEETSERVE_<NAME> (nested ones
    as FLEETSERVE_TIMEOUTS__FIRST_BYTE_S) or in the fleet file's `gateway:` section. The order,
    highest first: the init values (a command's flags, see `gateway_settings`), the environment,
    the fleet file named by either, the defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore", frozen=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="worker processes sharing the port")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_attempts: int = Field(3, ge=1, le=10, description="tries per request across replicas")
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 503")
    timeouts: TimeoutSettings = TimeoutSettings()
    health: HealthSettings = HealthSettings()
    hold: HoldSettings = HoldSettings()
    load_window_s: float = Field(
        30.0, ge=1.0, description="span of the rolling load window the autoscaler reads"
    )
    shutdown_delay_s: float = Field(
        2.0,
        ge=0,
        le=600,
        description="after SIGTERM, /ready answers 503 and requests are still served this long "
        "(load balancers stop sending) before the gateway stops accepting",
    )
    shutdown_grace_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="after SIGTERM, in-flight requests and streams may finish within this "
        "(delay included); match Kubernetes' terminationGracePeriodSeconds",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="bearer token required by /admin/* (None: the admin API is open, which "
        "only a loopback bind allows; see `admin_api_line`)",
    )
    admin_key_file: Path | None = Field(
        None,
        description="a file holding the admin key (one trailing newline is stripped); "
        "`gateway_settings` reads it into admin_key",
    )
    fleet_file: Path | None = None
    kubeconfig: Path | None = Field(
        None,
        description="kubeconfig for Kubernetes discovery (None: in-cluster, $KUBECONFIG, "
        "~/.kube/config)",
    )
    log_level: str = "warning"

    @field_validator("admin_key")
    @classmethod
    def _not_empty(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("the admin key must not be empty")
        return key

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        fleet_file = FleetFileSettingsSource(settings_cls)
        return init_settings, env_settings, dotenv_settings, file_secret_settings, fleet_file

    def admin_key_value(self) -> str | None:
        """The admin key in plain text, for the code that compares or sends it."""
        return None if self.admin_key is None else self.admin_key.get_secret_value()


class FleetFileSettingsSource(PydanticBaseSettingsSource):
    """The `gateway:` section of the fleet file that a higher source names (a flag or
    FLEETSERVE_FLEET_FILE): below the environment, above the defaults."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads the whole section at once

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("fleet_file")
        if not path:
            return {}
        section = dict(load_fleet_file(Path(path)).gateway or {})
        if any(self.current_state.get(name) is not None for name in ADMIN_KEY_FIELDS):
            for name in ADMIN_KEY_FIELDS:  # a higher source gave the key (or its file)
                section.pop(name, None)
        return section


ScalingPolicyKind = Literal["pods", "percent"]
SelectPolicy = Literal["max", "min", "disabled"]


class ScalingPolicy(BaseModel):
    """One step limit, as the HPA's `behavior` HPAScalingPolicy: at most `value` pods (or
    `value` percent of the count at the period's start) per `period_s`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ScalingPolicyKind = Field(description="pods: a number of replicas; percent: a share")
    value: int = Field(ge=1, description="replicas, or percent of the count at period start")
    period_s: float = Field(gt=0, le=1800, description="the sliding period the limit applies to")


class ScalingRules(BaseModel):
    """How fast one direction may move (the HPA's HPAScalingRules)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stabilization_window_s: float = Field(
        ge=0,
        le=3600,
        description="recommendations this far back are considered: scale-up takes their minimum, "
        "scale-down their maximum (0: act on the latest alone)",
    )
    policies: tuple[ScalingPolicy, ...] = Field(min_length=1, description="step limits")
    select: SelectPolicy = Field(
        "max",
        description="max: the policy allowing the largest step wins; min: the smallest; "
        "disabled: never move in this direction",
    )


# Scale-up acts on a load seen in two consecutive 5 s observations (a 10 s window), so one
# sampled burst does not start a replica whose cold start (45 s for the sim a10g profile, a model
# load for vLLM) costs far more than the 5 s of extra evidence. Steps are the HPA's defaults:
# the larger of +4 pods and +100% per 15 s.
DEFAULT_SCALE_UP = ScalingRules(
    stabilization_window_s=10.0,
    policies=(
        ScalingPolicy(kind="pods", value=4, period_s=15.0),
        ScalingPolicy(kind="percent", value=100, period_s=15.0),
    ),
    select="max",
)
# Scale-down keeps the highest recommendation of the last 60 s instead of the HPA's 300 s: an
# LLM replica is expensive to keep idle, and 60 s still bridges the pauses between bursts of a
# conversation (Ray Serve waits 600 s; KEDA's cooldown is 300 s, both tuned for cheap replicas).
# The step is the HPA's default, 100% per 15 s: draining makes a large step safe.
DEFAULT_SCALE_DOWN = ScalingRules(
    stabilization_window_s=60.0,
    policies=(ScalingPolicy(kind="percent", value=100, period_s=15.0),),
    select="max",
)


class AutoscaleSettings(BaseModel):
    """The autoscaler's policy for one model. Defaults suit the embedded default (llama.cpp
    replicas with 8 slots) and the simulated engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_replicas: int = Field(1, ge=0, description="floor; 0 allows scale to zero when idle")
    max_replicas: int = Field(4, ge=1, description="ceiling")
    period_s: float = Field(5.0, gt=0, description="seconds between two decisions")
    # 6 of llama.cpp's 8 slots (75%): headroom for the next request while batching stays full,
    # as Ray Serve's target_ongoing_requests (2) sits below max_ongoing_requests (5).
    target_concurrency: float = Field(
        6.0, gt=0, description="requests per ready replica (in flight + engine waiting) to aim at"
    )
    target_queue: float = Field(
        2.0, gt=0, description="requests waiting per replica (engine queue + gateway held)"
    )
    target_kv_usage_frac: float = Field(
        0.8, gt=0, le=1, description="mean KV-cache use to aim at (vLLM preempts near 1.0)"
    )
    ttft_slo_s: float | None = Field(
        None, gt=0, description="gateway-measured TTFT p95 to keep under (None: not a signal)"
    )
    ttft_window_s: float = Field(
        30.0,
        ge=0,
        description="after a scale-up the TTFT signal waits this long before asking again, since "
        "its p95 still covers the time before the new capacity",
    )
    tolerance: float = Field(
        0.1, ge=0, lt=1, description="no change while a usage ratio is within 1 +- tolerance"
    )
    scale_up: ScalingRules = Field(DEFAULT_SCALE_UP, description="window and steps going up")
    scale_down: ScalingRules = Field(DEFAULT_SCALE_DOWN, description="window and steps going down")
    # KEDA's default cooldownPeriod before scaling to zero.
    scale_to_zero_after_s: float = Field(
        300.0,
        gt=0,
        description="with min_replicas 0: idle this long (no arrivals, nothing in "
        "flight or held) before the last replica stops",
    )
    replica_throughput_tps: float | None = Field(
        None,
        gt=0,
        description="tokens/s one replica sustains; with the arrival rate it sizes "
        "the fleet by the utilisation law (None: not a signal)",
    )
    no_flip_s: float = Field(
        15.0, ge=0, description="no change against the last change's direction within this time"
    )

    @field_validator("scale_up", "scale_down", mode="before")
    @classmethod
    def _over_defaults(cls, value: object, info: ValidationInfo) -> object:
        """A partial `scale_up: {stabilization_window_s: 0}` keeps the other default fields."""
        if isinstance(value, dict):
            default = DEFAULT_SCALE_UP if info.field_name == "scale_up" else DEFAULT_SCALE_DOWN
            return {**default.model_dump(), **value}
        return value

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed "
                f"max_replicas ({self.max_replicas})"
            )
        return self


class KubernetesDiscoverySpec(BaseModel):
    """Replicas are the ready endpoints of a Kubernetes Service, read from its EndpointSlices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    service: str = Field(min_length=1, description="the Service whose endpoints are replicas")
    namespace: str | None = Field(
        None, description="the Service's namespace (None: the kubeconfig's, or the pod's own)"
    )
    port: str | int | None = Field(
        None, description="the port by name (e.g. http) or number (None: the slice's only port)"
    )
    scheme: Literal["http", "https"] = "http"
    remove_after_s: float = Field(
        30.0,
        gt=0,
        description="an endpoint that left the slices is removed once its in-flight requests "
        "finish, or after this long",
    )
    context: str | None = Field(None, description="kubeconfig context (None: the current one)")


class DiscoverySpec(BaseModel):
    """Where a model's replicas come from when the fleet file does not list them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kubernetes: KubernetesDiscoverySpec


class ModelSpec(BaseModel):
    """One model in the fleet file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    replicas: list[str] = Field(default_factory=list, description="base URLs of engines")
    engine: EngineName = Field("vllm", description="how to read the replicas' /metrics")
    picker: PickerName = DEFAULT_PICKER
    max_concurrency: int | None = Field(
        None,
        ge=1,
        description="in-flight requests per replica; when every ready replica is at it, "
        "requests wait at the gateway (bounded) for the first free slot",
    )
    prefix_load_factor: float = Field(
        1.25, ge=1.0, description="prefix affinity: bound on load relative to the mean"
    )
    autoscale: AutoscaleSettings | None = Field(
        None, description="autoscaler policy (None: the fleet keeps its replica count)"
    )
    discovery: DiscoverySpec | None = Field(
        None, description="where replicas come from instead of the `replicas` list"
    )

    @field_validator("replicas")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"replica URL must start with http:// or https://: {url!r}")
        return [u.rstrip("/") for u in urls]

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.replicas and self.discovery is not None:
            raise ValueError(
                f"model {self.name!r}: give either `replicas` or `discovery`, not both"
            )
        return self


class FleetFile(BaseModel):
    """The fleet file: what the gateway serves, and optionally how (its `gateway:` section)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    gateway: dict[str, Any] | None = Field(
        None,
        description="GatewaySettings fields, nested as in `timeouts: {first_byte_s: 120}`; "
        "the environment and flags override them",
    )

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {sorted(dupes)}")
        return models

    @field_validator("gateway")
    @classmethod
    def _settings_only(cls, section: dict[str, Any] | None) -> dict[str, Any] | None:
        """Names are checked here; values where the settings are built, with all sources."""
        known = set(GatewaySettings.model_fields) - {"fleet_file"}
        unknown = sorted(set(section or {}) - known)
        if unknown:
            listed = ", ".join(sorted(known))
            raise ValueError(f"unknown gateway setting(s) {', '.join(unknown)}; known: {listed}")
        if section and all(section.get(name) is not None for name in ADMIN_KEY_FIELDS):
            raise ValueError("give gateway.admin_key or gateway.admin_key_file, not both")
        return section


def load_fleet_file(path: Path) -> FleetFile:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read fleet file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        problem = str(exc).replace("\n", " ")
        raise ConfigError(f"fleet file {path} is not valid YAML: {problem}") from exc
    try:
        return FleetFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"fleet file {path} is invalid: {describe_errors(exc)}") from exc


def describe_errors(exc: ValidationError) -> str:
    """A validation error on one line: `where: what` per problem."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'value'}: {_lower(error['msg'])}"
        for error in exc.errors(include_url=False)
    )


def _lower(message: str) -> str:
    """pydantic's message as the end of a sentence ("Value error, " is its own wrapping)."""
    message = message.removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


# -- building the gateway's settings from every source ------------------------------------


def gateway_settings(
    given: Mapping[str, Any], flags: Mapping[str, str] | None = None
) -> GatewaySettings:
    """GatewaySettings from, highest first: `given` (the options a user gave on the command
    line, by field name), the environment, the fleet file's `gateway:` section, the defaults.

    `flags` names each given field's option (`port` -> `--port`) for the error messages. The
    admin key and its file are one setting: the highest source that gives either wins. A bad
    value is a ConfigError of one line naming where it came from, the value and what is allowed.
    """
    flags = flags or {}
    init = dict(given)
    in_given = [name for name in ADMIN_KEY_FIELDS if init.get(name) is not None]
    if len(in_given) == 2:
        key, key_file = (flags.get(name, _flag(name)) for name in ADMIN_KEY_FIELDS)
        raise ConfigError(f"give {key} or {key_file}, not both")
    if in_given:
        init.update({name: init.get(name) for name in ADMIN_KEY_FIELDS})  # the other: None
    else:
        env = _environ()
        in_env = [ENV_PREFIX + name.upper() for name in ADMIN_KEY_FIELDS]
        if all(name in env for name in in_env):
            raise ConfigError(f"set {in_env[0]} or {in_env[1]}, not both")
    try:
        settings = GatewaySettings(**init)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, init, flags)) from exc
    except SettingsError as exc:  # a nested setting in the environment that is not JSON
        raise ConfigError(_explain_settings_error(exc)) from exc
    if settings.admin_key is None and settings.admin_key_file is not None:
        origin = _origin(("admin_key_file",), init, flags)
        key = read_admin_key_file(settings.admin_key_file, origin)
        settings = settings.model_copy(update={"admin_key": SecretStr(key)})
    return settings


def read_admin_key_file(path: Path, origin: str) -> str:
    """The key in `path`, less one trailing newline; `origin` says who named the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the admin key file {path} ({origin}): {exc.strerror or exc}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the admin key file {path} ({origin}) is not text") from exc
    key = text.removesuffix("\n").removesuffix("\r")
    if not key.strip():
        raise ConfigError(f"the admin key file {path} ({origin}) is empty")
    return key


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def admin_api_line(settings: GatewaySettings) -> str:
    """The start-up banner's line about the admin API; ConfigError when the gateway would
    bind an address others can reach with its admin API (drain included) open."""
    if settings.admin_key is not None:
        return "admin API: key required"
    if is_loopback(settings.host):
        return (
            "admin API: open on loopback (no admin key); set --admin-key or "
            "FLEETSERVE_ADMIN_KEY to require one"
        )
    raise ConfigError(
        f"the gateway would bind {settings.host or 'every address'}, which is not loopback, "
        f"with no admin key, leaving /admin/* (drain included) open to anyone who can reach "
        f"it; set --admin-key-file FILE, --admin-key KEY or FLEETSERVE_ADMIN_KEY "
        f"(or bind 127.0.0.1)"
    )


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _environ() -> dict[str, str]:
    """The environment with upper-case names, as pydantic-settings matches them."""
    return {name.upper(): value for name, value in os.environ.items()}


def _origin(loc: tuple[str | int, ...], given: Mapping[str, Any], flags: Mapping[str, str]) -> str:
    """Where the value at `loc` came from, named as the user gave it."""
    field = str(loc[0])
    if given.get(field) is not None:
        return flags.get(field, _flag(field))
    env = _environ()
    parts = [str(part).upper() for part in loc]
    for end in range(len(parts), 0, -1):
        name = ENV_PREFIX + "__".join(parts[:end])
        if name in env:
            return name
    dotted = ".".join(str(part) for part in loc)
    path = given.get("fleet_file") or env.get(ENV_PREFIX + "FLEET_FILE")
    return f"gateway.{dotted} in fleet file {path}" if path else f"setting {dotted}"


def _explain(exc: ValidationError, given: Mapping[str, Any], flags: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        loc = error["loc"] or ("value",)
        where = _origin(loc, given, flags)
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown setting {where}")
            continue
        value = error.get("input")
        shown = "(hidden)" if loc[0] == "admin_key" else repr(value)[:60]
        problems.append(f"invalid {where}: {shown} ({_lower(error['msg'])})")
    return "; ".join(problems)


def _explain_settings_error(exc: SettingsError) -> str:
    text = str(exc)
    field = text.split('field "', 1)[1].split('"', 1)[0] if 'field "' in text else None
    if field is None:
        return f"invalid settings in the environment: {text}"
    name = ENV_PREFIX + field.upper()
    return (
        f"invalid {name}: not a JSON object (or set one field at a time, as {name}__<FIELD>=value)"
    )
