"""`fleetserve status`: replicas, their states and load, and the autoscaler's last decisions."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.segment import Segment, Segments
from rich.table import Table
from rich.text import Text

from fleetserve.cli.common import (
    admin_key_file_option,
    admin_key_option,
    clear_errors,
    settings_from,
)
from fleetserve.errors import ConfigError

TIMEOUT_S = 5.0
WIDE_MAX = 400  # columns the wide view may take before reasons wrap


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
            raise ConfigError(
                f"{url} needs the admin key (--admin-key-file, --admin-key or FLEETSERVE_ADMIN_KEY)"
            ) from exc
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


def _for(value: object) -> str:
    """A duration in a few characters: 42s, 17m, 3.5h."""
    if not isinstance(value, int | float):
        return "-"
    if value < 60:
        return f"{value:.0f}s"
    if value < 3600:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.1f}h"


def _clipped(text: str | Text) -> Text:
    """Text that ends in an ellipsis where its column is too narrow, instead of wrapping."""
    clipped = text.copy() if isinstance(text, Text) else Text(text)
    clipped.no_wrap, clipped.overflow = True, "ellipsis"
    return clipped


def _line(text: Text, wide: bool) -> RenderableType:
    """One line of the terminal's width, cut with an ellipsis; in full when `wide`."""
    if wide:
        return text
    grid = Table.grid()
    grid.add_column()  # a table cell honours no_wrap, a bare Text printed alone does not
    grid.add_row(_clipped(text))
    return grid


def _table() -> Table:
    """Compact: no borders, the header underlined. Columns that matter are no_wrap, so that
    only the reason gives way (cut with an ellipsis) when the terminal is narrow."""
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                 header_style="bold", padding=(0, 1))  # fmt: skip


