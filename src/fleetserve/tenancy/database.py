"""Opening the tenant store's database: which URL, the engine with its per-connection set-up,
and the schema migrations (Alembic, run from the installed package: no alembic.ini on disk).

SQLite (the default, `<state dir>/fleetserve.db`) runs in WAL mode, with a busy timeout and
foreign keys on every connection. Its transactions are begun by us rather than by the
driver, so that a write transaction can take the write lock at its start (`BEGIN
IMMEDIATE`): a read-modify-write then cannot interleave with another writer, in this
process or another. PostgreSQL goes through asyncpg; its writers lock rows instead
(`SELECT ... FOR UPDATE`).

Several processes may start on one database at once: on PostgreSQL the migration holds a
transaction-scoped advisory lock; on SQLite it runs inside `BEGIN IMMEDIATE`. Whoever comes
second finds the schema at head and does nothing.

A URL is shown only with its password masked (`mask_url`); nothing here logs it.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from fleetserve.errors import ConfigError
from fleetserve.tenancy.schema import VERSION_TABLE

__all__ = [
    "BEGIN_OPTION",
    "DEFAULT_FILE",
    "OPEN_ERRORS",
    "Migration",
    "check_schema",
    "connect_error",
    "create_engine",
    "database_url",
    "head_revision",
    "mask_url",
    "migrate",
    "upgrade_database",
]

DEFAULT_FILE = "fleetserve.db"
SQLITE_BUSY_TIMEOUT_MS = 10_000  # a writer waits this long for another's lock
CONNECT_TIMEOUT_S = 10.0
BEGIN_OPTION = "fleetserve_sqlite_begin"
"""Execution option naming the SQLite transaction mode (`IMMEDIATE` for writers)."""
# pg_advisory_xact_lock key of the schema migration: "fleetsrv" as a big-endian int64.
MIGRATION_LOCK_KEY = int.from_bytes(b"fleetsrv", "big") - (1 << 63)
MIGRATIONS = "fleetserve.tenancy:migrations"  # Alembic's package-resource notation

OPEN_ERRORS = (SQLAlchemyError, OSError, TimeoutError, TypeError, ValueError, OverflowError)
"""What opening a database raises for a bad URL or an unreachable server: unknown URL
parameters reach the driver as keyword arguments (TypeError), bad values as ValueError."""

_POSTGRES_SCHEMES = frozenset({"postgres", "postgresql", "postgresql+asyncpg"})
_SQLITE_SCHEMES = frozenset({"sqlite", "sqlite+aiosqlite"})
_PASSWORD_PARAM = re.compile(r"(?i)(^|&)((?:ssl)?password=)[^&]*")


def mask_url(url: str | URL) -> str:
    """The URL with its password shown as `***`: in the user part (up to the last `@`, so an
    unescaped `@` in a password hides it too) and in a `password=` query parameter."""
    raw = url.render_as_string(hide_password=False) if isinstance(url, URL) else url
    scheme, sep, rest = raw.partition("://")
    if not sep:
        return raw
    main, question, query = rest.partition("?")
    userinfo, at, hostpart = main.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        main = f"{user}{':***' if colon else ''}@{hostpart}"
    query = _PASSWORD_PARAM.sub(r"\1\2***", query)
    return f"{scheme}://{main}{question}{query}"


def database_url(url: str | None, state_dir: Path) -> URL:
    """The async URL to open: `url` normalised (postgresql:// -> postgresql+asyncpg://,
    sqlite:// -> sqlite+aiosqlite://), or SQLite at <state_dir>/fleetserve.db. For SQLite the
    directory is created (0700) and the file too (0600: it holds key digests). ConfigError
    (one line, password masked) for a URL that does not parse or names another database."""
    if url is None:
        return _sqlite_file(state_dir / DEFAULT_FILE)
    shown = mask_url(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        quoted = f" {shown!r}" if "://" in url else ""  # else it may be a password itself
        raise ConfigError(
            f"invalid database URL{quoted}: expected postgresql://user@host/db "
            "or sqlite:///path/to/file.db"
        ) from exc
    scheme = parsed.drivername
    if scheme in _POSTGRES_SCHEMES:
        if not parsed.host and not parsed.query.get("host"):
            raise ConfigError(f"invalid database URL {shown!r}: it names no host")
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise ConfigError(f"invalid database URL {shown!r}: port {parsed.port} is not 1-65535")
        query = dict(parsed.query)
        if "sslmode" in query and "ssl" not in query:  # libpq's name; asyncpg takes the values
            query["ssl"] = query.pop("sslmode")
        return parsed.set(drivername="postgresql+asyncpg", query=query)
    if scheme in _SQLITE_SCHEMES:
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError(
                f"invalid database URL {shown!r}: an in-memory SQLite database would vanish "
                "with the process; give a file, e.g. sqlite:////var/lib/fleetserve/fleetserve.db"
            )
        return _sqlite_file(Path(parsed.database).expanduser())
    raise ConfigError(
        f"unsupported database URL {shown!r}: use postgresql://user@host/db (asyncpg) "
        "or sqlite:///path/to/file.db"
    )


def _sqlite_file(path: Path) -> URL:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # SQLite keeps an existing mode
        try:
            _ensure_wal(fd, path)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(f"cannot create the database {path}: {exc.strerror or exc}") from exc
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open the database {path}: {exc}") from exc
    return URL.create("sqlite+aiosqlite", database=str(path))


def _ensure_wal(fd: int, path: Path) -> None:
    """Put the file in WAL mode (it stays so), one process at a time: SQLite may refuse a
    journal-mode change at once, without waiting, while another connection converts the same
    new file. The flock (whole file, apart from SQLite's own byte-range locks) is held for
    the few milliseconds that the PRAGMA takes."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)) as conn:
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise ConfigError(f"cannot put the database {path} in WAL mode (it is in {mode})")
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def create_engine(url: URL) -> AsyncEngine:
    """An engine for `database_url`'s result, with the per-connection set-up described above."""
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    return create_async_engine(
        url,
        pool_pre_ping=True,  # a restarted server must not hand out dead connections
        connect_args={
            "timeout": CONNECT_TIMEOUT_S,
            "server_settings": {"application_name": "fleetserve"},
        },
    )


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver begins nothing; `_sqlite_begin` does
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode")  # `_ensure_wal` made it WAL; read, not changed
        (mode,) = cursor.fetchone()
        if str(mode).lower() != "wal":  # changed by another program since: change it back
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    mode = connection.get_execution_options().get(BEGIN_OPTION, "DEFERRED")
    if mode not in {"DEFERRED", "IMMEDIATE"}:
        raise ValueError(f"unknown SQLite transaction mode {mode!r}")
    connection.exec_driver_sql(f"BEGIN {mode}")


def connect_error(url: URL, exc: BaseException) -> ConfigError:
    """ConfigError for a database that could not be opened: one line, password masked."""
    return ConfigError(f"cannot open the database {mask_url(url)}: {error_reason(url, exc)}")


def error_reason(url: URL, exc: BaseException) -> str:
    """What went wrong, in one line, without the URL's password."""
    cause: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc
    if isinstance(cause, OSError) and cause.strerror:
        reason = cause.strerror
    else:
        reason = str(cause) or type(cause).__name__
    reason = " ".join(reason.split())
    for secret in (url.password, url.query.get("password"), url.query.get("sslpassword")):
        if isinstance(secret, str) and secret:
            reason = reason.replace(secret, "***")
    return reason


@dataclass(frozen=True, slots=True)
class Migration:
    """What an upgrade did: the revision before (None: an empty database) and after."""

    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def alembic_config() -> Config:
    """Alembic's configuration, built in code from the migrations shipped in the package."""
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def migrate(connection: AsyncConnection) -> Migration:
    """Upgrade the schema to head inside `connection`'s transaction (begun by the caller:
    `BEGIN IMMEDIATE` on SQLite), holding the migration lock on PostgreSQL."""
    if connection.dialect.name == "postgresql":
        await connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
        )
    return await connection.run_sync(_upgrade)


def _upgrade(connection: Connection) -> Migration:
    before = _current(connection)
    config = alembic_config()
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, "head")
    except CommandError as exc:  # e.g. a revision this version does not know
        raise ConfigError(_unknown_revision(before)) from exc
    return Migration(before, _current(connection))


