"""`fleetserve gateway`: the OpenAI-compatible gateway over a fleet of replicas."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from fleetserve.cli.common import clear_errors, ensure_port_free
from fleetserve.config import DEFAULT_PICKER, FleetFile, GatewaySettings, ModelSpec
from fleetserve.errors import ConfigError
from fleetserve.gateway.app import resolve_fleet
from fleetserve.gateway.serve import run_gateway


@clear_errors
def gateway_command(
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    model: str | None = typer.Option(None, help="Model name served by --upstream engines."),
    upstream: list[str] = typer.Option(
        [], "--upstream", "-u", help="Base URL of an engine that already runs (repeatable)."
    ),
    engine: str = typer.Option("vllm", help="Engine behind --upstream: vllm, sim or llamacpp."),
    picker: str = typer.Option(
        DEFAULT_PICKER, help="round_robin, least_outstanding, p2c or prefix_affinity."
    ),
    fleet_file: Path | None = typer.Option(None, "--fleet-file", "-f", help="Fleet file (YAML)."),
    workers: int = typer.Option(1, help="Worker processes sharing the port."),
    max_concurrency: int | None = typer.Option(None, help="In-flight cap per replica."),
) -> None:
    """Run the gateway in front of engines.

    Example: fleetserve gateway --port 8000 --model llama --upstream http://127.0.0.1:8001
    --upstream http://127.0.0.1:8002
    """
    inline: FleetFile | None = None
    if upstream:
        if not model:
            raise ConfigError("--upstream needs --model NAME (the model those engines serve)")
        if fleet_file is not None:
            raise ConfigError("give either --fleet-file or --model/--upstream, not both")
        try:
            spec = ModelSpec(
                name=model,
                replicas=upstream,
                engine=engine,
                picker=picker,
                max_concurrency=max_concurrency,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        inline = FleetFile(models=[spec])
    settings = GatewaySettings(host=host, port=port, workers=workers, fleet_file=fleet_file)
    fleet = resolve_fleet(settings, inline)
    ensure_port_free(host, port, "the gateway")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C or SIGTERM: a clean stop
        run_gateway(settings, fleet)