def fleet_tables(fleet: dict[str, Any], wide: bool = False) -> list[RenderableType]:
    """One heading and table per model. The default view fits 80 columns: short replica names,
    reasons cut with an ellipsis; `wide` adds ids, URLs and health detail and wraps reasons."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for replica in fleet.get("replicas", []):
        by_model.setdefault(str(replica.get("model")), []).append(replica)
    parts: list[RenderableType] = []
    for model, replicas in by_model.items():
        states: dict[str, int] = {}
        for r in replicas:
            states[str(r.get("state"))] = states.get(str(r.get("state")), 0) + 1
        counts = ", ".join(f"{n} {state}" for state, n in states.items())
        parts.append(Text.assemble("model ", (model, "cyan"), f": {counts}"))
        parts.append(_replica_table(replicas, wide))
    return parts


def _replica_table(replicas: list[dict[str, Any]], wide: bool) -> Table:
    table = _table()
    table.add_column("replica", no_wrap=True)
    if wide:
        table.add_column("id", no_wrap=True)
        table.add_column("url", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("for", no_wrap=True, justify="right")
    numbers = ("in flight", "running", "waiting", "kv use") if wide else (
        "flight", "run", "wait", "kv")  # fmt: skip
    for column in numbers:
        table.add_column(column, no_wrap=True, justify="right")
    if wide:
        table.add_column("seen", no_wrap=True, justify="right")
        table.add_column("fails", no_wrap=True, justify="right")
    table.add_column("reason")  # the one column that gives way
    for r in replicas:
        kv = r.get("kv_usage_frac")
        name = str(r.get("name") or r.get("id"))  # gateways before `name` existed
        cells: list[RenderableType] = [name]
        if wide:
            cells += [str(r.get("id")), str(r.get("url"))]
        cells += [
            str(r.get("state")),
            f"{_num(r.get('state_for_s'))}s" if wide else _for(r.get("state_for_s")),
            _num(r.get("in_flight")),
            _num(r.get("running"), 0), _num(r.get("waiting"), 0),
            "-" if kv is None else f"{kv:.0%}",
        ]  # fmt: skip
        reason = str(r.get("reason") or "")
        if wide:
            seen = r.get("seen_s_ago")
            cells += [
                "-" if seen is None else f"{_num(seen)}s ago",
                _num(r.get("consecutive_failures")),
                reason,
            ]
        else:
            cells.append(_clipped(reason))
        table.add_row(*cells)
    return table


def autoscaler_tables(
    view: dict[str, Any], decisions: int, wide: bool = False
) -> list[RenderableType]:
    latest = view.get("latest") or {}
    actuator = view.get("actuator") or {}
    colds = actuator.get("cold_starts_s") or []
    summary = Text.assemble(
        "autoscaler for ", (str(view.get("model")), "cyan"),
        f": desired {view.get('desired')}, current {latest.get('current')}, "
        f"held {latest.get('held')}",
    )  # fmt: skip
    states = Text(
        f"ready {latest.get('ready')}, starting {latest.get('starting')}, "
        f"draining {latest.get('draining')}; peak {view.get('peak_replicas')} replicas, "
        f"{_num(view.get('replica_seconds'), 0)} replica-seconds"
    )
    parts: list[RenderableType] = [summary, _line(states, wide)]
    if colds:
        parts.append(Text(f"cold starts (s): {', '.join(f'{c:.1f}' for c in colds[-5:])}"))
    table = _table()
    for column in ("ago", "current", "desired", "direction"):
        table.add_column(column, no_wrap=True, justify="left" if column == "direction" else "right")
    table.add_column("reason")
    for entry in (view.get("changes") or [])[-decisions:]:
        reason = str(entry.get("reason"))
        table.add_row(
            _for(entry.get("at_s_ago")), _num(entry.get("current")), _num(entry.get("desired")),
            str(entry.get("direction")), reason if wide else _clipped(reason),
        )  # fmt: skip
    last = Text(f"last decision: {latest.get('reason', '-')}")
    if latest.get("error"):
        last.append(f" (error: {latest['error']})", style="red")
    heading = Text("last decisions that changed the replica count", style="bold")
    return [*parts, heading, table, _line(last, wide)]


def render_status(
    console: Console,
    fleet: dict[str, Any],
    view: dict[str, Any] | None,
    decisions: int,
    wide: bool = False,
) -> None:
    """What `status` prints: the replicas of each model, then the autoscaler, if one runs.

    The wide view is printed at its natural width (as `kubectl get -o wide`), never squeezed.
    """
    for part in fleet_tables(fleet, wide):
        _print(console, part, wide)
    held = {m: n for m, n in (fleet.get("held") or {}).items() if n}
    if held:
        console.print(f"held waiting for a replica: {held}", markup=False)
    if view is None:
        console.print("no autoscaler runs in this gateway (fixed fleet)")
        return
    for part in autoscaler_tables(view, decisions, wide):
        _print(console, part, wide)


def _print(console: Console, part: RenderableType, wide: bool) -> None:
    if not (wide and isinstance(part, Table)):
        console.print(part)
        return
    natural = Measurement.get(console, console.options.update(width=WIDE_MAX), part).maximum
    options = console.options.update(width=max(console.width, natural))
    for line in console.render_lines(part, options, pad=False):  # print clamps to the width
        console.print(Segments([*line, Segment.line()]), crop=False)


@clear_errors
def status_command(
    ctx: typer.Context,
    url: str = typer.Option("http://127.0.0.1:8000", "--url", "-u", help="The gateway."),
    autoscaler: str | None = typer.Option(
        None, help="A separate `fleetserve autoscaler` (its status port), if one runs."
    ),
    admin_key: str | None = admin_key_option("of the gateway to read"),
    admin_key_file: Path | None = admin_key_file_option(),
    decisions: int = typer.Option(10, min=1, help="How many scaling decisions to show."),
    wide: bool = typer.Option(
        False, "--wide", "-w", help="Also replica ids, URLs and health; reasons in full."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON views."),
) -> None:
    """Show the fleet's replicas and the autoscaler's latest decisions and reasons.

    The default view fits 80 columns; --wide says more.

    Example: fleetserve status --url http://127.0.0.1:8000 --wide
    """
    for base in (url, autoscaler):
        if base is not None and not base.startswith(("http://", "https://")):
            raise ConfigError(f"URL must start with http:// or https://: {base!r}")
    admin_key = settings_from(ctx, "admin_key", "admin_key_file").admin_key_value()
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
    render_status(console, fleet, view, decisions, wide)
