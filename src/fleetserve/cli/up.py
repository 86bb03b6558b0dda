"""`fleetserve up`: a whole local fleet (engines + gateway) on this machine."""

from __future__ import annotations

import typer

from fleetserve.cli.common import clear_errors, ensure_port_free, err_console
from fleetserve.config import DEFAULT_PICKER, GatewaySettings
from fleetserve.engines.registry import adapter_for
from fleetserve.errors import ConfigError
from fleetserve.stack import LocalStackSpec, run_local_stack

DEFAULT_SIM_MODEL = "sim-llama-3.1-8b"


@clear_errors
def up_command(
    engine: str = typer.Option(
        "sim", help="Engine for the replicas: sim (llamacpp and vllm next)."
    ),
    replicas: int = typer.Option(2, "--replicas", "-n", min=1, max=64, help="Engine replicas."),
    port: int = typer.Option(8000, "--port", "-p", help="Gateway port."),
    host: str = typer.Option("127.0.0.1", help="Gateway address."),
    model: str = typer.Option(DEFAULT_SIM_MODEL, help="Model name to serve."),
    profile: str = typer.Option("a10g", help="Simulated engine profile (sim only)."),
    cold_start_s: float = typer.Option(
        1.0,
        "--cold-start-s",
        min=0.0,
        help="Simulated load time of each replica (sim only; a10g's own figure is 45 s).",
    ),
    picker: str = typer.Option(
        DEFAULT_PICKER, help="round_robin, least_outstanding, p2c, prefix_affinity."
    ),
    workers: int = typer.Option(1, help="Gateway worker processes."),
) -> None:
    """Start engine replicas and the gateway on this machine; Ctrl-C stops everything.

    Example: fleetserve up --engine sim --replicas 3 --port 8000
    """
    if engine != "sim":
        raise ConfigError(f"engine {engine!r} is not available yet in `up`; use --engine sim")
    if picker not in ("round_robin", "least_outstanding", "p2c", "prefix_affinity"):
        raise ConfigError(f"unknown picker {picker!r}")
    ensure_port_free(host, port, "the gateway")
    settings = GatewaySettings(host=host, port=port, workers=workers)
    spec = LocalStackSpec(
        adapter=adapter_for("sim"),
        model=model,
        replicas=replicas,
        options={"profile": profile, "cold_start_s": str(cold_start_s)},
        engine_name=engine,
        picker=picker,  # type: ignore[arg-type]
    )

    def say(line: str) -> None:
        err_console.print(f"[dim]fleetserve[/] {line}")

    err_console.print(
        f"[bold]fleetserve up[/]: {replicas} {engine} replica(s) of [cyan]{model}[/]"
        + (f" (profile {profile}; a SIMULATED engine, not a real model)" if engine == "sim" else "")
    )
    endpoint = f"http://{host}:{port}"
    try:
        run_local_stack(spec, settings, say, on_ready=lambda: _print_ready(endpoint, model))
    except KeyboardInterrupt:
        err_console.print("stopped")
    err_console.print("all replicas stopped")


def _print_ready(endpoint: str, model: str) -> None:
    err_console.print(f"\n[bold green]ready[/]: OpenAI-compatible endpoint {endpoint}/v1")
    err_console.print(
        f"try:\n  curl {endpoint}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", '
        f'"content": "Hello!"}}]}}\'\n',
        soft_wrap=True,
    )
