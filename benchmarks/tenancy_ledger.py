"""The usage ledger loses nothing and doubles nothing under load (issue 10, must-show 4).

A gateway with `--auth keys` in front of `instant` sim engines takes `--rate` non-stream chat
requests a second (open loop, fixed intended send times) for `--duration-s`, on SQLite (the
default store in the state directory) and on PostgreSQL (a database of its own on
127.0.0.1:5432, dropped after). Two things happen mid-load:

- at 25 % of the run the gateway gets SIGTERM (it drains and flushes its ledger), and a new
  gateway is started on the same port, state directory and database as soon as it has exited;
- at 50 % the database becomes unreachable for `--outage-s`: PostgreSQL behind
  `fleetserve.testing.tcp_proxy.TcpProxy` (the gateway's FLEETSERVE_DATABASE_URL names the
  proxy's port; `pause()` resets its connections and refuses new ones, `resume()` forwards
  again); SQLite, which has no network to cut, by another connection holding its write lock
  (`BEGIN EXCLUSIVE`), so every write of the gateway's times out.

Every answer carries `x-request-id`, the id of its ledger row. After the load, the ledger is
given time to replay its spool, the gateway is stopped (SIGTERM: it flushes), and the usage
table is read directly: each answered id must have exactly one row. Printed per phase of the
run: requests sent, answered, rows found, lost, doubled; the spool's rows (counted in its
files at the end of the outage) and the ledger's own log lines about the outage; and the rate
the generator really reached.

    .venv/bin/python -m benchmarks.tenancy_ledger                    # both databases, ~6 min
    .venv/bin/python -m benchmarks.tenancy_ledger --database sqlite --duration-s 60
    .venv/bin/python -m benchmarks.tenancy_ledger --quick            # 20 s of load each

The load generator is this process: fleetserve's own HTTP/1.1 client on uvloop, GC off, open
loop, keeping every answer's `x-request-id`. `wrk` (Debian's 4.1, `make bench-tools`) is not
used: it is closed loop (no fixed rate, so a stalled gateway would slow the load instead of
piling it up) and gives response headers only to a Lua hook per response. The rate sent and
answered is printed, and called "NOT reached" below 95 % of `--rate`. The exit status is 1
when a row is lost or doubled (or a 200 is not a completion), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import orjson
import uvloop

from benchmarks._harness import Processes, pin_self, sigterm_as_exit
from benchmarks._tenancy_stack import (
    GATEWAY_EXIT_TIMEOUT_S,
    Pricing,
    StackSpec,
    TenancyStack,
    UsageTable,
    clean_environment,
    machine_line,
    outages_in_log,
    scrape_metric,
    spool_ids,
    spool_rows,
)
from fleetserve.errors import FleetserveError, UpstreamConnectError, UpstreamTimeoutError
from fleetserve.telemetry.quantiles import percentile_of
from fleetserve.testing.databases import (
    PostgresUnavailable,
    TemporaryDatabase,
    create_database,
    drop_database,
)
from fleetserve.testing.tcp_proxy import TcpProxy
from fleetserve.transport.http1 import Http1Client

MODEL = "bench-instant"
PRICING = Pricing(input_per_mtok_usd=0.5, output_per_mtok_usd=1.5)
TENANT = "ledger-bench"
CHAT_PATH = "/v1/chat/completions"
ANSWER_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 2.0
MAX_IN_FLIGHT = 4096  # the generator's bound; sends past it are counted, not made
SETTLE_TIMEOUT_S = 180.0  # after the load: the spool replayed and every row written
DB_UP_METRIC = "fleetserve_ledger_database_up"
SIGTERM_AT = 0.25
OUTAGE_AT = 0.5
BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "max_tokens": 8,
    }
)


@dataclass(frozen=True, slots=True)
class Plan:
    duration_s: float
    rate_rps: float
    outage_s: float
    workers: int
    engines: int = 2
    key_cache_ttl_s: float | None = None  # None: the gateway's default (0.5 s)


FULL = Plan(duration_s=120.0, rate_rps=1000.0, outage_s=30.0, workers=1)
QUICK = Plan(duration_s=20.0, rate_rps=100.0, outage_s=6.0, workers=1, engines=1)


# --- the load ------------------------------------------------------------------------------


@dataclass
class Answers:
    """One slot per scheduled request: its intended send time (s from the start), and what
    came back (HTTP status, 0 for none; the ledger id; why there was no answer)."""

    at_s: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    request_id: list[str | None] = field(default_factory=list)
    failure: list[str | None] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)  # actual - intended send time
    refusals: collections.Counter[tuple[int, str]] = field(default_factory=collections.Counter)
    samples: dict[str, bytes] = field(default_factory=dict)  # the first body of each error code
    first_send: float = 0.0  # monotonic
    last_answer: float = 0.0

    def add(self, at_s: float) -> int:
        self.at_s.append(at_s)
        self.status.append(0)
        self.request_id.append(None)
        self.failure.append(None)
        return len(self.at_s) - 1


def _error_code(body: bytes) -> str:
    """The `error.code` of an OpenAI error body, or what the body is instead."""
    try:
        error = orjson.loads(body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return "not an OpenAI error"
    return str(error.get("code") or error.get("type") or "?")


async def _one(client: Http1Client, url: str, answers: Answers, i: int) -> None:
    try:
        response = await client.request(url, BODY, f"b{i}", ANSWER_TIMEOUT_S, stream=False)
    except UpstreamConnectError:
        answers.failure[i] = "refused or reset"
        return
    except UpstreamTimeoutError:
        answers.failure[i] = "timeout"
        return
    except FleetserveError as exc:
        answers.failure[i] = type(exc).__name__
        return
    answers.status[i] = response.status
    answers.request_id[i] = response.headers.get("x-request-id")
    body = response.body()  # taken in full: a pooled connection must not keep old bytes
    response.finish()
    if response.status != 200:
        code = _error_code(body)
        answers.refusals[(response.status, code)] += 1
        answers.samples.setdefault(code, body[:160])
    elif b'"choices"' not in body:
        answers.refusals[(200, "not a chat completion")] += 1
        answers.samples.setdefault("not a chat completion", body[:160])
    answers.last_answer = time.monotonic()


async def load(url: str, key: str, plan: Plan, t0: float, answers: Answers) -> None:
    """Send at t0 + i / rate (late sends go at once, and their lag is kept); wait for all."""
    client = Http1Client(
        CONNECT_TIMEOUT_S,
        headers={"Authorization": f"Bearer {key}"},
        capture_headers=["x-request-id"],
        max_idle_per_origin=MAX_IN_FLIGHT,
    )
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    interval = 1.0 / plan.rate_rps
    count = max(1, round(plan.rate_rps * plan.duration_s))
    target = url + CHAT_PATH
    answers.first_send = t0
    try:
        for i in range(count):
            intended = t0 + i * interval
            delay = intended - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            slot = answers.add(i * interval)
            answers.lag_s.append(time.monotonic() - intended)
            if len(pending) >= MAX_IN_FLIGHT:
                answers.failure[slot] = "not sent (generator at its in-flight bound)"
                continue
            task = loop.create_task(_one(client, target, answers, slot))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            _, late = await asyncio.wait(pending, timeout=ANSWER_TIMEOUT_S + CONNECT_TIMEOUT_S + 5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
    finally:
        await client.close()


# --- cutting the database ------------------------------------------------------------------


class Outage(Protocol):
    what: str

    async def cut(self) -> None: ...

    async def heal(self) -> None: ...


class ProxyOutage:
    """PostgreSQL behind the TCP proxy: connections reset, new ones refused."""

    what = "TcpProxy.pause(): PostgreSQL connections reset, new ones refused"

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy

    async def cut(self) -> None:
        await self.proxy.pause()

    async def heal(self) -> None:
        await self.proxy.resume()


class SqliteLockOutage:
    """SQLite's write lock held by another connection: the gateway's writes wait, then fail."""

    what = "another connection holds SQLite's write lock (BEGIN EXCLUSIVE)"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    async def cut(self) -> None:
        self._db = await asyncio.to_thread(self._lock)

    def _lock(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("BEGIN EXCLUSIVE")
        return db

    async def heal(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.to_thread(_release, db)


def _release(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    finally:
        db.close()


# --- one run -------------------------------------------------------------------------------


@dataclass
class Timeline:
    """Seconds from the start of the load."""

    sigterm: float = 0.0
    exited: float = 0.0
    ready: float = 0.0
    cut: float = 0.0
    healed: float = 0.0
    end: float = 0.0
    exit_status: int | None = None


@dataclass
class RunResult:
    database: str
    outage_what: str
    plan: Plan
    answers: Answers
    timeline: Timeline
    ids_at_settle: set[str]
    ids_final: list[str]
    settle_s: float
    cut: CutSnapshot
    log_downs: list[str]
    log_backs: list[tuple[float, int]]
    spool_left: int
    final_exit_status: int | None


@dataclass
class CutSnapshot:
    """At the end of the cut, before it heals: where the rows of the answers so far are."""

    spool_files: int = 0
    spool_rows: int = 0
    spool_rows_max: int = 0  # the most seen in the spool files during the cut
    answered: int = 0  # ids the client held
    in_table: int = 0
    in_spool: int = 0
    in_memory_only: int = 0  # answered, in neither: waiting in a gateway's queue
    db_up: float | None = None  # fleetserve_ledger_database_up, last sample in the cut
    metrics: dict[str, float] = field(default_factory=dict)


async def _snapshot(
    table: UsageTable, state_dir: Path, answers: Answers, snap: CutSnapshot
) -> None:
    answered = {rid for rid in answers.request_id if rid}
    spooled = spool_ids(state_dir)
    in_table = set(await table.ids(TENANT))
    snap.spool_files, snap.spool_rows = spool_rows(state_dir)
    snap.answered = len(answered)
    snap.in_table = len(answered & in_table)
    snap.in_spool = len((answered - in_table) & spooled)
    snap.in_memory_only = len(answered - in_table - spooled)


async def _controller(
    stack: TenancyStack,
    outage: Outage,
    plan: Plan,
    t0: float,
    tl: Timeline,
    table: UsageTable,
    answers: Answers,
) -> CutSnapshot:
    """SIGTERM and restart the gateway at 25 %, cut the database at 50 %."""
    state_dir = stack.spec.state_dir
    await _sleep_until(t0 + SIGTERM_AT * plan.duration_s)
    gateway = stack.gateway
    assert gateway is not None
    tl.sigterm = time.monotonic() - t0
    gateway.send_signal(signal.SIGTERM)
    tl.exit_status = await asyncio.to_thread(gateway.wait, GATEWAY_EXIT_TIMEOUT_S)
    tl.exited = time.monotonic() - t0
    stack.start_gateway()
    await stack.wait_gateway_async()
    tl.ready = time.monotonic() - t0
    await _sleep_until(t0 + max(OUTAGE_AT * plan.duration_s, tl.ready + 1.0))
    tl.cut = time.monotonic() - t0
    await outage.cut()
    deadline = time.monotonic() + plan.outage_s
    snap = CutSnapshot()
    while (left := deadline - time.monotonic()) > 0.5:
        await asyncio.sleep(min(1.0, left - 0.5))
        snap.spool_rows_max = max(snap.spool_rows_max, spool_rows(state_dir)[1])
        with contextlib.suppress(OSError):
            snap.metrics = await asyncio.to_thread(scrape_metric, stack.url, "fleetserve_ledger")
            up = [
                v for k, v in snap.metrics.items() if k.startswith("fleetserve_ledger_database_up")
            ]
            snap.db_up = min(up) if up else None
    await _snapshot(table, state_dir, answers, snap)  # the last ~0.5 s of the cut
    snap.spool_rows_max = max(snap.spool_rows_max, snap.spool_rows)
    await _sleep_until(deadline)
    tl.healed = time.monotonic() - t0
    await outage.heal()
    return snap


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _settle(
    table: UsageTable, answered: set[str], state_dir: Path, timeout_s: float
) -> tuple[set[str], float]:
    """Until every answered id has a row and the spool is empty (or timeout_s): the ids."""
    t0 = time.monotonic()
    while True:
        ids = set(await table.ids(TENANT))
        files, _ = spool_rows(state_dir)
        if (answered <= ids and files == 0) or time.monotonic() - t0 >= timeout_s:
            return ids, time.monotonic() - t0
        await asyncio.sleep(0.5)


async def run_database(
    procs: Processes,
    plan: Plan,
    database: str,
    work: Path,
    cores: tuple[int | None, int | None],
    say: _Say,
) -> RunResult:
    state = work / f"state-{database}"
    state.mkdir()
    proxy: TcpProxy | None = None
    temp_db: TemporaryDatabase | None = None
    try:
        if database == "postgres":
            temp_db = await create_database("fleetserve_bench")
            proxy = TcpProxy("127.0.0.1", 5432)
            port = await proxy.start()
            gateway_url = temp_db.url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{port}/")
            table = UsageTable(postgres_url=temp_db.url)
            outage: Outage = ProxyOutage(proxy)
        else:
            gateway_url = None
            table = UsageTable(sqlite_path=state / "fleetserve.db")
            outage = SqliteLockOutage(state / "fleetserve.db")
        spec = StackSpec(
            model=MODEL, pricing=PRICING, profile="instant", engines=plan.engines,
            workers=plan.workers, state_dir=state, gateway_core=cores[0], engine_core=cores[1],
            database_url=gateway_url, gateway_env=_gateway_env(plan),
        )  # fmt: skip
        stack = TenancyStack(procs, spec)
        await asyncio.to_thread(stack.start_engines)
        stack.start_gateway()
        await stack.wait_gateway_async()
        key = await asyncio.to_thread(stack.new_key, TENANT)
        say(f"{database}: load for {plan.duration_s:g} s at {plan.rate_rps:g} req/s")
        answers = Answers()
        tl = Timeline()
        t0 = time.monotonic() + 0.05
        gc.collect()
        gc.disable()  # the generator's GC pauses would show as send lag
        try:
            controller = asyncio.ensure_future(
                _controller(stack, outage, plan, t0, tl, table, answers)
            )
            await load(stack.url, key, plan, t0, answers)
            tl.end = time.monotonic() - t0
            snap = await controller
        finally:
            gc.enable()
        answered = {rid for rid in answers.request_id if rid}
        say(f"{database}: load done; waiting for the ledger (spool replay, batches)")
        ids_at_settle, settle_s = await _settle(table, answered, state, SETTLE_TIMEOUT_S)
        gateway = stack.gateway
        assert gateway is not None
        gateway.send_signal(signal.SIGTERM)
        final_status = await asyncio.to_thread(gateway.wait, GATEWAY_EXIT_TIMEOUT_S)
        ids_final = await table.ids(TENANT)
        downs, backs = outages_in_log(stack.gateway_log())
        _, left = spool_rows(state)
        return RunResult(
            database, outage.what, plan, answers, tl, ids_at_settle, ids_final, settle_s,
            snap, downs, backs, left, final_status,
        )  # fmt: skip
    finally:
        procs.stop_all()
        if proxy is not None:
            await proxy.stop()
        if temp_db is not None:
            await drop_database(temp_db)


def _gateway_env(plan: Plan) -> dict[str, str]:
    if plan.key_cache_ttl_s is None:
        return {}
    return {"FLEETSERVE_TENANCY__KEY_CACHE_TTL_S": f"{plan.key_cache_ttl_s:g}"}


class _Say(Protocol):
    def __call__(self, text: str) -> None: ...


# --- the report ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    start_s: float
    end_s: float


def phases_of(tl: Timeline, duration_s: float) -> list[Phase]:
    return [
        Phase("before SIGTERM", 0.0, tl.sigterm),
        Phase("SIGTERM to ready again", tl.sigterm, tl.ready),
        Phase("ready to cut", tl.ready, tl.cut),
        Phase("database cut", tl.cut, tl.healed),
        Phase("after the cut", tl.healed, duration_s + 1.0),
    ]


def render(res: RunResult) -> tuple[str, bool]:
    ans = res.answers
    tl = res.timeline
    plan = res.plan
    final = collections.Counter(res.ids_final)
    doubled_in_table = sum(n - 1 for n in final.values() if n > 1)
    client_ids = [rid for rid in ans.request_id if rid]
    doubled_ids = len(client_ids) - len(set(client_ids))
    answered = set(client_ids)
    rows = set(final)
    lost = answered - rows
    extra = rows - answered
    lines = [f"== {res.database} ==", f"outage   : {res.outage_what}"]
    span = max(ans.last_answer - ans.first_send, 1e-9)
    ok_count = sum(1 for s in ans.status if s == 200)
    lag = [x * 1000 for x in ans.lag_s]
    lag50, lag99 = percentile_of(lag, 50), percentile_of(lag, 99)
    lines.append(
        f"load     : {len(ans.at_s)} requests scheduled at {plan.rate_rps:g}/s over "
        f"{plan.duration_s:g} s; send lag p50 {lag50 or 0:.1f} ms, p99 {lag99 or 0:.1f} ms, max "
        f"{max(lag, default=0):.1f} ms; 200s {ok_count} = {ok_count / span:.0f}/s over the run "
        f"(gaps included)"
    )
    lines.append(
        f"timeline : SIGTERM at {tl.sigterm:.1f} s, exited at {tl.exited:.1f} s (status "
        f"{tl.exit_status}), new gateway ready at {tl.ready:.1f} s; database cut "
        f"{tl.cut:.1f}-{tl.healed:.1f} s; load over at {tl.end:.1f} s"
    )
    header = (
        f"{'phase':<24}{'span s':>8}{'sent':>8}{'answered':>10}{'ok/s':>7}{'200':>8}{'other':>7}"
        f"{'no answer':>11}{'rows':>8}{'lost':>6}"
    )
    lines.append(header)
    failures: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    for ph in phases_of(tl, plan.duration_s):
        idx = [i for i, at in enumerate(ans.at_s) if ph.start_s <= at < ph.end_s]
        got = [ans.request_id[i] for i in idx if ans.request_id[i]]
        oks = sum(1 for i in idx if ans.status[i] == 200)
        other = sum(1 for i in idx if ans.status[i] not in (0, 200))
        none = sum(1 for i in idx if ans.status[i] == 0)
        for i in idx:
            if ans.status[i] == 0:
                failures[ans.failure[i] or "?"] += 1
            elif ans.status[i] != 200:
                statuses[ans.status[i]] += 1
        found = sum(1 for rid in got if rid in rows)
        width = max(min(ph.end_s, plan.duration_s) - ph.start_s, 1e-9)
        lines.append(
            f"{ph.name:<24}{width:>8.1f}{len(idx):>8}{len(got):>10}{oks / width:>7.0f}{oks:>8}"
            f"{other:>7}{none:>11}{found:>8}{len(got) - found:>6}"
        )
    lines.append(
        f"{'all':<24}{plan.duration_s:>8.1f}{len(ans.at_s):>8}{len(client_ids):>10}"
        f"{ok_count / plan.duration_s:>7.0f}{ok_count:>8}"
        f"{sum(statuses.values()):>7}{sum(failures.values()):>11}"
        f"{len(answered & rows):>8}{len(lost):>6}"
    )
    if ans.refusals:
        codes = ", ".join(f"{n} x {st} {code}" for (st, code), n in ans.refusals.most_common())
        with_id = sum(
            1
            for st, rid in zip(ans.status, ans.request_id, strict=True)
            if st not in (0, 200) and rid
        )
        lines.append(
            f"other    : {codes}; {with_id} of the non-200s carried an x-request-id (admitted: "
            "a row is due; the others were refused before admission)"
        )
        for code, body in ans.samples.items():
            lines.append(f"  {code}: {body.decode(errors='replace')!r}")
    if failures:
        lines.append(f"no answer: {dict(failures.most_common())}")
    cut = res.cut
    lines.append(
        f"cut end  : {cut.answered} ids answered so far: {cut.in_table} in the table, "
        f"{cut.in_spool} in the spool files only, {cut.in_memory_only} in neither (in a "
        f"gateway's memory queue); spool files {cut.spool_files} with {cut.spool_rows} rows "
        f"(max seen {cut.spool_rows_max})"
    )
    spooled_metric = {
        k: v for k, v in cut.metrics.items() if "spooled" in k and not k.endswith("_created")
    }
    lines.append(
        f"metrics  : during the cut fleetserve_ledger_database_up {cut.db_up}, "
        f"{spooled_metric or 'no fleetserve_ledger_spooled_rows'}; spool rows left at the end: "
        f"{res.spool_left}"
    )
    backs = "; ".join(f"back after {s:.1f} s, {n} rows spooled" for s, n in res.log_backs)
    downs = "; ".join(d[:80] for d in res.log_downs)
    lines.append(
        f"ledger log: {len(res.log_downs)} down ({downs or '-'}); {backs or 'no recovery line'}"
    )
    at_settle_lost = len(answered - res.ids_at_settle)
    lines.append(
        f"ledger   : {len(answered)} answered ids; at settle ({res.settle_s:.1f} s after the load) "
        f"{at_settle_lost} without a row; after the final SIGTERM (status "
        f"{res.final_exit_status}): {len(res.ids_final)} rows, {len(rows)} distinct"
    )
    bad_bodies = ans.refusals.get((200, "not a chat completion"), 0)
    verdict_ok = not lost and not doubled_in_table and not doubled_ids and not bad_bodies
    lines.append(
        f"result   : lost {len(lost)}, doubled rows {doubled_in_table}, ids answered twice "
        f"{doubled_ids}; rows without an answer the client saw: {len(extra)} -> "
        f"{'0 lost, 0 duplicates' if verdict_ok else 'FAILED'}"
    )
    if lost:
        sample = sorted(lost)[:5]
        lines.append(f"lost ids : {sample}{' ...' if len(lost) > 5 else ''}")
    outside = [i for i, at in enumerate(ans.at_s) if not tl.sigterm <= at < tl.ready]
    outside_s = max(plan.duration_s - (tl.ready - tl.sigterm), 1e-9)
    sent_rate = len(ans.lag_s) / max(plan.duration_s, 1e-9)
    answered_rate = sum(1 for i in outside if ans.status[i]) / outside_s
    ok_rate = sum(1 for i in outside if ans.status[i] == 200) / outside_s
    reached = answered_rate >= 0.95 * plan.rate_rps
    lines.append(
        f"rate     : sent {sent_rate:.0f}/s; outside the restart gap answered "
        f"{answered_rate:.0f}/s ({ok_rate:.0f}/s of them 200): {plan.rate_rps:g}/s "
        f"{'reached' if reached else 'NOT reached'}"
    )
    return "\n".join(lines), verdict_ok


# --- main ----------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, help=f"load per database ({FULL.duration_s:g})")
    parser.add_argument("--rate", type=float, help=f"requests a second ({FULL.rate_rps:g})")
    parser.add_argument("--outage-s", type=float, help=f"database cut ({FULL.outage_s:g})")
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--workers", type=int, help=f"gateway workers ({FULL.workers})")
    parser.add_argument("--engines", type=int, help=f"sim engines ({FULL.engines})")
    parser.add_argument(
        "--key-cache-ttl-s", type=float,
        help="the gateway's key cache TTL (FLEETSERVE_TENANCY__KEY_CACHE_TTL_S; default: the "
        "gateway's own, 0.5 s). Keys are read from the database, so a cut longer than this "
        "refuses requests with 503 unless it is raised",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few seconds per database")
    parser.add_argument("--gateway-core", type=int, default=0)
    parser.add_argument("--engine-core", type=int, default=1, help="engines and this generator")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    plan = Plan(
        duration_s=args.duration_s or base.duration_s,
        rate_rps=args.rate or base.rate_rps,
        outage_s=base.outage_s if args.outage_s is None else args.outage_s,
        workers=args.workers or base.workers,
        engines=args.engines or base.engines,
        key_cache_ttl_s=args.key_cache_ttl_s,
    )
    if plan.key_cache_ttl_s is not None and plan.key_cache_ttl_s <= 0:
        parser.error("--key-cache-ttl-s must be > 0")
    if plan.duration_s <= 0 or plan.rate_rps <= 0 or plan.outage_s < 0:
        parser.error("--duration-s and --rate must be > 0, --outage-s >= 0")
    if plan.workers < 1 or plan.engines < 1:
        parser.error("--workers and --engines must be at least 1")
    if plan.outage_s >= (1 - OUTAGE_AT) * plan.duration_s:
        parser.error(
            f"--outage-s must end before the load does: it starts at {OUTAGE_AT:.0%} of "
            f"--duration-s, so it must be under {(1 - OUTAGE_AT) * plan.duration_s:g} s"
        )
    args.plan = plan
    return args


async def _run_all(
    plan: Plan, databases: Sequence[str], work: Path, cores: tuple[int | None, int | None],
    say: _Say,
) -> list[RunResult]:  # fmt: skip
    results = []
    with Processes(work) as procs:
        for database in databases:
            results.append(await run_database(procs, plan, database, work, cores, say))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    clean_environment()
    plan: Plan = args.plan
    cores = (None, None) if args.no_pin else (args.gateway_core, args.engine_core)
    if cores[1] is not None:
        pin_self(cores[1])
    databases = ("sqlite", "postgres") if args.database == "both" else (args.database,)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    print("tenancy_ledger: no usage row lost or doubled under load, SIGTERM and a database cut")
    print(time.strftime("date     : %Y-%m-%d %H:%M:%S %Z"))
    print(machine_line())
    pin = "nothing pinned" if args.no_pin else (
        f"gateway on core {cores[0]}; engines and the generator on core {cores[1]}"
    )  # fmt: skip
    print(
        f"setup    : {plan.workers} gateway worker(s) (--auth keys), {plan.engines} sim engine(s) "
        f"profile instant, non-stream chat, max_tokens 8; open loop at {plan.rate_rps:g} req/s "
        f"for {plan.duration_s:g} s per database; SIGTERM + restart at {SIGTERM_AT:.0%}, "
        f"database cut for {plan.outage_s:g} s at {OUTAGE_AT:.0%}; key cache TTL "
        f"{'default (0.5 s)' if plan.key_cache_ttl_s is None else f'{plan.key_cache_ttl_s:g} s'}; "
        f"{pin}",
        flush=True,
    )
    try:
        with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="tenancy-ledger-") as tmp:
            results = uvloop.run(_run_all(plan, databases, Path(tmp), cores, say))
    except PostgresUnavailable as exc:
        print(f"error    : {exc}", file=sys.stderr)
        return 2
    all_ok = True
    for res in results:
        text, ok = render(res)
        all_ok &= ok
        print()
        print(text)
    print()
    print(f"verdict  : {'no row lost, none doubled' if all_ok else 'rows were LOST or DOUBLED'}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
