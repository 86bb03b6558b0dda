"""Shared CLI plumbing: clear one-line errors instead of tracebacks, settings from the options
a user gave, and port checks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from fleetserve.config import GatewaySettings, gateway_settings
from fleetserve.errors import ConfigError, FleetserveError
from fleetserve.fleet.processes import port_is_free
from fleetserve.telemetry.logs import write_json_line

P = ParamSpec("P")
R = TypeVar("R")

USAGE_EXIT = 2  # a bad value or usage, as click exits for its own usage errors

err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # one error, one line


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(Text.assemble(("error:", "bold red"), " ", message))  # no markup in it
    sys.exit(code)


def clear_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn fleetserve's own errors into one clear line and a non-zero exit (2 for settings)."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), USAGE_EXIT)
        except FleetserveError as exc:
            fail(str(exc))

    return wrapper


def teller(log_format: str) -> Callable[[str], None]:
    """How a command tells its user something: a rich line on the console, or with
    `--log-format json` one JSON object per line (its markup dropped), so that all of stderr
    stays machine-readable."""
    if log_format != "json":
        return err_console.print

    def tell(markup: str) -> None:
        write_json_line(Text.from_markup(markup).plain.strip(), "fleetserve.cli")

    return tell


def log_format_option(default: str = "console") -> Any:
    """`--log-format console|json`, on the commands that serve."""
    return typer.Option(
        default,
        "--log-format",
        help="console: readable lines; json: one JSON object per line, with an access line "
        "per request (FLEETSERVE_LOG_FORMAT). Example: --log-format json",
    )


def access_log_option() -> Any:
    """`--access-log/--no-access-log`."""
    return typer.Option(
        None,
        "--access-log/--no-access-log",
        help="One line per /v1 request: request id, trace id, tenant, model, replica, status, "
        "tokens, TTFT, e2e, bytes (FLEETSERVE_ACCESS_LOG). Default: on with --log-format json.",
    )


def admin_key_option(whose: str = "that /admin/* requires") -> Any:
    """`--admin-key`, the same on every command that serves or reads the admin API."""
    return typer.Option(
        None,
        "--admin-key",
        help=f"Bearer key {whose} (FLEETSERVE_ADMIN_KEY). Prefer --admin-key-file: a flag "
        "shows in `ps`.",
    )


def admin_key_file_option() -> Any:
    """`--admin-key-file`: the key in a file (a mounted Secret), one trailing newline stripped."""
    return typer.Option(
        None,
        "--admin-key-file",
        help="A file holding the admin key, one trailing newline stripped "
        "(FLEETSERVE_ADMIN_KEY_FILE).",
    )


def auth_option() -> Any:
    """`--auth none|keys`, on the commands that serve /v1."""
    return typer.Option(
        None,
        "--auth",
        help="none: /v1 is open; keys: /v1 needs a tenant's key (FLEETSERVE_AUTH). Default: "
        "keys on a non-loopback address, none on loopback.",
    )


def with_auth(settings: GatewaySettings, auth: str | None) -> GatewaySettings:
    """The settings with `--auth` applied, when given (it outranks FLEETSERVE_AUTH)."""
    if auth is None:
        return settings
    if auth not in ("none", "keys"):
        raise ConfigError(f"--auth: one of none, keys; not {auth!r}")
    tenancy = settings.tenancy.model_copy(update={"auth": auth})
    return settings.model_copy(update={"tenancy": tenancy})


def given_options(ctx: typer.Context, *names: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The options among `names` that the user gave on the command line, and the flag of each
    (`port` -> `--port`). Only these become init values of the settings, so that the
    environment and the fleet file fill in the rest (a default would outrank them)."""
    values: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for param in ctx.command.params:
        name = param.name
        source = ctx.get_parameter_source(name) if name in names else None
        if source is not None and source.name == "COMMANDLINE":  # not a default, not an envvar
            values[name] = ctx.params[name]
            flags[name] = max(param.opts, key=len)
    return values, flags


def settings_from(ctx: typer.Context, *names: str) -> GatewaySettings:
    """GatewaySettings: the given options among `names`, then the environment, then the fleet
    file's `gateway:` section, then the defaults."""
    return gateway_settings(*given_options(ctx, *names))


def ensure_port_free(host: str, port: int, what: str) -> None:
    """Fail early with a clear message rather than deep inside the server's start-up."""
    if port == 0:
        return
    try:
        free = port_is_free(port, host)
    except OSError as exc:
        fail(f"cannot bind {host}:{port} for {what}: {exc.strerror}")
    if not free:
        fail(f"port {port} on {host} is already in use; choose another with --port ({what})")
