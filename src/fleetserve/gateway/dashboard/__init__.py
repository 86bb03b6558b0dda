"""The gateway's live page, `GET /dashboard`: its data (live.py), request trail (trail.py),
history (history.py), routes and the page itself (page.html, package data)."""

from fleetserve.gateway.dashboard.live import Dashboard
from fleetserve.gateway.dashboard.routes import dashboard_routes
from fleetserve.gateway.dashboard.trail import RequestTrail

__all__ = ["Dashboard", "RequestTrail", "dashboard_routes"]
