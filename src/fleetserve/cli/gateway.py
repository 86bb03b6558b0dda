"""`fleetserve gateway`: the OpenAI-compatible gateway over a fleet of replicas."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from fleetserve.cli.common import (
    access_log_option,
    admin_key_file_option,
    admin_key_option,
    auth_option,
    clear_errors,
    ensure_port_free,
    log_format_option,
    settings_from,
    teller,
    with_auth,
)
from fleetserve.config import (
    DEFAULT_PICKER,
    DiscoverySpec,
    FleetFile,
    KubernetesDiscoverySpec,
    ModelSpec,
    admin_api_line,
)
from fleetserve.errors import ConfigError
from fleetserve.fleet.kubernetes_discovery import load_config
from fleetserve.gateway.app import resolve_fleet
from fleetserve.gateway.serve import run_gateway

# The options that are GatewaySettings fields: given ones outrank FLEETSERVE_* and the fleet file.
SETTINGS_OPTIONS = ("port", "host", "workers", "fleet_file", "kubeconfig", "admin_key",
                    "admin_key_file", "log_format", "access_log")  # fmt: skip


@clear_errors
def gateway_command(
    ctx: typer.Context,
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on (FLEETSERVE_PORT)."),
    host: str = typer.Option(
        "127.0.0.1",
        help="Address to bind (FLEETSERVE_HOST). Any but a loopback address needs an admin key.",
    ),
    model: str | None = typer.Option(None, help="Model name served by --upstream engines."),
    upstream: list[str] = typer.Option(
        [], "--upstream", "-u", help="Base URL of an engine that already runs (repeatable)."
    ),
    engine: str = typer.Option("vllm", help="Engine behind --upstream: vllm, sim or llamacpp."),
    picker: str = typer.Option(
        DEFAULT_PICKER, help="round_robin, least_outstanding, p2c or prefix_affinity."
    ),
    fleet_file: Path | None = typer.Option(
        None,
        "--fleet-file",
        "-f",
        help="Fleet file (YAML; FLEETSERVE_FLEET_FILE): its models, and settings in its "
        "`gateway:` section.",
    ),
    workers: int = typer.Option(1, help="Worker processes sharing the port (FLEETSERVE_WORKERS)."),
    max_concurrency: int | None = typer.Option(None, help="In-flight cap per replica."),
    k8s_service: str | None = typer.Option(
        None, help="Kubernetes Service whose ready endpoints (EndpointSlices) are the replicas."
    ),
    k8s_namespace: str | None = typer.Option(
        None, help="Its namespace (default: the kubeconfig's, or the pod's own)."
    ),
    k8s_port: str | None = typer.Option(
        None, help="Its port by name or number (default: the only one)."
    ),
    kubeconfig: Path | None = typer.Option(
        None,
        help="Kubeconfig (FLEETSERVE_KUBECONFIG; default: in-cluster, $KUBECONFIG, "
        "~/.kube/config).",
    ),
    admin_key: str | None = admin_key_option(),
    admin_key_file: Path | None = admin_key_file_option(),
    auth: str | None = auth_option(),
    log_format: str = log_format_option(),
    access_log: bool | None = access_log_option(),
) -> None:
    """Run the gateway in front of engines.

    Example: fleetserve gateway --port 8000 --model llama --upstream http://127.0.0.1:8001
    --upstream http://127.0.0.1:8002

    On Kubernetes: fleetserve gateway --host 0.0.0.0 --admin-key-file /etc/fleetserve/admin-key
    --model llama --engine vllm --k8s-service vllm-llama --k8s-namespace llm

    JSON logs and traces to Langfuse: OTEL_EXPORTER_OTLP_ENDPOINT=https://cloud.langfuse.com/api/public/otel
    OTEL_EXPORTER_OTLP_HEADERS="Authorization=Basic%20$(printf pk:sk | base64)"
    fleetserve gateway --log-format json -f fleet.yaml

    Settings, highest first: a flag, the environment (FLEETSERVE_<NAME>, nested as
    FLEETSERVE_TIMEOUTS__FIRST_BYTE_S), the fleet file's `gateway:` section, the default.
    """
    settings = with_auth(settings_from(ctx, *SETTINGS_OPTIONS), auth)
    inline: FleetFile | None = None
    if upstream or k8s_service:
        if not model:
            raise ConfigError("--upstream and --k8s-service need --model NAME (what they serve)")
        if settings.fleet_file is not None:
            raise ConfigError(
                "give either a fleet file (--fleet-file or FLEETSERVE_FLEET_FILE) or --model "
                "with its replicas, not both"
            )
        if upstream and k8s_service:
            raise ConfigError("give either --upstream or --k8s-service, not both")
        try:
            spec = ModelSpec(
                name=model,
                replicas=upstream,
                engine=engine,
                picker=picker,
                max_concurrency=max_concurrency,
                discovery=_kubernetes(k8s_service, k8s_namespace, k8s_port),
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        inline = FleetFile(models=[spec])
    elif k8s_namespace or k8s_port:
        raise ConfigError("--k8s-namespace and --k8s-port go with --k8s-service")
    admin = admin_api_line(settings)
    fleet = resolve_fleet(settings, inline)
    for spec in fleet.models:  # a missing kubeconfig is one line now, not one per worker
        if spec.discovery is not None:
            load_config(spec, settings.kubeconfig)
    ensure_port_free(settings.host, settings.port, "the gateway")
    where = f"http://{settings.host}:{settings.port}"
    teller(settings.log_format)(f"[bold]fleetserve gateway[/] on {where}; {admin}")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C or SIGTERM: a clean stop
        run_gateway(settings, fleet)


def _kubernetes(
    service: str | None, namespace: str | None, port: str | None
) -> DiscoverySpec | None:
    if service is None:
        return None
    port_ref: str | int | None = int(port) if port is not None and port.isdigit() else port
    spec = KubernetesDiscoverySpec(service=service, namespace=namespace, port=port_ref)
    return DiscoverySpec(kubernetes=spec)
