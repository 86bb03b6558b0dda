"""Entry point: `fleetserve COMMAND`. Each command's --help has an example."""

from __future__ import annotations

import sys

import typer

# typer runs its own copy of click; its exceptions are the ones a command line raises.
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from fleetserve import __version__
from fleetserve.cli.autoscaler import autoscaler_command
from fleetserve.cli.bench import bench_app
from fleetserve.cli.common import USAGE_EXIT, fail
from fleetserve.cli.db import db_app
from fleetserve.cli.engine import engine_app
from fleetserve.cli.gateway import gateway_command
from fleetserve.cli.k8s import k8s_app
from fleetserve.cli.status import status_command
from fleetserve.cli.tenants import keys_app, tenants_app, usage_command
from fleetserve.cli.up import up_command

app = typer.Typer(
    name="fleetserve",
    help="Serve open LLMs to many users: gateway, autoscaler and load tester.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(engine_app, name="engine")
app.add_typer(bench_app, name="bench")
app.add_typer(db_app, name="db")
app.command("gateway")(gateway_command)
app.command("up")(up_command)
app.command("status")(status_command)
app.command("autoscaler")(autoscaler_command)
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(k8s_app, name="k8s")
app.command("usage")(usage_command)

INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a Ctrl-C


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
    """Run the app; a usage error (unknown option, a value of the wrong type) is one line and
    exit status 2 instead of click's framed box."""
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:
        exc.show()  # the help text, as `fleetserve` alone has always printed it
        sys.exit(exc.exit_code)
    except UsageError as exc:  # BadParameter and missing/unknown options too
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        fail(" ".join(exc.format_message().split()) + hint, USAGE_EXIT)
    except ClickException as exc:
        fail(" ".join(exc.format_message().split()), exc.exit_code)
    except typer.Abort:
        sys.exit(INTERRUPTED_EXIT)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
