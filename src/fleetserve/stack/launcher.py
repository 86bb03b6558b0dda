"""How the local actuator and the fixed fleet launch an engine: an adapter bound to a model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fleetserve.engines.adapter import EngineAdapter, LaunchSpec


@dataclass(frozen=True)
class AdapterLauncher:
    """An `EngineAdapter` bound to one model and its options: the `fleet.local.EngineLauncher`
    that the local actuator launches replicas with (fleet does not import engines)."""

    adapter: EngineAdapter
    model: str
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def health_path(self) -> str:
        return self.adapter.health_path

    def command(self, host: str, port: int) -> list[str]:
        spec = LaunchSpec(self.model, port, host=host, options=dict(self.options))
        return self.adapter.launch_command(spec)
