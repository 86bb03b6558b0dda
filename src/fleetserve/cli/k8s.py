"""`fleetserve k8s ...`: the Helm chart rendered and checked (render, validate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from fleetserve.cli.common import clear_errors
from fleetserve.deploy.helm import RenderSpec, render
from fleetserve.deploy.validate import KUBE_VERSIONS, check_version, parse_manifests, validate
from fleetserve.errors import ConfigError

k8s_app = typer.Typer(
    name="k8s",
    help="fleetserve on Kubernetes: render the Helm chart, validate what it renders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_CHART = Path("charts/fleetserve")


def _values_option() -> Any:
    return typer.Option(
        [], "--values", "-f", help="A values file (repeatable; later files win), as helm's -f."
    )


def _set_option() -> Any:
    return typer.Option([], "--set", help="One value, key=value (repeatable), as helm's --set.")


def _chart_option() -> Any:
    return typer.Option(DEFAULT_CHART, "--chart", help="The chart's directory.")


def _spec(
    chart: Path, values: list[Path], sets: list[str], release: str, namespace: str,
    kube_version: str | None = None,
) -> RenderSpec:  # fmt: skip
    if not (chart / "Chart.yaml").is_file():
        raise ConfigError(f"--chart {chart}: no Chart.yaml there (run from the repository root, "
                          "or give --chart PATH)")  # fmt: skip
    for path in values:
        if not path.is_file():
            raise ConfigError(f"--values {path}: no such file")
    for assignment in sets:
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment}: expected key=value")
    return RenderSpec(chart, values, sets, release, namespace, kube_version)


@k8s_app.command("render")
@clear_errors
def render_command(
    values: list[Path] = _values_option(),
    sets: list[str] = _set_option(),
    release: str = typer.Option("fleetserve", "--release", help="The release name."),
    namespace: str = typer.Option("fleetserve", "--namespace", "-n", help="Its namespace."),
    chart: Path = _chart_option(),
) -> None:
    """Print the manifests the chart renders (helm template), for kubectl apply or a review.

    Example: fleetserve k8s render -f my-values.yaml --set gateway.replicas=3 -n llm
    """
    typer.echo(render(_spec(chart, values, sets, release, namespace)), nl=False)


@k8s_app.command("validate")
@clear_errors
def validate_command(
    values: list[Path] = _values_option(),
    sets: list[str] = _set_option(),
    kube_version: str = typer.Option(
        KUBE_VERSIONS[-1],
        "--kube-version",
        help=f"Kubernetes version to check for, {KUBE_VERSIONS[0]} to {KUBE_VERSIONS[-1]}.",
    ),
    release: str = typer.Option("fleetserve", "--release", help="The release name."),
    namespace: str = typer.Option("fleetserve", "--namespace", "-n", help="Its namespace."),
    chart: Path = _chart_option(),
) -> None:
    """Render the chart and check every object against the Kubernetes API schemas of one
    version, and the ServiceMonitors, PodMonitors and PrometheusRules against their CRDs.
    Unknown fields are errors. Exit 1 when anything is invalid.

    Example: fleetserve k8s validate -f my-values.yaml --kube-version 1.33
    """
    check_version(kube_version)
    spec = _spec(chart, values, sets, release, namespace, kube_version)
    objects = parse_manifests(render(spec))
    problems = validate(objects, kube_version)
    for problem in problems:
        typer.echo(f"invalid: {problem}", err=True)
    if problems:
        typer.echo(f"{len(problems)} of {len(objects)} objects are not valid for Kubernetes "
                   f"{kube_version}", err=True)  # fmt: skip
        raise typer.Exit(1)
    typer.echo(f"{len(objects)} objects are valid for Kubernetes {kube_version}")
