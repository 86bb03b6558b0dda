"""`fleetserve tenants`, `fleetserve keys` and `fleetserve usage`: tenancy administration,
against the database (default) or a running gateway (`--url ... --admin-key ...`)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import typer
from rich.console import Console
from rich.table import Table

from fleetserve.cli.admin_client import AdminBackend, admin_backend
from fleetserve.cli.common import USAGE_EXIT, admin_key_option, err_console, fail
from fleetserve.errors import FleetserveError, InvalidRequestError
from fleetserve.tenancy.durations import parse_duration
from fleetserve.tenancy.model import USAGE_GROUPS

R = TypeVar("R")
out = Console(highlight=False, soft_wrap=True)

tenants_app = typer.Typer(
    help="Tenants (teams): limits, budget, fair share, allowed models.\n\n"
    "Example: fleetserve tenants create research --rpm 600 --tpm 200000 --budget-usd 50 "
    "--budget-period day --priority interactive",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="API keys of tenants (`fs-<prefix>-<secret>`, shown once).\n\n"
    "Example: fleetserve keys create --tenant research --label ci --expires 30d",
    no_args_is_help=True,
)

URL = typer.Option(None, "--url", help="A running gateway's base URL: use its admin API.")
ADMIN_KEY = admin_key_option("of the gateway at --url")
DATABASE = typer.Option(
    None,
    "--database-url",
    help="The tenant database (FLEETSERVE_DATABASE_URL; default: SQLite in the state dir).",
    envvar="FLEETSERVE_DATABASE_URL",
    show_envvar=False,
)
JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")
Connect = tuple[str | None, str | None, str | None]


def _run(connect: Connect, work: Callable[[AdminBackend], Awaitable[R]]) -> R:
    """Run one operation against the chosen backend; fleetserve errors are one line
    (a bad value: exit 2)."""

    async def main() -> R:
        async with admin_backend(*connect) as backend:
            return await work(backend)

    try:
        return asyncio.run(main())
    except InvalidRequestError as exc:
        fail(str(exc), USAGE_EXIT)
    except FleetserveError as exc:
        fail(str(exc))


def _connect(url: str | None, admin_key: str | None, database_url: str | None) -> Connect:
    if url is not None and database_url is not None:
        fail("give --url (a gateway) or --database-url (the database), not both", USAGE_EXIT)
    key = admin_key or os.environ.get("FLEETSERVE_ADMIN_KEY") or None
    return url, key, database_url


def _print(data: object, as_json: bool, table: Callable[[Any], Table] | None = None) -> None:
    if as_json or table is None:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    out.print(table(data))


def _when(ts: object) -> str:
    if not isinstance(ts, int | float) or not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _tenants_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("tenant", "priority", "weight", "rpm", "tpm", "conc.", "budget", "models")
    for t in rows:
        budget = t["budget"]
        money = "-" if budget is None else f"${budget['usd']:g}/{budget['period']}"
        models = "all" if t["models"] is None else ",".join(t["models"])
        table.add_row(
            t["name"], t["priority"], f"{t['weight']:g}", _dash(t["rpm"]), _dash(t["tpm"]),
            _dash(t["max_concurrent"]), money, models,
        )  # fmt: skip
    return table


def _keys_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("key", "tenant", "label", "state", "created", "expires", "limits")
    for k in rows:
        limits = ", ".join(
            f"{name} {k[name]}" for name in ("rpm", "tpm", "max_concurrent") if k[name]
        )
        table.add_row(
            k["id"], k["tenant"], _dash(k["label"]), k["state"], _when(k["created_at"]),
            _when(k["expires_at"]), limits or "-",
        )  # fmt: skip
    return table


def _one(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [row]


def _tenant_body(
    rpm: str | None, tpm: str | None, max_concurrent: str | None, budget_usd: str | None,
    budget_period: str | None, weight: float | None, priority: str | None, models: str | None,
    soft_alert: float | None,
) -> dict[str, object]:  # fmt: skip
    """The options given, as the admin API's fields; `none` clears a limit (update)."""
    body: dict[str, object] = {}
    for name, value in (
        ("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent),
        ("budget_usd", budget_usd),
    ):  # fmt: skip
        if value is None:
            continue
        if value.lower() == "none":
            body[name] = None
            continue
        try:
            body[name] = float(value) if name == "budget_usd" else int(value)
        except ValueError:
            flag = "--" + name.replace("_", "-")
            fail(f"{flag}: expected a number or `none`, not {value!r}", USAGE_EXIT)
    if budget_period is not None:
        body["budget_period"] = budget_period
    if weight is not None:
        body["weight"] = weight
    if priority is not None:
        body["priority"] = priority
    if soft_alert is not None:
        body["soft_alert_frac"] = soft_alert
    if models is not None:
        body["models"] = None if models in ("", "all") else [m for m in models.split(",") if m]
    return body


RPM = typer.Option(None, "--rpm", help="Requests per rolling minute (`none`: no limit).")
TPM = typer.Option(None, "--tpm", help="Input + output tokens per rolling minute.")
CONC = typer.Option(None, "--max-concurrent", help="Requests in flight at once.")
BUDGET = typer.Option(None, "--budget-usd", help="USD per budget period (`none`: no budget).")
PERIOD = typer.Option(None, "--budget-period", help="day, week, month (default) or total.")
WEIGHT = typer.Option(None, "--weight", help="Fair share under saturation (default 1).")
PRIORITY = typer.Option(None, "--priority", help="interactive, standard (default) or batch.")
MODELS = typer.Option(None, "--models", help="Models it may use, comma-separated (default all).")
SOFT = typer.Option(None, "--soft-alert", help="Fraction of the budget that warns (0.8).")


@tenants_app.command("create")
def tenants_create(
    name: str = typer.Argument(..., help="Tenant name: letters, digits, . _ -"),
    rpm: str | None = RPM, tpm: str | None = TPM, max_concurrent: str | None = CONC,
    budget_usd: str | None = BUDGET, budget_period: str | None = PERIOD,
    weight: float | None = WEIGHT, priority: str | None = PRIORITY, models: str | None = MODELS,
    soft_alert: float | None = SOFT,
    url: str | None = URL, admin_key: str | None = ADMIN_KEY, database_url: str | None = DATABASE,
    as_json: bool = JSON,
) -> None:  # fmt: skip
    """Create a tenant. Example: fleetserve tenants create research --rpm 600 --budget-usd 50"""
    body = {"name": name} | _tenant_body(
        rpm, tpm, max_concurrent, budget_usd, budget_period, weight, priority, models, soft_alert
    )
    row = _run(_connect(url, admin_key, database_url), lambda b: b.create_tenant(body))
    _print(_one(row), as_json, _tenants_table)


@tenants_app.command("list")
def tenants_list(
    url: str | None = URL, admin_key: str | None = ADMIN_KEY, database_url: str | None = DATABASE,
    as_json: bool = JSON,
) -> None:  # fmt: skip
    """List tenants. Example: fleetserve tenants list --json"""
    rows = _run(_connect(url, admin_key, database_url), lambda b: b.list_tenants())
    _print(rows, as_json, _tenants_table)


@tenants_app.command("show")
def tenants_show(
    name: str = typer.Argument(...),
    url: str | None = URL, admin_key: str | None = ADMIN_KEY, database_url: str | None = DATABASE,
) -> None:  # fmt: skip
    """Show one tenant as JSON. Example: fleetserve tenants show research"""
    _print(_run(_connect(url, admin_key, database_url), lambda b: b.get_tenant(name)), True)


@tenants_app.command("update")
def tenants_update(
    name: str = typer.Argument(...),
    rpm: str | None = RPM, tpm: str | None = TPM, max_concurrent: str | None = CONC,
    budget_usd: str | None = BUDGET, budget_period: str | None = PERIOD,
    weight: float | None = WEIGHT, priority: str | None = PRIORITY, models: str | None = MODELS,
    soft_alert: float | None = SOFT,
    url: str | None = URL, admin_key: str | None = ADMIN_KEY, database_url: str | None = DATABASE,
    as_json: bool = JSON,
) -> None:  # fmt: skip
    """Change the options given (`none` clears a limit). Example:
    fleetserve tenants update research --rpm none --weight 2"""
    body = _tenant_body(
        rpm, tpm, max_concurrent, budget_usd, budget_period, weight, priority, models, soft_alert
    )
    if not body:
        fail("nothing to change: give at least one option (see --help)", USAGE_EXIT)
    row = _run(_connect(url, admin_key, database_url), lambda b: b.update_tenant(name, body))
    _print(_one(row), as_json, _tenants_table)


@tenants_app.command("delete")
def tenants_delete(
    name: str = typer.Argument(...),
    url: str | None = URL, admin_key: str | None = ADMIN_KEY, database_url: str | None = DATABASE,
) -> None:  # fmt: skip
    """Delete a tenant and its keys (its usage stays). Example: fleetserve tenants delete old"""
    row = _run(_connect(url, admin_key, database_url), lambda b: b.delete_tenant(name))
    err_console.print(f"deleted tenant {name!r} and {row['keys_deleted']} key(s)")


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="The tenant the key belongs to."),
    label: str | None = typer.Option(None, "--label", help="A note: who or what uses it."),
    expires: str | None = typer.Option(None, "--expires", help="Lifetime: 90d, 12h, 2w..."),
    rpm: int | None = typer.Option(None, "--rpm", help="A tighter RPM of its own."),
    tpm: int | None = typer.Option(None, "--tpm", help="A tighter TPM of its own."),
    max_concurrent: int | None = typer.Option(None, "--max-concurrent"),
    url: str | None = URL, admin_key: str | None = ADMIN_KEY, database_url: str | None = DATABASE,
    as_json: bool = JSON,
) -> None:  # fmt: skip
    """Create a key and print it, once. Example: fleetserve keys create --tenant research"""
    body: dict[str, object] = {"tenant": tenant, "label": label}
    for field, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
        if value is not None:
            body[field] = value
    if expires is not None:
        body["expires_in_s"] = _duration(expires, "--expires")
    row = _run(_connect(url, admin_key, database_url), lambda b: b.create_key(body))
    _show_new_key(row, as_json)


