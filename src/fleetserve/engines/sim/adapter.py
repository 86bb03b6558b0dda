"""The SIMULATED vLLM replica as an engine: launched as `python -m fleetserve engine sim`."""

from __future__ import annotations

import sys

from fleetserve.engines.adapter import LaunchSpec
from fleetserve.engines.vllm import option_args, parse_vllm_signals
from fleetserve.routing.snapshot import EngineSignals

DEFAULT_PROFILE = "a10g"


class SimAdapter:
    """LaunchSpec.options become CLI flags of `engine sim` (`profile`, `cold_start_s`, ...);
    the profile defaults to a10g. Its /metrics use vLLM's names, so it reads like vLLM."""

    name = "sim"
    health_path = "/health"
    metrics_path = "/metrics"

    def __init__(self, default_profile: str = DEFAULT_PROFILE) -> None:
        self.default_profile = default_profile

    def launch_command(self, spec: LaunchSpec) -> list[str]:
        options = {"profile": self.default_profile, **spec.options}
        return [
            sys.executable,
            "-m",
            "fleetserve",
            "engine",
            "sim",
            "--host",
            spec.host,
            "--port",
            str(spec.port),
            "--model",
            spec.model,
            *option_args(options),
        ]

    def parse_signals(self, metrics_text: str) -> EngineSignals:
        return parse_vllm_signals(metrics_text)
