"""Throwaway PostgreSQL databases for tests, on the server at 127.0.0.1:5432.

Several test sessions share that server at once, so each test (or module) gets a database
of its own, named `<prefix>_<random hex>`, created from the maintenance connection and
dropped after, even if connections to it are still open (`DROP DATABASE ... WITH (FORCE)`).

    with postgres_database() as db:          # a sync context manager, for fixtures
        store = await TenancyStore.open(db.url, tmp_path)

    async with temporary_postgres_database() as db:  # the same, inside a test
        ...

The server is `FLEETSERVE_TEST_POSTGRES_URL`, default postgresql://postgres@127.0.0.1:5432/test
(trust auth). When it cannot be reached, `PostgresUnavailable` is raised; `postgres_required()`
says whether a test should then fail (CI=true: CI runs the server) or may skip.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

ADMIN_URL_ENV = "FLEETSERVE_TEST_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
CONNECT_TIMEOUT_S = 5.0
DEFAULT_PREFIX = "fleetserve_test"

__all__ = [
    "ADMIN_URL_ENV",
    "PostgresUnavailable",
    "TemporaryDatabase",
    "create_database",
    "drop_database",
    "postgres_database",
    "postgres_required",
    "temporary_postgres_database",
]


class PostgresUnavailable(RuntimeError):  # noqa: N818 (reads as a state, like `Empty`)
    """The test server cannot be reached; the message says where and why."""


@dataclass(frozen=True, slots=True)
class TemporaryDatabase:
    """A database made for one test or module: its name and SQLAlchemy (asyncpg) URL."""

    name: str
    url: str

    @property
    def plain_url(self) -> str:
        """The URL without a driver (`postgresql://...`), as a user would write it."""
        return self.url.replace("postgresql+asyncpg://", "postgresql://", 1)


def admin_url() -> URL:
    return make_url(os.environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL)


def postgres_required() -> bool:
    """Whether a test that needs PostgreSQL must fail without it (in CI) or may skip."""
    return os.environ.get("CI", "").lower() == "true"


async def _execute(statement: str, what: str) -> None:
    """One statement outside a transaction (CREATE/DROP DATABASE) on the server's own
    database."""
    server = admin_url()
    engine = create_async_engine(
        server.set(drivername="postgresql+asyncpg"),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"timeout": CONNECT_TIMEOUT_S},
    )
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    except (OSError, TimeoutError, SQLAlchemyError) as exc:
        shown = server.render_as_string(hide_password=True)
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise PostgresUnavailable(
            f"PostgreSQL for tests at {shown} could not {what} ({type(exc).__name__}: "
            f"{reason}); start it, or point {ADMIN_URL_ENV} at one"
        ) from exc
    finally:
        await engine.dispose()


async def create_database(prefix: str = DEFAULT_PREFIX) -> TemporaryDatabase:
    """A new, empty database with a unique name (lower-case letters, digits, `_`)."""
    if not prefix.replace("_", "").isalnum() or not prefix.islower():
        raise ValueError(f"invalid database name prefix {prefix!r}")
    name = f"{prefix}_{secrets.token_hex(6)}"
    await _execute(f'CREATE DATABASE "{name}"', f"create the database {name}")
    url = admin_url().set(drivername="postgresql+asyncpg", database=name)
    return TemporaryDatabase(name, url.render_as_string(hide_password=False))


async def drop_database(database: TemporaryDatabase) -> None:
    """Drop it, ending any session still connected to it."""
    await _execute(
        f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)',
        f"drop the database {database.name}",
    )


@asynccontextmanager
async def temporary_postgres_database(
    prefix: str = DEFAULT_PREFIX,
) -> AsyncIterator[TemporaryDatabase]:
    database = await create_database(prefix)
    try:
        yield database
    finally:
        await drop_database(database)


def _in_thread(coroutine_function: Any, *args: Any) -> Any:
    """Run a coroutine to completion on a loop of its own, in a thread: callable with or
    without a running event loop (a sync fixture runs outside the test's loop)."""
    with ThreadPoolExecutor(1, thread_name_prefix="test-postgres") as pool:
        return pool.submit(asyncio.run, coroutine_function(*args)).result()


@contextmanager
def postgres_database(prefix: str = DEFAULT_PREFIX) -> Iterator[TemporaryDatabase]:
    """`temporary_postgres_database` for synchronous code (fixtures of any scope)."""
    database: TemporaryDatabase = _in_thread(create_database, prefix)
    try:
        yield database
    finally:
        _in_thread(drop_database, database)
