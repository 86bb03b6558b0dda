"""EngineAdapter for llama.cpp's `llama-server` (continuous batching over `-np` slots).

Its /metrics (with `--metrics`) map to the common signals: `llamacpp:requests_processing` is
running, `llamacpp:requests_deferred` is waiting, `llamacpp:tokens_predicted_total` the
generated tokens. It exports no KV-cache use in this version, so that signal stays None and
pickers and policies treat it as missing.
"""

from __future__ import annotations

import os

from fleetserve.engines.adapter import LaunchSpec
from fleetserve.engines.llamacpp.build import find_llama_server
from fleetserve.engines.vllm import sample_values
from fleetserve.routing.snapshot import EngineSignals

DEFAULT_SLOTS = 8  # parallel sequences per replica (llama-server -np)
CTX_PER_SLOT = 2048  # tokens of context each slot gets; -c is the total over slots


def threads_per_replica(replicas: int, cores: int | None = None) -> int:
    """Share the cores this process may use among the replicas (at least one thread each)."""
    available = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, available // max(1, replicas))


class LlamaCppAdapter:
    """LaunchSpec.options: `model_path` (required), `threads`, `slots`, `ctx_per_slot`."""

    name = "llamacpp"
    health_path = "/health"
    metrics_path = "/metrics"

    def launch_command(self, spec: LaunchSpec) -> list[str]:
        options = spec.options
        slots = int(options.get("slots", DEFAULT_SLOTS))
        ctx = slots * int(options.get("ctx_per_slot", CTX_PER_SLOT))
        threads = options.get("threads", str(threads_per_replica(1)))
        return [
            str(find_llama_server()),
            "--model", options["model_path"],
            "--alias", spec.model,
            "--host", spec.host,
            "--port", str(spec.port),
            "--threads", threads,
            "--threads-batch", threads,
            "--threads-http", "2",
            "--ctx-size", str(ctx),
            "--parallel", str(slots),
            "--cont-batching",
            "--metrics",
            "--no-webui",
            "--log-disable",
        ]  # fmt: skip

    def parse_signals(self, metrics_text: str) -> EngineSignals:
        running = sample_values(metrics_text, "llamacpp:requests_processing")
        waiting = sample_values(metrics_text, "llamacpp:requests_deferred")
        generated = sample_values(metrics_text, "llamacpp:tokens_predicted_total")
        return EngineSignals(
            running=sum(running) if running else None,
            waiting=sum(waiting) if waiting else None,
            kv_usage_frac=None,
            generation_tokens=sum(generated) if generated else None,
        )
