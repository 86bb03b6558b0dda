"""`fleetserve status`: replicas, their states and load, and the autoscaler's last decisions."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fleetserve.cli.common import clear_errors
from fleetserve.errors import ConfigError

TIMEOUT_S = 5.0


def _get(url: str, admin_key: str | None) -> Any | None:
    """JSON from `url`; None on 404 (no such view); ConfigError when it cannot be read."""
    request = urllib.request.Request(url)  # noqa: S310 (http(s) checked by the caller)
    if admin_key:
        request.add_header("Authorization", f"Bearer {admin_key}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        if exc.code == 401:
            raise ConfigError(f"{url} needs the admin key (--admin-key)") from exc
        raise ConfigError(f"{url} answered {exc.code}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise ConfigError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from exc
    except ValueError as exc:
        raise ConfigError(f"{url} did not answer JSON") from exc


def _num(value: object, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fleet_table(fleet: dict[str, Any]) -> Table:
    table = Table(title="replicas", title_justify="left")
    for column in ("id", "model", "state", "for", "in flight", "running", "waiting", "kv use",
                   "reason"):  # fmt: skip
        table.add_column(column)
    for r in fleet.get("replicas", []):
        kv = r.get("kv_usage_frac")
        table.add_row(
            str(r.get("id")), str(r.get("model")), str(r.get("state")),
            f"{_num(r.get('state_for_s'))}s", _num(r.get("in_flight")), _num(r.get("running"), 0),
            _num(r.get("waiting"), 0), "-" if kv is None else f"{kv:.0%}", str(r.get("reason", "")),
        )  # fmt: skip
    return table


def autoscaler_tables(view: dict[str, Any], decisions: int) -> list[Table | str]:
    latest = view.get("latest") or {}
    actuator = view.get("actuator") or {}
    colds = actuator.get("cold_starts_s") or []
    summary = (
        f"autoscaler for [cyan]{view.get('model')}[/]: desired {view.get('desired')}, "
        f"current {latest.get('current')}, ready {latest.get('ready')}, "
        f"starting {latest.get('starting')}, draining {latest.get('draining')}, "
        f"held {latest.get('held')}; peak {view.get('peak_replicas')}, "
        f"{_num(view.get('replica_seconds'), 0)} replica-seconds"
    )
    if colds:
        summary += f"; cold starts (s): {', '.join(f'{c:.1f}' for c in colds[-5:])}"
    table = Table(title="last decisions that changed the replica count", title_justify="left")
    for column in ("ago", "current", "desired", "direction", "reason"):
        table.add_column(column)
    for entry in (view.get("changes") or [])[-decisions:]:
        table.add_row(
            f"{_num(entry.get('at_s_ago'))}s", _num(entry.get("current")),
            _num(entry.get("desired")), str(entry.get("direction")), str(entry.get("reason")),
        )  # fmt: skip
    last = f"last decision: {latest.get('reason', '-')}"
    if latest.get("error"):
        last += f" [red](error: {latest['error']})[/]"
    return [summary, table, last]


@clear_errors
def status_command(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", "-u", help="The gateway."),
    autoscaler: str | None = typer.Option(
        None, help="A separate `fleetserve autoscaler` (its status port), if one runs."
    ),
    admin_key: str | None = typer.Option(None, envvar="FLEETSERVE_ADMIN_KEY"),
    decisions: int = typer.Option(10, min=1, help="How many scaling decisions to show."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON views."),
) -> None:
    """Show the fleet's replicas and the autoscaler's latest decisions and reasons.

    Example: fleetserve status --url http://127.0.0.1:8000
    """
    for base in (url, autoscaler):
        if base is not None and not base.startswith(("http://", "https://")):
            raise ConfigError(f"URL must start with http:// or https://: {base!r}")
    base = url.rstrip("/")
    fleet = _get(f"{base}/admin/fleet", admin_key)
    source = (autoscaler or url).rstrip("/")
    view = _get(f"{source}/admin/autoscaler", admin_key)
    console = Console()
    if as_json:
        console.print_json(json.dumps({"fleet": fleet, "autoscaler": view}))
        return
    if fleet is None:
        raise ConfigError(f"{base} has no /admin/fleet: is it a fleetserve gateway?")
    console.print(fleet_table(fleet))
    held = {m: n for m, n in (fleet.get("held") or {}).items() if n}
    if held:
        console.print(f"held waiting for a replica: {held}")
    if view is None:
        console.print("no autoscaler runs in this gateway (fixed fleet)")
        return
    for part in autoscaler_tables(view, decisions):
        console.print(part)
