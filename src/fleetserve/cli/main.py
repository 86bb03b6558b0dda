"""Entry point: `fleetserve COMMAND`. Each command's --help has an example."""

from __future__ import annotations

import typer

from fleetserve import __version__
from fleetserve.cli.autoscaler import autoscaler_command
from fleetserve.cli.bench import bench_app
from fleetserve.cli.engine import engine_app
from fleetserve.cli.gateway import gateway_command
from fleetserve.cli.status import status_command
from fleetserve.cli.up import up_command

app = typer.Typer(
    name="fleetserve",
    help="Serve open LLMs to many users: gateway, autoscaler, load tester and cost analysis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(engine_app, name="engine")
app.add_typer(bench_app, name="bench")
app.command("gateway")(gateway_command)
app.command("up")(up_command)
app.command("status")(status_command)
app.command("autoscaler")(autoscaler_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fleetserve {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """fleetserve: one tool for serving LLMs to many users."""


def main() -> None:
    app()
