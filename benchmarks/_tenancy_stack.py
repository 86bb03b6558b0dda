"""Plumbing shared by the tenancy ledger benchmarks (`tenancy_cancel`, `tenancy_ledger`).

A gateway with `--auth keys` in front of sim engines, all real processes on 127.0.0.1 (pinned,
stopped by PID through `_harness.Processes`), a priced model in its fleet file, a tenant and a
key made through the admin API, and the usage table read straight from the database
(SQLite file or PostgreSQL), not through the gateway under test.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from benchmarks._harness import LOCALHOST, Processes, cpu_model, first_line
from fleetserve.fleet.processes import free_port
from fleetserve.testing.processes import ManagedProcess
from fleetserve.testing.stack import FAST_HEALTH_ENV

READY_TIMEOUT_S = 60.0
GATEWAY_EXIT_TIMEOUT_S = 90.0  # a drained gateway exits well within its 60 s grace
SPOOL_GLOB = "ledger-spool-*.jsonl"


@dataclass(frozen=True, slots=True)
class Pricing:
    """$ per million tokens: micro-dollars per token."""

    input_per_mtok_usd: float
    output_per_mtok_usd: float

    def cost_micro_usd(self, prompt: int, completion: int) -> int:
        """What the ledger must charge, computed here on exact fractions (rounded up)."""
        exact = prompt * Fraction(str(self.input_per_mtok_usd))
        exact += completion * Fraction(str(self.output_per_mtok_usd))
        return -(-exact.numerator // exact.denominator)


def clean_environment() -> None:
    """Drop FLEETSERVE_* settings from this process's environment: what the processes it
    starts read is what the benchmark gives them."""
    for name in [n for n in os.environ if n.upper().startswith("FLEETSERVE_")]:
        del os.environ[name]


def machine_line() -> str:
    cpu = cpu_model()
    load1, _, _ = os.getloadavg()
    commit = first_line(["git", "rev-parse", "--short", "HEAD"])
    return (
        f"machine : {os.cpu_count()} cores ({cpu}), load average {load1:.2f} at start; "
        f"commit {commit}; python {sys.version.split()[0]}"
    )


# --- the stack ---------------------------------------------------------------------------


@dataclass
class StackSpec:
    model: str
    pricing: Pricing
    profile: str  # of the sim engines
    engines: int
    workers: int  # gateway worker processes
    state_dir: Path
    gateway_core: int | None
    engine_core: int | None
    database_url: str | None = None  # None: SQLite in the state directory
    gateway_env: dict[str, str] = field(default_factory=dict)
    picker: str = "round_robin"


class TenancyStack:
    """Sim engines and a keys-auth gateway over them; the gateway can be signalled, waited for
    and started again on the same port (the same state directory and database)."""

    def __init__(self, procs: Processes, spec: StackSpec) -> None:
        self.procs = procs
        self.spec = spec
        self.engine_urls: list[str] = []
        self.port = free_port()
        self.gateway: ManagedProcess | None = None
        self._starts = 0
        self.fleet_file = spec.state_dir / "fleet.yaml"

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def start_engines(self) -> None:
        spec = self.spec
        started = []
        for i in range(spec.engines):
            port = free_port()
            argv = [
                sys.executable, "-m", "fleetserve", "engine", "sim", "--port", str(port),
                "--model", spec.model, "--profile", spec.profile, "--cold-start-s", "0",
            ]  # fmt: skip
            started.append((self.procs.start(f"engine{i}", argv, spec.engine_core), port))
        for proc, port in started:
            url = f"http://{LOCALHOST}:{port}"
            proc.wait_ready(url + "/health", READY_TIMEOUT_S)
            self.engine_urls.append(url)
        replicas = ", ".join(self.engine_urls)
        price = spec.pricing
        self.fleet_file.write_text(
            f"models:\n  - name: {spec.model}\n    engine: sim\n    replicas: [{replicas}]\n"
            f"    pricing: {{input_per_mtok_usd: {price.input_per_mtok_usd}, "
            f"output_per_mtok_usd: {price.output_per_mtok_usd}}}\n"
        )

    def gateway_env(self) -> dict[str, str]:
        env = {**FAST_HEALTH_ENV, "FLEETSERVE_STATE_DIR": str(self.spec.state_dir)}
        if self.spec.database_url is not None:
            env["FLEETSERVE_DATABASE_URL"] = self.spec.database_url
        return {**env, **self.spec.gateway_env}

    def start_gateway(self) -> ManagedProcess:
        """Start the gateway (again) on its port, without waiting for it."""
        spec = self.spec
        argv = [sys.executable, "-m", "fleetserve", "gateway", "--port", str(self.port),
                "--fleet-file", str(self.fleet_file), "--auth", "keys",
                "--workers", str(spec.workers), "--picker", spec.picker]  # fmt: skip
        name = "gateway" if self._starts == 0 else f"gateway-{self._starts + 1}"
        self._starts += 1
        self.gateway = self.procs.start(name, argv, spec.gateway_core, self.gateway_env())
        return self.gateway

    def wait_gateway(self) -> float:
        """Block until the gateway is ready; seconds waited."""
        assert self.gateway is not None
        return self.gateway.wait_ready(self.url + "/ready", READY_TIMEOUT_S)

    async def wait_gateway_async(self) -> None:
        assert self.gateway is not None
        await self.gateway.wait_http_ok(self.url + "/ready", READY_TIMEOUT_S)

    def admin(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=orjson.dumps(body), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = orjson.loads(response.read())
        return answer

    def new_key(self, tenant: str) -> str:
        """A tenant without limits and a key of it (the key is kept in memory only)."""
        self.admin("/admin/tenants", {"name": tenant})
        key: str = self.admin("/admin/keys", {"tenant": tenant, "label": "bench"})["key"]
        return key

    def gateway_log(self) -> str:
        """Every gateway process's log so far, oldest first."""
        logs = sorted(self.procs.log_dir.glob("gateway*.log"), key=lambda p: p.stat().st_mtime)
        return "\n".join(path.read_text(errors="replace") for path in logs)


