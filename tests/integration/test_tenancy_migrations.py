"""The tenant store's Alembic migrations on both databases: empty to head, a second run that
does nothing, several at once, down and up again, and a head that matches schema.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from fleetserve.errors import ConfigError
from fleetserve.tenancy.database import (
    alembic_config,
    create_engine,
    database_url,
    head_revision,
    upgrade_database,
)
from fleetserve.tenancy.schema import VERSION_TABLE, metadata
from fleetserve.tenancy.store import TenancyStore
from fleetserve.testing.databases import temporary_postgres_database

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Empty:
    """An empty database: the URL to give the store (None: SQLite in state_dir)."""

    url: str | None
    state_dir: Path

    def engine(self) -> AsyncEngine:
        return create_engine(database_url(self.url, self.state_dir))


@pytest.fixture(params=["sqlite", "postgresql"])
async def empty(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Empty]:
    if request.param == "sqlite":
        yield Empty(None, tmp_path / "state")
        return
    request.getfixturevalue("postgres_url")  # skips, or fails in CI, without a server
    async with temporary_postgres_database("fleetserve_test_migrate") as database:
        yield Empty(database.url, tmp_path / "state")


async def run_sync(empty: Empty, work: Any) -> Any:
    engine = empty.engine()
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(work)
    finally:
        await engine.dispose()


def tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE, "compare_type": True}
    )
    return list(compare_metadata(context, metadata))


async def test_upgrade_from_empty_to_head_then_nothing(empty: Empty) -> None:
    head = head_revision()
    assert head is not None
    _, first = await upgrade_database(empty.url, empty.state_dir)
    assert (first.before, first.after, first.changed) == (None, head, True)
    _, second = await upgrade_database(empty.url, empty.state_dir)
    assert (second.before, second.after, second.changed) == (head, head, False)
    assert await run_sync(empty, tables) == {"tenants", "api_keys", "usage", VERSION_TABLE}


async def test_head_matches_schema_py(empty: Empty) -> None:
    """What the migrations build is what schema.py defines: autogenerate finds nothing to do
    (tables, columns, types, nullability, indexes, foreign keys)."""
    await upgrade_database(empty.url, empty.state_dir)
    assert await run_sync(empty, schema_diff) == []


async def test_a_schema_that_differs_is_found(empty: Empty) -> None:
    """The comparison above can fail: an index dropped by hand shows up."""
    await upgrade_database(empty.url, empty.state_dir)
    await run_sync(empty, lambda c: c.execute(text("DROP INDEX ix_usage_started_at")))
    diff = await run_sync(empty, schema_diff)
    assert [d[0] for d in diff] == ["add_index"]


async def test_several_upgrades_at_once_migrate_once(empty: Empty) -> None:
    results = await asyncio.gather(
        *(upgrade_database(empty.url, empty.state_dir) for _ in range(4))
    )
    assert sorted(m.changed for _, m in results) == [False, False, False, True]
    assert {m.after for _, m in results} == {head_revision()}


async def test_down_to_base_and_up_again(empty: Empty) -> None:
    await upgrade_database(empty.url, empty.state_dir)

    def downgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "base")

    await run_sync(empty, downgrade)
    assert await run_sync(empty, tables) == {VERSION_TABLE}
    _, again = await upgrade_database(empty.url, empty.state_dir)
    assert (again.before, again.after) == (None, head_revision())


async def test_a_revision_from_a_newer_fleetserve_is_refused(empty: Empty) -> None:
    await upgrade_database(empty.url, empty.state_dir)
    await run_sync(
        empty, lambda c: c.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'ffff'"))
    )
    for upgrade in (True, False):
        with pytest.raises(ConfigError, match="revision ffff, which this fleetserve does not"):
            await TenancyStore.open(empty.url, empty.state_dir, upgrade=upgrade)
