"""Where the tenancy CLI sends its operations: the database directly, or a running gateway's
admin API (`--url`). Both answer the same JSON (tenancy/admin.py), so the commands print the
same either way."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import orjson

from fleetserve.clock import RealClock
from fleetserve.config import default_state_dir
from fleetserve.errors import (
    ApiError,
    AuthenticationError,
    ConfigError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from fleetserve.tenancy.keys import load_pepper
from fleetserve.tenancy.model import UsageGroupBy

REQUEST_TIMEOUT_S = 30.0
Json = dict[str, Any]


class AdminBackend(Protocol):
    async def create_tenant(self, body: object) -> Json: ...
    async def list_tenants(self) -> list[Json]: ...
    async def get_tenant(self, name: str) -> Json: ...
    async def update_tenant(self, name: str, body: object) -> Json: ...
    async def delete_tenant(self, name: str) -> Json: ...
    async def create_key(self, body: object) -> Json: ...
    async def list_keys(self, tenant: str | None = None) -> list[Json]: ...
    async def rotate_key(self, prefix: str, body: object) -> Json: ...
    async def revoke_key(self, prefix: str) -> Json: ...
    async def usage(
        self,
        *,
        since_s: float | None = None,
        tenant: str | None = None,
        by: UsageGroupBy = "tenant",
    ) -> list[Json]: ...


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    503: ServiceUnavailableError,
}


class HttpAdmin:
    """The admin API of a gateway at `url`, with its admin key."""

    def __init__(self, session: aiohttp.ClientSession, url: str, admin_key: str | None) -> None:
        self._session = session
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}

    async def _call(self, method: str, path: str, body: object = None, **query: str | None) -> Any:
        data = None if body is None else orjson.dumps(body)
        params = {k: v for k, v in query.items() if v is not None}
        try:
            async with self._session.request(
                method, self._url + path, data=data, params=params, headers=self._headers
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the gateway at {self._url}: {exc}") from None
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if status >= 400:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            message = error.get("message") or raw.decode(errors="replace")[:200]
            kind = _BY_STATUS.get(status, ApiError)
            raise kind(f"{self._url}: {message}")
        return answer

    async def create_tenant(self, body: object) -> Json:
        return await self._call("POST", "/admin/tenants", body)  # type: ignore[no-any-return]

    async def list_tenants(self) -> list[Json]:
        return (await self._call("GET", "/admin/tenants"))["data"]  # type: ignore[no-any-return]

    async def get_tenant(self, name: str) -> Json:
        return await self._call("GET", f"/admin/tenants/{quote(name, safe='')}")  # type: ignore[no-any-return]

    async def update_tenant(self, name: str, body: object) -> Json:
        return await self._call("PATCH", f"/admin/tenants/{quote(name, safe='')}", body)  # type: ignore[no-any-return]

    async def delete_tenant(self, name: str) -> Json:
        return await self._call("DELETE", f"/admin/tenants/{quote(name, safe='')}")  # type: ignore[no-any-return]

    async def create_key(self, body: object) -> Json:
        return await self._call("POST", "/admin/keys", body)  # type: ignore[no-any-return]

    async def list_keys(self, tenant: str | None = None) -> list[Json]:
        return (await self._call("GET", "/admin/keys", tenant=tenant))["data"]  # type: ignore[no-any-return]

    async def rotate_key(self, prefix: str, body: object) -> Json:
        return await self._call("POST", f"/admin/keys/{quote(prefix, safe='')}/rotate", body)  # type: ignore[no-any-return]

    async def revoke_key(self, prefix: str) -> Json:
        return await self._call("POST", f"/admin/keys/{quote(prefix, safe='')}/revoke")  # type: ignore[no-any-return]

    async def usage(
        self,
        *,
        since_s: float | None = None,
        tenant: str | None = None,
        by: UsageGroupBy = "tenant",
    ) -> list[Json]:
        since = None if since_s is None else f"{since_s:g}s"
        answer = await self._call("GET", "/admin/usage", since=since, tenant=tenant, by=by)
        return answer["data"]  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def admin_backend(
    url: str | None, admin_key: str | None, database_url: str | None
) -> AsyncIterator[AdminBackend]:
    """The gateway at `url` if given, else the database (`database_url`, else
    FLEETSERVE_DATABASE_URL, else SQLite in the state directory)."""
    if url is not None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            yield HttpAdmin(session, url, admin_key)
        return
    from fleetserve.tenancy.admin import TenancyAdmin  # noqa: PLC0415 - SQLAlchemy loads here
    from fleetserve.tenancy.store import TenancyStore  # noqa: PLC0415

    state_dir: Path = default_state_dir()
    database = database_url or os.environ.get("FLEETSERVE_DATABASE_URL") or None
    pepper = load_pepper(state_dir, os.environ.get("FLEETSERVE_KEY_PEPPER") or None)
    store = await TenancyStore.open(database, state_dir)
    try:
        yield TenancyAdmin(store, pepper, RealClock())
    finally:
        await store.close()


DEFAULT_TENANT = "default"


async def ensure_default_key(database_url: str | None, pepper_env: str | None) -> str | None:
    """`up --auth keys` on first run: a tenant `default` and a key of it, the key returned to
    print once. None when the tenant exists already (its keys were shown when made)."""
    from fleetserve.tenancy.admin import TenancyAdmin  # noqa: PLC0415 - SQLAlchemy loads here
    from fleetserve.tenancy.store import TenancyStore  # noqa: PLC0415

    state_dir = default_state_dir()
    pepper = load_pepper(state_dir, pepper_env)
    store = await TenancyStore.open(database_url, state_dir)
    try:
        if await store.get_tenant(DEFAULT_TENANT) is not None:
            return None
        admin = TenancyAdmin(store, pepper, RealClock())
        await admin.create_tenant({"name": DEFAULT_TENANT})
        created = await admin.create_key({"tenant": DEFAULT_TENANT, "label": "fleetserve up"})
        return str(created["key"])
    finally:
        await store.close()