def spool_rows(state_dir: Path) -> tuple[int, int]:
    """(spool files, rows in them) in the state directory now: one JSON line per row."""
    files = list(state_dir.glob(SPOOL_GLOB))
    rows = 0
    for path in files:
        try:
            rows += path.read_bytes().count(b"\n")
        except FileNotFoundError:  # replayed and removed meanwhile
            continue
    return len(files), rows


def spool_ids(state_dir: Path) -> set[str]:
    """The request ids of the rows in the spool files now (a torn last line is skipped)."""
    ids: set[str] = set()
    for path in state_dir.glob(SPOOL_GLOB):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        for line in data.splitlines():
            try:
                ids.add(str(orjson.loads(line)["request_id"]))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
    return ids


def scrape_metric(url: str, prefix: str) -> dict[str, float]:
    """The samples of /metrics whose name starts with `prefix` (sample line -> value)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


BACK_LINE = re.compile(r"the database is back after ([\d.]+) s; (\d+) rows were spooled meanwhile")
DOWN_LINE = re.compile(r"usage ledger: the database is unreachable \(([^)]*)")


def outages_in_log(text: str) -> tuple[list[str], list[tuple[float, int]]]:
    """The ledger's own account in the gateway log: its down reasons, and per recovery the
    outage it saw (s) and the rows it spooled meanwhile."""
    downs = DOWN_LINE.findall(text)
    backs = [(float(s), int(n)) for s, n in BACK_LINE.findall(text)]
    return downs, backs


# --- the usage table, read directly --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerRow:
    request_id: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int
    finish_reason: str
    usage_estimated: bool
    ended_at: float  # wall clock (Unix seconds) when the gateway finished the request


_COLUMNS = (
    "request_id, status, prompt_tokens, completion_tokens, cost_micro_usd, finish_reason, "
    "usage_estimated, ended_at"
)


class UsageTable:
    """The usage table of one database: SQLite (a file) or PostgreSQL (an asyncpg URL)."""

    def __init__(self, *, sqlite_path: Path | None = None, postgres_url: str | None = None) -> None:
        if (sqlite_path is None) == (postgres_url is None):
            raise ValueError("one of sqlite_path and postgres_url")
        self.sqlite_path = sqlite_path
        self.postgres_url = postgres_url

    async def count(self, tenant: str) -> tuple[int, int]:
        """(rows, distinct request ids) of `tenant`."""
        sql = "SELECT count(*), count(DISTINCT request_id) FROM usage WHERE tenant = "
        rows = await self._query(sql + self._param(), tenant)
        total, distinct = rows[0]
        return int(total), int(distinct)

    async def rows(self, tenant: str) -> list[LedgerRow]:
        sql = f"SELECT {_COLUMNS} FROM usage WHERE tenant = {self._param()}"
        # fmt: off
        return [
            LedgerRow(str(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4]), str(r[5]),
                      bool(r[6]), float(r[7]))
            for r in await self._query(sql, tenant)
        ]
        # fmt: on

    async def ids(self, tenant: str) -> list[str]:
        sql = f"SELECT request_id FROM usage WHERE tenant = {self._param()}"
        return [str(r[0]) for r in await self._query(sql, tenant)]

    def _param(self) -> str:
        return "?" if self.sqlite_path is not None else ":arg"

    async def _query(self, sql: str, arg: str) -> list[tuple[Any, ...]]:
        if self.sqlite_path is not None:
            path = self.sqlite_path
            return await asyncio.to_thread(_sqlite_query, path, sql, arg)
        assert self.postgres_url is not None
        engine = create_async_engine(
            self.postgres_url, poolclass=NullPool, connect_args={"timeout": 10}
        )
        try:
            async with engine.connect() as connection:
                result = await connection.execute(text(sql), {"arg": arg})
                return [tuple(r) for r in result.all()]
        finally:
            await engine.dispose()


def _sqlite_query(path: Path, sql: str, arg: str) -> list[tuple[Any, ...]]:
    # SELECTs only: shared locks, never the gateway's write lock (WAL readers do not block it).
    db = sqlite3.connect(path, timeout=10)
    try:
        return list(db.execute(sql, (arg,)).fetchall())
    finally:
        db.close()


async def wait_count(
    table: UsageTable, tenant: str, target: int, timeout_s: float, poll_s: float = 0.02
) -> tuple[int, float]:
    """Poll until `tenant` has `target` rows or `timeout_s` passes: (rows, seconds waited)."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while True:
        count, _ = await table.count(tenant)
        now = time.monotonic()
        if count >= target or now >= deadline:
            return count, now - t0
        await asyncio.sleep(poll_s)
