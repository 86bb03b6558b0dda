"""The tenant store: tenants, their API keys and the usage ledger, in SQLite or PostgreSQL.

`TenancyStore.open` picks the database (SQLite at `<state dir>/fleetserve.db` unless a URL
names one), migrates it to the current schema and hands back a store whose methods are the
whole of what the gateway, the admin API, the CLI and the ledger do with the database.

- Keys are stored as their HMAC digest (tenancy/keys.py); the token exists only in the
  return value of `create_key` and `rotate_key`.
- Read-modify-write (`update_tenant`, `rotate_key`, `revoke_key`) runs in one transaction
  that locks first: the row (`FOR UPDATE`) on PostgreSQL, the database (`BEGIN IMMEDIATE`)
  on SQLite, so concurrent changes to one tenant all land, none lost and none failed.
- `insert_usage` is one idempotent statement per batch (ON CONFLICT DO NOTHING on
  `request_id`), so a replayed batch writes nothing twice.
- Bad input is InvalidRequestError, NotFoundError or ConflictError (fleetserve.errors). A
  database that goes away after opening is ServiceUnavailableError (503), whose message
  names the database with its password masked: the ledger spools on it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    ProgrammingError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fleetserve.clock import Clock, RealClock
from fleetserve.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from fleetserve.tenancy import keys
from fleetserve.tenancy.changes import UNSET, TenantChanges, Unset
from fleetserve.tenancy.database import (
    BEGIN_OPTION,
    OPEN_ERRORS,
    check_schema,
    connect_error,
    create_engine,
    database_url,
    error_reason,
    mask_url,
    migrate,
)
from fleetserve.tenancy.model import ApiKey, Limits, Tenant, UsageGroupBy, UsageRow, valid_name
from fleetserve.tenancy.schema import api_keys, tenants
from fleetserve.tenancy.store_rows import (
    USAGE_FIELDS,
    check_label,
    check_limits,
    check_tenant,
    key_from,
    key_values,
    tenant_from,
    tenant_values,
    usage_tuple,
)
from fleetserve.tenancy.store_usage import (
    UsageGroup,
    spend,
    usage_groups,
    usage_rows,
)

__all__ = ["UNSET", "TenancyStore", "TenantChanges", "Unset", "UsageGroup", "UsageGroupBy"]

KEY_PREFIX_TRIES = 4  # a new key's random prefix may (very rarely) be taken already


# Column labels of find_key's join (both tables have rpm, tpm, created_at, ...).
_KEY_COLS = [c.label(f"k_{c.name}") for c in api_keys.c]
_TENANT_COLS = [c.label(f"t_{c.name}") for c in tenants.c]


_PG_TYPES = {
    "status": "integer", "prompt_tokens": "bigint", "completion_tokens": "bigint",
    "cost_micro_usd": "bigint", "queue_s": "float8", "ttft_s": "float8", "e2e_s": "float8",
    "started_at": "float8", "ended_at": "float8", "usage_estimated": "boolean",
}  # fmt: skip
# Built from the schema's own column names, never from input: no injection can reach them.
_INTO = f"INSERT INTO usage ({', '.join(USAGE_FIELDS)}) "
_SKIP = " ON CONFLICT (request_id) DO NOTHING"
_SQLITE_INSERT_USAGE = _INTO + f"VALUES ({', '.join('?' * len(USAGE_FIELDS))})" + _SKIP
_ARRAYS = ", ".join(f"${i}::{_PG_TYPES.get(n, 'text')}[]" for i, n in enumerate(USAGE_FIELDS, 1))
_PG_INSERT_USAGE = f"{_INTO}SELECT * FROM unnest({_ARRAYS}){_SKIP} RETURNING request_id"  # noqa: S608


class TenancyStore:
    """Tenants, keys and usage in one database; make one with `open`, end with `close`."""

    def __init__(self, engine: AsyncEngine, url: URL, clock: Clock) -> None:
        self._engine = engine
        self._url = url
        self._clock = clock
        self._sqlite = url.get_backend_name() == "sqlite"
        # SQLite has one writer at a time: queue this process's writers here rather than
        # in SQLite's busy handler (other processes still wait there).
        self._write_lock = asyncio.Lock() if self._sqlite else None

    @classmethod
    async def open(
        cls,
        url: str | None,
        state_dir: Path,
        *,
        upgrade: bool = True,
        clock: Clock | None = None,
    ) -> TenancyStore:
        """The store at `url` (None: SQLite at <state_dir>/fleetserve.db), migrated to the
        current schema when `upgrade` (else checked to be current). ConfigError, one line
        with the password masked, for a bad URL or a database that cannot be reached."""
        target = database_url(url, state_dir)
        engine = create_engine(target)
        try:
            async with engine.connect() as connection:
                writer = await connection.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})
                async with writer.begin():
                    if upgrade:
                        await migrate(writer)
                    else:
                        await check_schema(writer)
        except OPEN_ERRORS as exc:
            await engine.dispose()
            raise connect_error(target, exc) from exc
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, target, clock or RealClock())

    @property
    def url_display(self) -> str:
        """The database URL with its password masked."""
        return mask_url(self._url)

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return self._engine.dialect.name

    async def close(self) -> None:
        await self._engine.dispose()

    async def __aenter__(self) -> TenancyStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- tenants ------------------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant) -> Tenant:
        """Store a new tenant (created_at 0: now). ConflictError if the name is taken."""
        if tenant.created_at == 0:
            tenant = replace(tenant, created_at=self._clock.wall())
        check_tenant(tenant)
        try:
            async with self._write() as connection:
                await connection.execute(insert(tenants).values(tenant_values(tenant)))
        except IntegrityError as exc:
            raise ConflictError(f"tenant {tenant.name!r} already exists", param="name") from exc
        return tenant

    async def get_tenant(self, name: str) -> Tenant | None:
        if not valid_name(name):  # no tenant has it (and PostgreSQL refuses a NUL in text)
            return None
        async with self._read() as connection:
            row = (await connection.execute(select(tenants).where(tenants.c.name == name))).first()
        return None if row is None else tenant_from(row._mapping)

    async def list_tenants(self) -> list[Tenant]:
        async with self._read() as connection:
            rows = await connection.execute(select(tenants).order_by(tenants.c.name))
        return [tenant_from(row._mapping) for row in rows]

    async def update_tenant(self, name: str, changes: TenantChanges) -> Tenant:
        """The tenant with `changes` applied, read and written in one locked transaction.
        NotFoundError if there is no such tenant; InvalidRequestError for a bad value."""
        if not valid_name(name):
            raise NotFoundError(f"no tenant {name[:80]!r}", param="name")
        async with self._write() as connection:
            row = (
                await connection.execute(
                    select(tenants).where(tenants.c.name == name).with_for_update()
                )
            ).first()
            if row is None:
                raise NotFoundError(f"no tenant {name!r}", param="name")
            changed = changes.apply(tenant_from(row._mapping))
            check_tenant(changed)
            values = tenant_values(changed)
            del values["name"], values["created_at"]
            await connection.execute(update(tenants).where(tenants.c.name == name).values(values))
        return changed

    async def delete_tenant(self, name: str) -> bool:
        """Delete the tenant and its keys (its usage rows stay); False if there was none."""
        if not valid_name(name):
            return False
        async with self._write() as connection:
            await connection.execute(delete(api_keys).where(api_keys.c.tenant == name))
            result = await connection.execute(delete(tenants).where(tenants.c.name == name))
        return result.rowcount > 0

    # -- keys ---------------------------------------------------------------------------

    async def create_key(
        self,
        tenant: str,
        pepper: bytes,
        *,
        label: str | None = None,
        expires_at: float | None = None,
        limits: Limits = Limits(),  # noqa: B008 (frozen: a shared default is safe)
        now: float,
    ) -> tuple[ApiKey, str]:
        """A new key of `tenant`: the stored key (its digest) and the token, to show once.
        NotFoundError if there is no such tenant."""
        if not valid_name(tenant):
            raise NotFoundError(f"no tenant {tenant[:80]!r}", param="tenant")
        check_label(label)
        check_limits(limits)
        _check_expiry(expires_at, now)
        async with self._write() as connection:
            return await self._insert_key(
                connection, tenant, pepper, label, expires_at, limits, now
            )

    async def _insert_key(
        self,
        connection: AsyncConnection,
        tenant: str,
        pepper: bytes,
        label: str | None,
        expires_at: float | None,
        limits: Limits,
        now: float,
    ) -> tuple[ApiKey, str]:
        found = await connection.execute(  # FOR SHARE: a concurrent delete waits for us
            select(tenants.c.name).where(tenants.c.name == tenant).with_for_update(read=True)
        )
        if found.first() is None:
            raise NotFoundError(f"no tenant {tenant!r}", param="tenant")
        for _ in range(KEY_PREFIX_TRIES):
            issued = keys.new_key(pepper)
            taken = await connection.execute(
                select(api_keys.c.prefix).where(api_keys.c.prefix == issued.prefix)
            )
            if taken.first() is not None:
                continue
            key = ApiKey(
                prefix=issued.prefix,
                tenant=tenant,
                digest=issued.digest,
                label=label,
                limits=limits,
                created_at=now,
                expires_at=expires_at,
            )
            try:
                await connection.execute(insert(api_keys).values(key_values(key)))
            except IntegrityError as exc:  # the prefix, taken by a concurrent create
                raise ConflictError("a new key collided with another; try again") from exc
            return key, issued.token
        raise ConflictError("could not find a free key prefix; try again")

    async def get_key(self, prefix: str) -> ApiKey | None:
        if not _is_prefix(prefix):
            return None
        async with self._read() as connection:
            row = (
                await connection.execute(select(api_keys).where(api_keys.c.prefix == prefix))
            ).first()
        return None if row is None else key_from(row._mapping)

    async def find_key(self, prefix: str) -> tuple[ApiKey, Tenant] | None:
        """The key with this public prefix and its tenant (one indexed query), or None.
        Whether the key is usable, and whether the token matches, is the caller's check."""
        if not _is_prefix(prefix):
            return None
        statement = (
            select(*_KEY_COLS, *_TENANT_COLS)
            .select_from(api_keys.join(tenants, api_keys.c.tenant == tenants.c.name))
            .where(api_keys.c.prefix == prefix)
        )
        async with self._read() as connection:
            row = (await connection.execute(statement)).first()
        if row is None:
            return None
        return key_from(row._mapping, "k_"), tenant_from(row._mapping, "t_")

    async def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key, or the keys of `tenant` (none if there is no such tenant)."""
        statement = select(api_keys).order_by(
            api_keys.c.tenant, api_keys.c.created_at, api_keys.c.prefix
        )
        if tenant is not None:
            if not valid_name(tenant):
                return []
            statement = statement.where(api_keys.c.tenant == tenant)
        async with self._read() as connection:
            rows = await connection.execute(statement)
        return [key_from(row._mapping) for row in rows]

    async def rotate_key(
        self,
        prefix: str,
        pepper: bytes,
        *,
        grace_s: float,
        now: float,
        expires_at: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key for the old one's tenant, with its label and limits (and `expires_at`,
        default none); the old one stays valid until min(its expiry, now + grace_s).
        NotFoundError if there is no such key; InvalidRequestError if it is revoked or
        expired."""
        if not math.isfinite(grace_s) or grace_s < 0:
            raise InvalidRequestError(
                f"invalid grace {grace_s!r}: seconds, 0 or more", param="grace_s"
            )
        _check_expiry(expires_at, now)
        async with self._write() as connection:
            old = await self._locked_key(connection, prefix)
            if not old.usable(now):
                raise InvalidRequestError(
                    f"key {prefix} is {'revoked' if old.revoked_at is not None else 'expired'}"
                    "; create a new one instead",
                    param="prefix",
                )
            deadline = now + grace_s
            if old.expires_at is None or deadline < old.expires_at:
                await connection.execute(
                    update(api_keys).where(api_keys.c.prefix == prefix).values(expires_at=deadline)
                )
            return await self._insert_key(
                connection, old.tenant, pepper, old.label, expires_at, old.limits, now
            )

    async def revoke_key(self, prefix: str, *, now: float) -> ApiKey:
        """The key, revoked from `now` on (an earlier revocation stands). NotFoundError if
        there is no such key."""
        async with self._write() as connection:
            key = await self._locked_key(connection, prefix)
            if key.revoked_at is None or key.revoked_at > now:
                key = replace(key, revoked_at=now)
                await connection.execute(
                    update(api_keys).where(api_keys.c.prefix == prefix).values(revoked_at=now)
                )
        return key

    async def _locked_key(self, connection: AsyncConnection, prefix: str) -> ApiKey:
        if not _is_prefix(prefix):
            raise NotFoundError(f"no key {prefix[:80]!r}", param="prefix")
        row = (
            await connection.execute(
                select(api_keys).where(api_keys.c.prefix == prefix).with_for_update()
            )
        ).first()
        if row is None:
            raise NotFoundError(f"no key {prefix!r}", param="prefix")
        return key_from(row._mapping)

    # -- usage --------------------------------------------------------------------------

    async def insert_usage(self, rows: Sequence[UsageRow]) -> int:
        """Append usage rows in one statement; rows whose request_id is already stored are
        skipped. The number of rows newly written."""
        if not rows:
            return 0
        # On the ledger's hot path (a batch every 250 ms at any load): one precompiled
        # statement with plain tuples, not a Core insert (its per-row parameter processing
        # cost more CPU than the rest of the gateway's accounting; benchmarks/tenancy_cpu.py).
        values = [usage_tuple(row) for row in rows]
        async with self._write() as connection:
            if self.dialect == "postgresql":  # one statement over arrays: asyncpg's
                # executemany tells no counts, and this is one round trip for the batch
                columns = list(zip(*values, strict=True))
                result = await connection.exec_driver_sql(_PG_INSERT_USAGE, tuple(columns))
                return len(result.all())
            result = await connection.exec_driver_sql(_SQLITE_INSERT_USAGE, values)
            return int(result.rowcount)  # sqlite3 sums an executemany's changes

    async def usage(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        tenant: str | None = None,
        by: UsageGroupBy = "tenant",
    ) -> list[UsageGroup]:
        """Totals of the rows started in [since, until), grouped `by` tenant, key, model or
        UTC day, in the order of the groups' names."""
        if tenant is not None and not valid_name(tenant):
            return []
        async with self._read() as connection:
            return await usage_groups(connection, since=since, until=until, tenant=tenant, by=by)

    async def usage_rows(
        self, *, since: float | None = None, tenant: str | None = None, limit: int | None = None
    ) -> list[UsageRow]:
        """Rows started at `since` or later, oldest first (for exports and tests)."""
        if tenant is not None and not valid_name(tenant):
            return []
        async with self._read() as connection:
            return await usage_rows(connection, since=since, tenant=tenant, limit=limit)

    async def spend_micro_usd(self, tenant: str, since: float | None) -> int:
        """What the tenant's requests started at `since` or later cost (None: all time)."""
        if not valid_name(tenant):
            return 0
        async with self._read() as connection:
            return await spend(connection, tenant, since)

    # -- transactions -------------------------------------------------------------------

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        with self._unavailable():
            async with self._engine.connect() as connection:
                yield connection

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction that commits at the end, begun with the write lock
        on SQLite (`BEGIN IMMEDIATE`)."""
        if self._write_lock is None:
            with self._unavailable():
                async with self._engine.begin() as connection:
                    yield connection
            return
        async with self._write_lock:
            with self._unavailable():
                async with self._engine.connect() as connection:
                    writer = await connection.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})
                    async with writer.begin():
                        yield writer

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """Turn a lost or unreachable database into ServiceUnavailableError (503)."""
        try:
            yield
        except (IntegrityError, DataError, ProgrammingError):
            raise  # what was asked, not the database's state: the caller's to handle
        except (DBAPIError, OSError, TimeoutError, PoolTimeoutError) as exc:
            raise self._unavailable_error(exc) from exc

    def _unavailable_error(self, exc: BaseException) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"the database {self.url_display} is unavailable: {error_reason(self._url, exc)}"
        )


def _is_prefix(prefix: str) -> bool:
    return len(prefix) == keys.PREFIX_LEN and prefix.isascii() and prefix.isalnum()


def _check_expiry(expires_at: float | None, now: float) -> None:
    if expires_at is None:
        return
    if not math.isfinite(expires_at) or expires_at <= now:
        raise InvalidRequestError(
            "invalid expiry: a time after now (Unix seconds)", param="expires_at"
        )
