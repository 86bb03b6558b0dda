"""The dashboard's HTTP surface:

    GET /dashboard                 the page (one self-contained HTML file, no key needed to load)
    GET /admin/dashboard           one snapshot as JSON            (admin key, as /admin/*)
    GET /admin/dashboard/stream    snapshots as Server-Sent Events (admin key, as /admin/*)

The page holds no data: it asks for the admin key (kept in the tab's sessionStorage) when the
gateway has one, and sends it as a bearer token to the stream. Its Content-Security-Policy
lets it load nothing from anywhere, and talk only to this gateway.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fleetserve.gateway.dashboard.live import Dashboard
from fleetserve.gateway.tenancy_admin import AdminCheck

PAGE_FILE = "page.html"
AUTH_MARK = b"__FLEETSERVE_AUTH__"  # the page's data-auth: "key" or "none"
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def page_html(needs_key: bool) -> bytes:
    page = resources.files(__package__).joinpath(PAGE_FILE).read_bytes()
    return page.replace(AUTH_MARK, b"key" if needs_key else b"none")


def dashboard_routes(dashboard: Dashboard, denied: AdminCheck, needs_key: bool) -> list[Route]:
    page = page_html(needs_key)

    async def page_endpoint(_: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    async def snapshot(request: Request) -> Response:
        if refusal := denied(request):
            return refusal
        dashboard.watch()
        return Response(
            dashboard.snapshot_bytes(), media_type="application/json", headers=STREAM_HEADERS
        )

    async def stream(request: Request) -> Response:
        if refusal := denied(request):
            return refusal
        dashboard.watch()
        return StreamingResponse(
            dashboard.events(), media_type="text/event-stream", headers=STREAM_HEADERS
        )

    return [
        Route("/dashboard", page_endpoint),
        Route("/admin/dashboard", snapshot),
        Route("/admin/dashboard/stream", stream),
    ]
