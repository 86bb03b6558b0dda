"""The tenancy admin API, behind the admin key (auth = keys):

    GET|POST /admin/tenants                  list / create
    GET|PATCH|DELETE /admin/tenants/{name}   read / update (the fields given) / delete
    GET /admin/tenants/{name}/limits         the live limit state (counters used and limits)
    GET|POST /admin/keys[?tenant=T]          list / create (the answer holds the key, once)
    POST /admin/keys/{id}/rotate             {"grace_s": 3600}: a new key; the old one lasts
    POST /admin/keys/{id}/revoke             on every gateway replica within 1 s
    GET /admin/usage?since=24h&tenant=T&by=tenant|key|model|day

Errors are OpenAI-style: 400 for bad fields (named), 404, 409 for a name taken.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleetserve.errors import ApiError, InvalidRequestError, NotFoundError, ServiceUnavailableError
from fleetserve.gateway.responses import error_response, json_response
from fleetserve.tenancy.durations import parse_duration
from fleetserve.tenancy.model import USAGE_GROUPS, Principal

if TYPE_CHECKING:  # the store (SQLAlchemy) loads only where tenancy runs
    from fleetserve.tenancy.admin import TenancyAdmin

AdminCheck = Callable[[Request], Response | None]
"""The admin-key check of the cold routes: None when the request may pass."""


class TenancyApi(Protocol):
    """What the routes need from the running tenancy parts (present once the store is open)."""

    @property
    def admin(self) -> TenancyAdmin | None: ...

    async def limit_state(self, principal: Principal) -> dict[str, object]: ...


async def _body(request: Request) -> object:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None


Handler = Callable[[Request, "TenancyAdmin"], Awaitable[Response]]


def tenancy_routes(api: TenancyApi, denied: AdminCheck) -> list[Route]:
    def guarded(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if refusal := denied(request):
                return refusal
            admin = api.admin
            if admin is None:
                return error_response(ServiceUnavailableError("the tenant store is not open yet"))
            try:
                return await handler(request, admin)
            except ApiError as err:
                return error_response(err)

        return endpoint

    async def tenants(request: Request, admin: TenancyAdmin) -> Response:
        if request.method == "POST":
            return json_response(await admin.create_tenant(await _body(request)), 201)
        return json_response({"data": await admin.list_tenants()})

    async def tenant(request: Request, admin: TenancyAdmin) -> Response:
        name = request.path_params["name"]
        if request.method == "PATCH":
            return json_response(await admin.update_tenant(name, await _body(request)))
        if request.method == "DELETE":
            return json_response(await admin.delete_tenant(name))
        return json_response(await admin.get_tenant(name))

    async def limits(request: Request, admin: TenancyAdmin) -> Response:
        name = request.path_params["name"]
        found = await admin.store.get_tenant(name)
        if found is None:
            raise NotFoundError(f"no tenant {name!r}", param="name")
        keys = await admin.store.list_keys(name)
        states = {}
        for key in keys or []:
            states[f"fs-{key.prefix}"] = await api.limit_state(Principal(found, key))
        return json_response({"tenant": name, "keys": states})

    async def keys(request: Request, admin: TenancyAdmin) -> Response:
        if request.method == "POST":
            return json_response(await admin.create_key(await _body(request)), 201)
        return json_response({"data": await admin.list_keys(request.query_params.get("tenant"))})

    async def rotate(request: Request, admin: TenancyAdmin) -> Response:
        return json_response(
            await admin.rotate_key(request.path_params["key"], await _body(request)), 201
        )

    async def revoke(request: Request, admin: TenancyAdmin) -> Response:
        return json_response(await admin.revoke_key(request.path_params["key"]))

    async def usage(request: Request, admin: TenancyAdmin) -> Response:
        query = request.query_params
        by = query.get("by", "tenant")
        if by not in USAGE_GROUPS:
            raise InvalidRequestError(
                f"by: one of {', '.join(USAGE_GROUPS)}, not {by!r}", param="by"
            )
        since = query.get("since")
        since_s = None if since is None else parse_duration(since, "since")
        data = await admin.usage(since_s=since_s, tenant=query.get("tenant"), by=by)
        return json_response({"by": by, "data": data})

    return [
        Route("/admin/tenants", guarded(tenants), methods=["GET", "POST"]),
        Route("/admin/tenants/{name}/limits", guarded(limits), methods=["GET"]),
        Route("/admin/tenants/{name}", guarded(tenant), methods=["GET", "PATCH", "DELETE"]),
        Route("/admin/keys", guarded(keys), methods=["GET", "POST"]),
        Route("/admin/keys/{key}/rotate", guarded(rotate), methods=["POST"]),
        Route("/admin/keys/{key}/revoke", guarded(revoke), methods=["POST"]),
        Route("/admin/usage", guarded(usage), methods=["GET"]),
    ]
