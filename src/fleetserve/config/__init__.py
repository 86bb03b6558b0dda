"""Typed settings (env prefix FLEETSERVE_) and the fleet file (YAML).

Settings hold how a process behaves (ports, timeouts, limits); the fleet file says what it
serves (models, their replicas and pickers). Both are passed down explicitly.
"""

from __future__ import annotations

from fleetserve.config.autoscale import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    AutoscaleSettings,
    ScalingPolicy,
    ScalingPolicyKind,
    ScalingRules,
    SelectPolicy,
)
from fleetserve.config.resolve import (
    admin_api_line,
    gateway_settings,
    is_loopback,
    read_admin_key_file,
)
from fleetserve.config.settings import (
    ADMIN_KEY_FIELDS,
    DEFAULT_PICKER,
    DRAIN_GRACE_S,
    ENV_PREFIX,
    IDLE_TIMEOUT_S,
    READY_TIMEOUT_S,
    DiscoverySpec,
    EngineName,
    FleetFile,
    FleetFileSettingsSource,
    GatewaySettings,
    HealthSettings,
    HoldSettings,
    KubernetesDiscoverySpec,
    LogFormat,
    ModelSpec,
    PickerName,
    TimeoutSettings,
    default_state_dir,
    describe_errors,
    load_fleet_file,
)
from fleetserve.config.tenancy import AuthMode, PriceSpec, RedisFailure, TenancySettings
from fleetserve.config.tracing import TracingSettings, TracingSpec, tracing_settings

__all__ = [
    "ADMIN_KEY_FIELDS",
    "DEFAULT_PICKER",
    "DEFAULT_SCALE_DOWN",
    "DEFAULT_SCALE_UP",
    "DRAIN_GRACE_S",
    "ENV_PREFIX",
    "IDLE_TIMEOUT_S",
    "READY_TIMEOUT_S",
    "AuthMode",
    "AutoscaleSettings",
    "DiscoverySpec",
    "EngineName",
    "FleetFile",
    "FleetFileSettingsSource",
    "GatewaySettings",
    "HealthSettings",
    "HoldSettings",
    "KubernetesDiscoverySpec",
    "LogFormat",
    "ModelSpec",
    "PickerName",
    "PriceSpec",
    "RedisFailure",
    "ScalingPolicy",
    "ScalingPolicyKind",
    "ScalingRules",
    "SelectPolicy",
    "TenancySettings",
    "TimeoutSettings",
    "TracingSettings",
    "TracingSpec",
    "admin_api_line",
    "default_state_dir",
    "describe_errors",
    "gateway_settings",
    "is_loopback",
    "load_fleet_file",
    "read_admin_key_file",
    "tracing_settings",
]
