"""`fleetserve db ...`: the tenant store's database; `upgrade` migrates its schema to the
version this fleetserve needs (the gateway also does so on start-up)."""

from __future__ import annotations

import asyncio
from typing import Any

import typer

from fleetserve.cli.common import clear_errors
from fleetserve.config import default_state_dir, gateway_settings

db_app = typer.Typer(
    name="db",
    help="The database of tenants, keys and usage (SQLite by default, or PostgreSQL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_UPGRADE_HELP = "\n\n".join(
    (
        "Migrate the database of tenants, keys and usage to the schema this fleetserve needs. "
        "Safe to run again (it does nothing when up to date) and while other fleetserve "
        "processes start on the same database.",
        "The database is --database-url, else FLEETSERVE_DATABASE_URL, else SQLite at "
        "<state dir>/fleetserve.db (FLEETSERVE_STATE_DIR, default ~/.local/share/fleetserve).",
        "Example: fleetserve db upgrade --database-url postgresql://fleetserve@db.internal/fleetserve",
    )
)


def database_url_option() -> Any:
    """`--database-url`, the same on every command that opens the tenant store."""
    return typer.Option(
        None,
        "--database-url",
        help="SQLAlchemy URL of the tenant store: postgresql://user@host/db or "
        "sqlite:///path.db (FLEETSERVE_DATABASE_URL; default: SQLite in the state directory). "
        "Prefer the environment for a URL with a password: a flag shows in `ps`.",
    )


def resolve_database_url(given: str | None) -> str | None:
    """The URL a command opens: `given` (its --database-url), else the settings' (environment,
    then fleet file); None means SQLite in the state directory."""
    if given is not None:
        return given
    configured = gateway_settings({}).tenancy.database_url
    return None if configured is None else configured.get_secret_value()


@db_app.command("upgrade", help=_UPGRADE_HELP)
@clear_errors
def upgrade_command(database_url: str | None = database_url_option()) -> None:
    """Migrate the schema to head (help text: _UPGRADE_HELP)."""
    # Here, not at the top: Alembic takes ~0.3 s to import, which every other command skips.
    from fleetserve.tenancy.database import upgrade_database  # noqa: PLC0415

    url = resolve_database_url(database_url)
    shown, migration = asyncio.run(upgrade_database(url, default_state_dir()))
    if migration.changed:
        typer.echo(
            f"upgraded the database {shown} from revision {migration.before or '(empty)'} "
            f"to {migration.after} (current)"
        )
    else:
        typer.echo(f"the database {shown} is up to date (revision {migration.after})")