def _show_new_key(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print(row, True)
        return
    sys.stdout.write(row["key"] + "\n")  # stdout: the key alone, for scripts
    err_console.print(
        f"key {row['id']} of tenant {row['tenant']!r}: shown once, store it now "
        "(only its HMAC is kept)"
    )


@keys_app.command("list")
def keys_list(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's keys."),
    url: str | None = URL, admin_key: str | None = ADMIN_KEY, database_url: str | None = DATABASE,
    as_json: bool = JSON,
) -> None:  # fmt: skip
    """List keys (never their secrets). Example: fleetserve keys list --tenant research"""
    rows = _run(_connect(url, admin_key, database_url), lambda b: b.list_keys(tenant))
    _print(rows, as_json, _keys_table)


@keys_app.command("rotate")
def keys_rotate(
    key: str = typer.Argument(..., help="The key's id (fs-PREFIX) or prefix."),
    grace: str = typer.Option("1h", "--grace", help="How long the old key stays valid."),
    url: str | None = URL, admin_key: str | None = ADMIN_KEY, database_url: str | None = DATABASE,
    as_json: bool = JSON,
) -> None:  # fmt: skip
    """A new key for the same tenant; the old one works until the grace ends. Example:
    fleetserve keys rotate fs-Ab3dE5gH --grace 24h"""
    body = {"grace_s": _duration(grace, "--grace")} if grace != "0" else {"grace_s": 0}
    row = _run(_connect(url, admin_key, database_url), lambda b: b.rotate_key(key, body))
    _show_new_key(row, as_json)


@keys_app.command("revoke")
def keys_revoke(
    key: str = typer.Argument(..., help="The key's id (fs-PREFIX) or prefix."),
    url: str | None = URL, admin_key: str | None = ADMIN_KEY, database_url: str | None = DATABASE,
) -> None:  # fmt: skip
    """Revoke a key now, on every gateway within 1 s. Example: fleetserve keys revoke fs-Ab3dE5gH"""
    row = _run(_connect(url, admin_key, database_url), lambda b: b.revoke_key(key))
    err_console.print(f"revoked {row['id']} of tenant {row['tenant']!r}")


def usage_command(
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant."),
    since: str = typer.Option("24h", "--since", help="How far back: 1h, 24h, 30d..."),
    by: str = typer.Option("tenant", "--by", help="Group by tenant, key, model or day."),
    fmt: str = typer.Option("table", "--format", help="table, json or csv."),
    url: str | None = URL, admin_key: str | None = ADMIN_KEY, database_url: str | None = DATABASE,
) -> None:  # fmt: skip
    """Requests, tokens, cost, errors and p95 TTFT from the usage ledger. Example:
    fleetserve usage --since 7d --by day --format csv"""
    if by not in USAGE_GROUPS:
        fail(f"--by: one of {', '.join(USAGE_GROUPS)}; not {by!r}", USAGE_EXIT)
    if fmt not in ("table", "json", "csv"):
        fail(f"--format: one of table, json, csv; not {fmt!r}", USAGE_EXIT)
    since_s = _duration(since, "--since")
    rows = _run(
        _connect(url, admin_key, database_url),
        lambda b: b.usage(since_s=since_s, tenant=tenant, by=by),
    )
    if fmt == "json":
        _print(rows, True)
    elif fmt == "csv":
        buffer = io.StringIO()
        columns = ["group", "requests", "errors", "prompt_tokens", "completion_tokens",
                   "cost_usd", "ttft_p95_s"]  # fmt: skip
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buffer.getvalue())
    else:
        table = Table(by, "requests", "errors", "tokens in", "tokens out", "cost", "TTFT p95")
        for r in rows:
            ttft = "-" if r["ttft_p95_s"] is None else f"{r['ttft_p95_s'] * 1000:.0f} ms"
            table.add_row(
                str(r["group"]), f"{r['requests']:,}", f"{r['errors']:,}",
                f"{r['prompt_tokens']:,}", f"{r['completion_tokens']:,}",
                f"${r['cost_usd']:,.4f}", ttft,
            )  # fmt: skip
        out.print(table)


def _duration(text: str, flag: str) -> float:
    try:
        return parse_duration(text, flag)
    except InvalidRequestError as exc:
        fail(str(exc), USAGE_EXIT)
