"""`fleetserve up`: a whole local fleet (engine replicas + gateway) on this machine."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from fleetserve.cli.common import clear_errors, ensure_port_free, err_console
from fleetserve.config import DEFAULT_PICKER, EngineName, GatewaySettings, ModelSpec, PickerName
from fleetserve.engines.llamacpp.adapter import threads_per_replica
from fleetserve.engines.llamacpp.build import find_llama_server
from fleetserve.engines.llamacpp.model import load_model
from fleetserve.engines.registry import adapter_for
from fleetserve.errors import ConfigError
from fleetserve.stack import LocalStackSpec, run_local_stack

DEFAULT_SIM_MODEL = "sim-llama-3.1-8b"
ENGINES: tuple[EngineName, ...] = ("llamacpp", "sim", "vllm")


def _engine_setup(
    engine: str, model: str | None, replicas: int, options: dict[str, str]
) -> tuple[EngineName, str, dict[str, str], str]:
    """(engine, served model name, launch options, what to tell the user) for one engine."""
    if engine == "llamacpp":
        find_llama_server()  # fails early, with how to build it
        gguf = load_model(Path(model) if model else None)
        threads = options.get("threads") or str(threads_per_replica(replicas))
        opts = {"model_path": str(gguf.path), "threads": threads, "slots": options["slots"]}
        note = (
            f"{gguf.path.name} ({gguf.size_bytes / 2**20:.0f} MiB) on llama.cpp, "
            f"{threads} thread(s) and {options['slots']} slots per replica"
        )
        return "llamacpp", gguf.name, opts, note
    if engine == "sim":
        name = model or DEFAULT_SIM_MODEL
        opts = {"profile": options["profile"], "cold_start_s": options["cold_start_s"]}
        note = f"profile {options['profile']}: a SIMULATED engine, not a real model"
        return "sim", name, opts, note
    if engine == "vllm":
        if not model:
            raise ConfigError("--engine vllm needs --model (a Hugging Face id or local path)")
        if shutil.which("vllm") is None:
            raise ConfigError("--engine vllm needs vLLM installed (`vllm` is not on PATH)")
        return "vllm", model, {}, "vLLM (GPU)"
    raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


@clear_errors
def up_command(
    engine: str = typer.Option("llamacpp", help="llamacpp (a real small model), sim or vllm."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="llamacpp: a .gguf file (default: the packaged SmolLM2-135M-Instruct); "
        "sim: a model name; vllm: a model id.",
    ),
    replicas: int = typer.Option(2, "--replicas", "-n", min=1, max=64, help="Engine replicas."),
    port: int = typer.Option(8000, "--port", "-p", help="Gateway port."),
    host: str = typer.Option("127.0.0.1", help="Gateway address."),
    picker: str = typer.Option(
        DEFAULT_PICKER, help="round_robin, least_outstanding, p2c, prefix_affinity."
    ),
    workers: int = typer.Option(1, help="Gateway worker processes."),
    threads: int | None = typer.Option(
        None, help="llamacpp: threads per replica (default: cores / replicas)."
    ),
    slots: int = typer.Option(8, min=1, help="llamacpp: parallel sequences per replica."),
    profile: str = typer.Option("a10g", help="sim: latency profile (a10g, l4, h100, instant)."),
    cold_start_s: float = typer.Option(1.0, min=0.0, help="sim: simulated load time per replica."),
) -> None:
    """Start engine replicas and the gateway on this machine; Ctrl-C stops everything.

    Example: fleetserve up --replicas 2 --port 8000   (llama.cpp serving SmolLM2 on the CPU)
    """
    options = {
        "threads": str(threads) if threads else "",
        "slots": str(slots),
        "profile": profile,
        "cold_start_s": str(cold_start_s),
    }
    engine_name, served, launch_options, note = _engine_setup(engine, model, replicas, options)
    ensure_port_free(host, port, "the gateway")
    spec = LocalStackSpec(
        adapter=adapter_for(engine_name),
        model=served,
        replicas=replicas,
        options=launch_options,
        engine_name=engine_name,
        picker=_picker(picker),
    )

    def say(line: str) -> None:
        err_console.print(f"[dim]fleetserve[/] {line}")

    err_console.print(f"[bold]fleetserve up[/]: {replicas} replica(s) of [cyan]{served}[/]: {note}")
    endpoint = f"http://{host}:{port}"
    settings = GatewaySettings(host=host, port=port, workers=workers)
    try:
        run_local_stack(spec, settings, say, on_ready=lambda: _print_ready(endpoint, served))
    except KeyboardInterrupt:
        err_console.print("stopping")
    err_console.print("all replicas stopped")


def _picker(name: str) -> PickerName:
    try:
        return ModelSpec(name="x", picker=name).picker
    except ValueError as exc:
        raise ConfigError(f"unknown picker {name!r}") from exc


def _print_ready(endpoint: str, model: str) -> None:
    err_console.print(f"\n[bold green]ready[/]: OpenAI-compatible endpoint {endpoint}/v1")
    err_console.print(
        f"try:\n  curl {endpoint}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", '
        f'"content": "Which city is the capital of France?"}}], "temperature": 0}}\'\n'
    )