def _current(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def _unknown_revision(current: str | None) -> str:
    return (
        f"the database schema is at revision {current}, which this fleetserve does not know "
        f"(it knows up to {head_revision()}): upgrade fleetserve, or use another database"
    )


async def check_schema(connection: AsyncConnection) -> None:
    """ConfigError unless the schema is at head (for a store opened with upgrade=False)."""
    current = await connection.run_sync(_current)
    head = head_revision()
    if current == head:
        return
    if current is not None and not _known(current):
        raise ConfigError(_unknown_revision(current))
    raise ConfigError(
        f"the database schema is at revision {current or '(empty)'}, not {head}: "
        "run `fleetserve db upgrade`"
    )


async def upgrade_database(url: str | None, state_dir: Path) -> tuple[str, Migration]:
    """`fleetserve db upgrade`: migrate the database to head; its masked URL and the
    migration done. ConfigError (one line) when it cannot be opened or migrated."""
    target = database_url(url, state_dir)
    engine = create_engine(target)
    try:
        async with engine.connect() as connection:
            writer = await connection.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})
            async with writer.begin():
                migration = await migrate(writer)
    except OPEN_ERRORS as exc:
        raise connect_error(target, exc) from exc
    finally:
        await engine.dispose()
    return mask_url(target), migration
