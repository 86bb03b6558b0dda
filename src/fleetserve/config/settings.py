"""Typed settings of the gateway process (env prefix FLEETSERVE_) and the fleet file (YAML)."""

from __future__ import annotations

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
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from fleetserve.config.autoscale import (
    AutoscaleSettings,
)
from fleetserve.config.tenancy import PriceSpec, TenancySettings
from fleetserve.config.tracing import TracingSpec
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
LogFormat = Literal["console", "json"]
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
    interactive_headroom: float = Field(
        0.25,
        ge=0,
        le=1,
        description="requests of `interactive` tenants may exceed a replica's max_concurrency "
        "by this fraction of it (at least one slot when > 0), so that they need not wait for "
        "batch work that fills every slot to finish; 0: the cap binds every class",
    )


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
    tenancy: TenancySettings = TenancySettings()
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
    log_format: LogFormat = Field(
        "console", description="console: readable lines; json: one JSON object per line"
    )
    access_log: bool | None = Field(
        None,
        description="one line per /v1 request (request id, trace id, tenant, model, replica, "
        "status, tokens, TTFT, e2e, bytes); None: on with the json format, off with console",
    )

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
        aliases = TenancyAliasSource(settings_cls)
        return (
            init_settings, env_settings, aliases, dotenv_settings, file_secret_settings,
            fleet_file,
        )  # fmt: skip

    def admin_key_value(self) -> str | None:
        """The admin key in plain text, for the code that compares or sends it."""
        return None if self.admin_key is None else self.admin_key.get_secret_value()


TENANCY_ALIASES = {
    "FLEETSERVE_AUTH": "auth",
    "FLEETSERVE_DATABASE_URL": "database_url",
    "FLEETSERVE_REDIS_URL": "redis_url",
    "FLEETSERVE_KEY_PEPPER": "key_pepper",
}


class TenancyAliasSource(PydanticBaseSettingsSource):
    """The tenancy settings users set most, by their short names (FLEETSERVE_AUTH,
    FLEETSERVE_DATABASE_URL, FLEETSERVE_REDIS_URL, FLEETSERVE_KEY_PEPPER): as the
    environment's FLEETSERVE_TENANCY__<FIELD>, which wins when both are set."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {
            name: os.environ[var] for var, name in TENANCY_ALIASES.items() if os.environ.get(var)
        }
        return {"tenancy": found} if found else {}


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
    pricing: PriceSpec | None = Field(
        None, description="chargeback rate for budgets and the ledger (None: costs 0)"
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
    tracing: TracingSpec | None = Field(
        None, description="OpenTelemetry traces (OTLP/HTTP); the OTEL_* variables override it"
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
