"""The `tracing:` section of the fleet file and the standard `OTEL_*` variables over it.

Tracing is off unless configured: a `tracing:` section, or an OTLP endpoint in the
environment (`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). The
environment outranks the fleet file, as everywhere in fleetserve; `OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none` turn it off whatever the file says.

    tracing:
      endpoint: https://cloud.langfuse.com/api/public/otel   # /v1/traces is appended
      headers: {Authorization: "Basic <base64(public_key:secret_key)>"}
      sampler: parentbased_traceidratio
      sampler_arg: 0.1
      service_name: fleetserve-gateway
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from fleetserve.errors import ConfigError

SamplerName = Literal[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
]
SAMPLERS: tuple[str, ...] = SamplerName.__args__  # type: ignore[attr-defined]
DEFAULT_SAMPLER: SamplerName = "parentbased_always_on"  # the OpenTelemetry default
DEFAULT_SERVICE_NAME = "fleetserve-gateway"
TRACES_PATH = "/v1/traces"  # appended to a base endpoint, as the OTLP exporter spec says


class TracingSpec(BaseModel):
    """The fleet file's `tracing:` section (each field has an `OTEL_*` variable above it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="false: no traces even with an endpoint set")
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP base URL (OTEL_EXPORTER_OTLP_ENDPOINT); /v1/traces is appended. "
        "Langfuse: https://<host>/api/public/otel",
    )
    traces_endpoint: str | None = Field(
        None, description="the full traces URL, used as given (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)"
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="headers of every export (OTEL_EXPORTER_OTLP_HEADERS), e.g. Authorization",
    )
    sampler: SamplerName = Field(DEFAULT_SAMPLER, description="OTEL_TRACES_SAMPLER")
    sampler_arg: float | None = Field(
        None, ge=0.0, le=1.0, description="the ratio of *traceidratio (OTEL_TRACES_SAMPLER_ARG)"
    )
    service_name: str = Field(DEFAULT_SERVICE_NAME, min_length=1, description="OTEL_SERVICE_NAME")
    timeout_s: float = Field(10.0, gt=0, description="per export (OTEL_EXPORTER_OTLP_TIMEOUT)")


class TracingSettings(BaseModel):
    """What the gateway traces with, all sources applied."""

    model_config = ConfigDict(frozen=True)

    traces_url: str
    headers: dict[str, SecretStr]
    sampler: SamplerName
    ratio: float  # of the *traceidratio samplers; 1.0 for the others
    service_name: str
    timeout_s: float

    def header_values(self) -> dict[str, str]:
        """The export headers in plain text, for the exporter only (never logged)."""
        return {name: value.get_secret_value() for name, value in self.headers.items()}


def _off(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("true", "1", "yes")


def parse_headers(text: str) -> dict[str, SecretStr]:
    """`OTEL_EXPORTER_OTLP_HEADERS`: `key=value,key2=value2`, values URL-encoded (the spec's
    W3C Baggage format); a malformed entry is a ConfigError naming the variable, not its value."""
    headers: dict[str, SecretStr] = {}
    for entry in text.split(","):
        if not entry.strip():
            continue
        name, sep, value = entry.partition("=")
        name = urllib.parse.unquote(name).strip()
        if not sep or not name:
            raise ConfigError(
                "OTEL_EXPORTER_OTLP_HEADERS: each entry is name=value (URL-encoded), "
                "separated by commas; an entry has no name or no '='"
            )
        headers[name.lower()] = SecretStr(urllib.parse.unquote(value).strip())
    return headers


def tracing_settings(
    spec: TracingSpec | None, environ: Mapping[str, str] | None = None
) -> TracingSettings | None:
    """The tracing settings, or None when tracing is off (the default). The environment's
    `OTEL_*` variables outrank the fleet file's section; a bad value is one ConfigError line."""
    env = os.environ if environ is None else environ
    if _off(env.get("OTEL_SDK_DISABLED")) or env.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
        return None
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or (spec.endpoint if spec else None)
    full = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (spec.traces_endpoint if spec else None)
    if spec is not None and not spec.enabled:
        return None
    if spec is None and not (base or full):
        return None
    if full:
        url = full
    elif base:
        url = base.rstrip("/") + TRACES_PATH
    else:
        raise ConfigError(
            "tracing: no OTLP endpoint; set tracing.endpoint in the fleet file or "
            "OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://127.0.0.1:4318)"
        )
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"tracing: the OTLP endpoint must be an http(s):// URL, not {url!r}")
    headers = {name.lower(): value for name, value in spec.headers.items()} if spec else {}
    if text := env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get(
        "OTEL_EXPORTER_OTLP_HEADERS"
    ):
        headers |= parse_headers(text)
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or (
        spec.sampler if spec else DEFAULT_SAMPLER
    )
    if sampler not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER: one of {', '.join(SAMPLERS)}; not {sampler!r}")
    ratio = _ratio(sampler, env.get("OTEL_TRACES_SAMPLER_ARG"), spec)
    service = env.get("OTEL_SERVICE_NAME") or (spec.service_name if spec else DEFAULT_SERVICE_NAME)
    timeout_s = spec.timeout_s if spec else 10.0
    if raw := env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT"):
        try:
            timeout_s = float(raw) / 1000  # the spec's unit is milliseconds
        except ValueError:
            raise ConfigError(f"OTEL_EXPORTER_OTLP_TIMEOUT: milliseconds, not {raw!r}") from None
    try:
        return TracingSettings(
            traces_url=url, headers=headers, sampler=sampler, ratio=ratio,
            service_name=service, timeout_s=timeout_s,
        )  # fmt: skip
    except ValidationError as exc:  # pragma: no cover - every field is checked above
        raise ConfigError(f"tracing settings are invalid: {exc.errors()[0]['msg']}") from exc


def _ratio(sampler: str, raw: str | None, spec: TracingSpec | None) -> float:
    if not sampler.endswith("traceidratio"):
        return 1.0
    if raw is not None and raw.strip():
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG: a ratio from 0 to 1, not {raw!r}")
        return ratio
    if spec is not None and spec.sampler_arg is not None:
        return spec.sampler_arg
    return 1.0  # the spec's default ratio
