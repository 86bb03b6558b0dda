"""Engine adapters by name, as the fleet file and CLI spell them."""

from __future__ import annotations

from fleetserve.config import EngineName
from fleetserve.engines.adapter import EngineAdapter
from fleetserve.engines.llamacpp.adapter import LlamaCppAdapter
from fleetserve.engines.sim.adapter import SimAdapter
from fleetserve.engines.vllm import VllmAdapter


def adapter_for(engine: EngineName) -> EngineAdapter:
    if engine == "sim":
        return SimAdapter()
    if engine == "vllm":
        return VllmAdapter()
    return LlamaCppAdapter()
