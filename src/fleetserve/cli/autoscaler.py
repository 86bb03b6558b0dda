"""`fleetserve autoscaler`: the autoscaler alone, reading a gateway and scaling a Deployment."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from pydantic import ValidationError

from fleetserve.cli.common import (
    admin_key_file_option,
    admin_key_option,
    clear_errors,
    ensure_port_free,
    settings_from,
)
from fleetserve.config import AutoscaleSettings, describe_errors, load_fleet_file
from fleetserve.errors import ConfigError
from fleetserve.fleet.kubernetes import KubernetesTarget
from fleetserve.stack import RemoteAutoscalerSpec, run_remote_autoscaler


def policy_from(
    fleet_file: Path | None, model: str, overrides: dict[str, object]
) -> AutoscaleSettings:
    """The model's `autoscale:` section of the fleet file (defaults without one), overridden."""
    base: dict[str, object] = {}
    if fleet_file is not None:
        specs = {m.name: m for m in load_fleet_file(fleet_file).models}
        spec = specs.get(model)
        if spec is None:
            raise ConfigError(f"{fleet_file} has no model {model!r} (it has {sorted(specs)})")
        if spec.autoscale is not None:
            base = spec.autoscale.model_dump()
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AutoscaleSettings.model_validate(base)
    except ValidationError as exc:
        raise ConfigError(f"autoscale settings are invalid: {describe_errors(exc)}") from exc


# What it shares with the gateway's settings (flag > environment > fleet file's `gateway:`).
SETTINGS_OPTIONS = ("fleet_file", "kubeconfig", "admin_key", "admin_key_file")


@clear_errors
def autoscaler_command(
    ctx: typer.Context,
    gateway: str = typer.Option(..., "--gateway", "-g", help="Base URL of a fleetserve gateway."),
    model: str = typer.Option(..., "--model", "-m", help="The model whose replicas to scale."),
    deployment: str = typer.Option(..., help="Kubernetes Deployment running the replicas."),
    namespace: str | None = typer.Option(None, help="Its namespace (default: kubeconfig's)."),
    kubeconfig: Path | None = typer.Option(
        None,
        help="Kubeconfig (FLEETSERVE_KUBECONFIG; default: in-cluster, $KUBECONFIG, "
        "~/.kube/config).",
    ),
    context: str | None = typer.Option(None, help="Kubeconfig context."),
    fleet_file: Path | None = typer.Option(
        None,
        "--fleet-file",
        "-f",
        help="Fleet file (FLEETSERVE_FLEET_FILE) whose model's `autoscale:` sets the policy; "
        "its `gateway:` section may hold the admin key.",
    ),
    min_replicas: int | None = typer.Option(None, "--min", min=0, help="Fewest replicas."),
    max_replicas: int | None = typer.Option(None, "--max", min=1, help="Most replicas."),
    ttft_slo_s: float | None = typer.Option(
        None, "--ttft-slo", min=0.001, help="TTFT p95 SLO (s)."
    ),
    admin_key: str | None = admin_key_option("of the gateway to read"),
    admin_key_file: Path | None = admin_key_file_option(),
    host: str = typer.Option("127.0.0.1", help="Address of this process's status endpoint."),
    port: int = typer.Option(8081, help="Port of /admin/autoscaler, /metrics and /health."),
) -> None:
    """Scale a Kubernetes Deployment from a gateway's LLM signals; Ctrl-C stops.

    Example: fleetserve autoscaler --gateway http://fleetserve:8000 --model llama
    --deployment vllm-llama --namespace llm --min 1 --max 8 --ttft-slo 2

    The admin key, kubeconfig and fleet file: a flag, then FLEETSERVE_*, then the fleet file's
    `gateway:` section. The policy: --min/--max/--ttft-slo, then the fleet file, then defaults.
    """
    shared = settings_from(ctx, *SETTINGS_OPTIONS)
    policy = policy_from(
        shared.fleet_file,
        model,
        {"min_replicas": min_replicas, "max_replicas": max_replicas, "ttft_slo_s": ttft_slo_s},
    )
    ensure_port_free(host, port, "the autoscaler's status endpoint")
    spec = RemoteAutoscalerSpec(
        gateway_url=gateway,
        model=model,
        target=KubernetesTarget(deployment, namespace),
        autoscale=policy,
        admin_key=shared.admin_key_value(),
        kubeconfig=shared.kubeconfig,
        context=context,
        host=host,
        port=port,
    )
    with contextlib.suppress(KeyboardInterrupt):
        run_remote_autoscaler(spec)
