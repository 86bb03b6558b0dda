"""The EngineAdapter seam: how to launch an engine, check it, and read its /metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fleetserve.routing.snapshot import EngineSignals


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """What a replica is launched with; adapters turn it into a command line."""

    model: str
    port: int
    host: str = "127.0.0.1"
    options: dict[str, str] = field(default_factory=dict)


class EngineAdapter(Protocol):
    name: str
    health_path: str
    metrics_path: str

    def launch_command(self, spec: LaunchSpec) -> list[str]: ...

    def parse_signals(self, metrics_text: str) -> EngineSignals:
        """Map the engine's Prometheus text to the common signals; unknown stays None."""
        ...
