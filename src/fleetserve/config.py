"""Typed settings (env prefix FLEETSERVE_) and the fleet file (YAML).

Settings hold how a process behaves (ports, timeouts, limits); the fleet file says what it
serves (models, their replicas and pickers). Both are passed down explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetserve.errors import ConfigError

PickerName = Literal["round_robin", "least_outstanding", "p2c", "prefix_affinity"]
EngineName = Literal["vllm", "sim", "llamacpp"]
# Chosen by benchmarks/routing_compare.py (README there): with shared system prompts at 85% load,
# prefix affinity's TTFT p95 was 768 ms against 2,149 (least outstanding), 2,801 (p2c) and
# 4,647 (round robin), because it keeps ~79% of prompt tokens in the engines' prefix caches.
DEFAULT_PICKER: PickerName = "prefix_affinity"


class TimeoutSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    connect_s: float = Field(3.0, gt=0, description="TCP connect to a replica")
    first_byte_s: float = Field(
        300.0, gt=0, description="request sent to response headers (covers queueing + prefill)"
    )
    idle_s: float = Field(60.0, gt=0, description="longest gap between two stream chunks")


class HealthSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: float = Field(2.0, gt=0, description="active /health probe period")
    probe_timeout_s: float = Field(2.0, gt=0)
    scrape_interval_s: float = Field(1.0, gt=0, description="engine /metrics scrape period")
    eject_after_failures: int = Field(3, ge=1, description="consecutive failures that eject")
    eject_base_s: float = Field(2.0, gt=0, description="first ejection; doubles each time")
    eject_max_s: float = Field(60.0, gt=0)


class GatewaySettings(BaseSettings):
    """Settings of the gateway process. Every field can be set as FLEETSERVE_<NAME>."""

    model_config = SettingsConfigDict(
        env_prefix="FLEETSERVE_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="worker processes sharing the port")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_attempts: int = Field(3, ge=1, le=10, description="tries per request across replicas")
    retry_after_s: int = Field(2, ge=1, description="Retry-After sent with 503")
    timeouts: TimeoutSettings = TimeoutSettings()
    health: HealthSettings = HealthSettings()
    admin_key: str | None = Field(
        None, description="bearer token required by /admin/* (None: admin is open on loopback)"
    )
    fleet_file: Path | None = None
    log_level: str = "warning"


class ModelSpec(BaseModel):
    """One model in the fleet file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    replicas: list[str] = Field(default_factory=list, description="base URLs of engines")
    engine: EngineName = Field("vllm", description="how to read the replicas' /metrics")
    picker: PickerName = DEFAULT_PICKER
    max_concurrency: int | None = Field(
        None, ge=1, description="in-flight requests per replica before it is skipped"
    )
    prefix_load_factor: float = Field(
        1.25, ge=1.0, description="prefix affinity: bound on load relative to the mean"
    )

    @field_validator("replicas")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"replica URL must start with http:// or https://: {url!r}")
        return [u.rstrip("/") for u in urls]


class FleetFile(BaseModel):
    """The fleet file: what the gateway serves."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {sorted(dupes)}")
        return models


def load_fleet_file(path: Path) -> FleetFile:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read fleet file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"fleet file {path} is not valid YAML: {exc}") from exc
    try:
        return FleetFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"fleet file {path} is invalid:\n{exc}") from exc
