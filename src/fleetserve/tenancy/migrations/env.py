"""Alembic's environment: migrate over the connection that `tenancy.database` passes in.

There is no offline (`--sql`) mode and no URL here: the caller opens the database, begins
the transaction and takes the migration lock, so that every revision runs in one transaction
that either lands whole or not at all.
"""

from __future__ import annotations

from typing import cast

from alembic import context
from sqlalchemy import Connection

from fleetserve.tenancy.schema import VERSION_TABLE, metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        transactional_ddl=True,  # SQLite too: its DDL runs in the caller's transaction
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER via table copies
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _connection() -> Connection:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "fleetserve's migrations run through fleetserve (`fleetserve db upgrade`), "
            "which passes the connection in; there is no alembic.ini"
        )
    return cast(Connection, connection)


if context.is_offline_mode():
    raise RuntimeError("fleetserve's migrations have no offline (--sql) mode")
run_migrations(_connection())
