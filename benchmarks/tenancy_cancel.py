"""Cancelled streams are charged what was delivered (issue 10, must-show 3).

A gateway with `--auth keys` (SQLite ledger in a temporary state directory) in front of sim
engines that stream for real (profile `h100`: a token every 6-15 ms), one priced model. The
client opens `--streams` chat streams, `--concurrency` at a time (10, then 100, by
default: one table side by side), and closes each connection
at a random point: after a random number of content events (0 to max_tokens - 2), or a random
time after the response head (0 to the length of one whole stream, timed alone first). Then:

- the time from the last close until the usage table holds a row for every stream (limit 5 s);
- per stream, matched by the ledger id the gateway returned in `x-request-id` (and forwarded
  upstream as `X-Request-Id`, which the engine's own request log, `GET /sim/requests`, keeps):
  the row's prompt and completion tokens against what the engine says it took and generated
  (limit: within +-1), the row's cost against tokens x price, and the content events the
  client itself saw against the row.

    .venv/bin/python -m benchmarks.tenancy_cancel            # 500 streams, about 30 s
    .venv/bin/python -m benchmarks.tenancy_cancel --quick    # 20 streams, a few seconds

The exit status is 1 when a limit is missed or a stream failed, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

from benchmarks._harness import Processes, SseCheck, pin_self, sigterm_as_exit
from benchmarks._tenancy_stack import (
    LedgerRow,
    Pricing,
    StackSpec,
    TenancyStack,
    UsageTable,
    clean_environment,
    machine_line,
    wait_count,
)
from fleetserve.errors import FleetserveError
from fleetserve.testing.processes import get_json
from fleetserve.transport.http1 import Http1Client

MODEL = "bench-priced"
PRICING = Pricing(input_per_mtok_usd=2.5, output_per_mtok_usd=10.0)
TENANT = "cancel-bench"
CHAT_PATH = "/v1/chat/completions"
ROWS_WITHIN_S = 5.0  # issue 10: every row within 5 s
TOKENS_WITHIN = 1  # issue 10: within +-1 token of the engine's log
SETTLE_TIMEOUT_S = 30.0  # how long rows and engine logs are waited for at most
READ_TIMEOUT_S = 20.0
WORDS = ("fleet", "replica", "gateway", "tenant", "budget", "ledger", "token", "stream")


@dataclass(frozen=True, slots=True)
class Plan:
    streams: int  # per concurrency level
    levels: tuple[int, ...]  # streams open at once, run in turn
    max_tokens: int
    engines: int


FULL = Plan(streams=500, levels=(10, 100), max_tokens=128, engines=2)
QUICK = Plan(streams=20, levels=(10,), max_tokens=32, engines=1)


@dataclass(frozen=True, slots=True)
class CancelPoint:
    """Where the client closes one stream: after `events` content events, or `after_s`
    seconds past the response head."""

    prompt_words: int
    events: int | None = None
    after_s: float | None = None

    @property
    def mode(self) -> str:
        return "events" if self.events is not None else "time"


@dataclass
class StreamResult:
    point: CancelPoint
    request_id: str | None = None
    status: int = 0
    seen: int = 0  # content events the client decoded before it closed
    cancelled: bool = False  # the client closed before [DONE]
    completed: bool = False  # [DONE] came before the cancel point
    error: str | None = None
    closed_at: float = 0.0  # time.monotonic() of the close (the engines' clock too)
    closed_wall: float = 0.0  # time.time() of the close (the ledger's clock)


def cancel_points(plan: Plan, stream_s: float, rng: random.Random) -> list[CancelPoint]:
    points = []
    for i in range(plan.streams):
        words = rng.randint(4, 200)
        if i % 2 == 0:
            points.append(CancelPoint(words, events=rng.randint(0, plan.max_tokens - 2)))
        else:
            points.append(CancelPoint(words, after_s=rng.uniform(0.0, stream_s)))
    rng.shuffle(points)
    return points


def chat_body(words: int, max_tokens: int, rng: random.Random) -> bytes:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "stream": True,
        }
    )


async def one_stream(
    client: Http1Client, url: str, body: bytes, point: CancelPoint, tag: str
) -> StreamResult:
    result = StreamResult(point)
    try:
        response = await client.request(url, body, tag, READ_TIMEOUT_S, stream=True)
    except FleetserveError as exc:
        result.error = f"request: {type(exc).__name__}"
        return result
    result.status = response.status
    result.request_id = response.headers.get("x-request-id")
    if response.status != 200:
        result.error = f"http_{response.status}"
        await response.read(READ_TIMEOUT_S, 1 << 20)
        response.finish()
        return result
    check = SseCheck()
    head_at = time.monotonic()
    deadline = None if point.after_s is None else head_at + point.after_s
    try:
        while True:
            if point.events is not None and check.content_chunks >= point.events:
                break
            wait_s = READ_TIMEOUT_S
            if deadline is not None:
                wait_s = deadline - time.monotonic()
                if wait_s <= 0:
                    break
            try:
                chunk = await asyncio.wait_for(response.next_chunk(READ_TIMEOUT_S, "idle"), wait_s)
            except TimeoutError:
                if deadline is None:
                    raise
                break  # the cancel time came while waiting for the next event
            if not chunk:
                break
            check.feed(chunk)
            if check.done:
                break
    except (FleetserveError, TimeoutError, ValueError) as exc:
        result.error = f"read: {type(exc).__name__}"
    result.seen = check.content_chunks
    if check.done and result.error is None:
        result.completed = True
        response.finish()
    else:
        response.abort()  # the client leaves: the connection closes
        result.cancelled = result.error is None
    result.closed_at = time.monotonic()
    result.closed_wall = time.time()
    return result


async def run_streams(
    url: str, key: str, points: Sequence[CancelPoint], concurrency: int, plan: Plan, seed: int
) -> list[StreamResult]:
    rng = random.Random(seed + 1)
    bodies = [chat_body(p.prompt_words, plan.max_tokens, rng) for p in points]
    client = Http1Client(
        5.0, headers={"Authorization": f"Bearer {key}"}, capture_headers=["x-request-id"]
    )
    results: list[StreamResult | None] = [None] * len(points)
    todo = collections.deque(range(len(points)))

    async def worker() -> None:
        while todo:
            i = todo.popleft()
            results[i] = await one_stream(client, url + CHAT_PATH, bodies[i], points[i], f"c{i}")

    try:
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(points)))))
    finally:
        await client.close()
    return [r for r in results if r is not None]


async def time_one_stream(url: str, key: str, max_tokens: int) -> float:
    """Seconds from the head to [DONE] of one whole stream, alone (the calibration)."""
    client = Http1Client(5.0, headers={"Authorization": f"Bearer {key}"})
    body = chat_body(16, max_tokens, random.Random(0))
    try:
        response = await client.request(url + CHAT_PATH, body, "calibration", READ_TIMEOUT_S,
                                         stream=True)  # fmt: skip
        t0 = time.monotonic()
        check = SseCheck()
        while chunk := await response.next_chunk(READ_TIMEOUT_S, "idle"):
            check.feed(chunk)
        response.finish()
    finally:
        await client.close()
    if response.status != 200 or check.content_chunks != max_tokens:
        raise RuntimeError(
            f"the calibration stream failed: status {response.status}, "
            f"{check.content_chunks} of {max_tokens} content events"
        )
    return time.monotonic() - t0


def engine_log(engine_urls: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every engine's request log, by request id."""
    out: dict[str, dict[str, Any]] = {}
    for url in engine_urls:
        after = 0
        for _ in range(1000):  # pages of 1000: bounded
            page = get_json(f"{url}/sim/requests?since={after}&limit=1000", timeout_s=10)
            for entry in page["requests"]:
                if entry.get("request_id"):
                    out[entry["request_id"]] = entry
            if not page["requests"]:
                break
            after = page["next"]
    return out


@dataclass
class Level:
    """One concurrency level: what the client saw, the rows, the engines' log."""

    concurrency: int
    results: list[StreamResult]
    rows_found: int
    rows_wait_s: float
    rows: dict[str, LedgerRow]
    engine: dict[str, dict[str, Any]]


@dataclass
class Figures:
    """The checks of one level, as counts."""

    streams: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0
    completed: int = 0  # ended ([DONE]) before the cancel point
    failed: dict[str, int] = field(default_factory=dict)
    with_id: int = 0
    seen: list[int] = field(default_factory=list)  # content events decoded, per cancelled stream
    rows_found: int = 0
    rows_wait_s: float = 0.0
    no_row: int = 0
    no_entry: int = 0
    matched: int = 0
    prompt_devs: list[int] = field(default_factory=list)  # row - engine
    completion_devs: list[int] = field(default_factory=list)
    cost_exact: int = 0
    cost_vs_engine: list[int] = field(default_factory=list)  # micro-$, row - engine tokens'
    client_vs_row: list[int] = field(default_factory=list)  # row completion - client decoded
    gateway_lag_ms: list[float] = field(default_factory=list)  # row ended_at - client close
    engine_lag_ms: list[float] = field(default_factory=list)  # engine last write - client close
    reasons: dict[str, int] = field(default_factory=dict)
    engine_reasons: dict[str, int] = field(default_factory=dict)
    estimated: int = 0

    def within(self, devs: Sequence[int]) -> int:
        return sum(1 for d in devs if abs(d) <= TOKENS_WITHIN)

    @property
    def rows_met(self) -> bool:
        return self.rows_found >= self.with_id == self.streams and self.rows_wait_s <= ROWS_WITHIN_S

    def tokens_met(self, devs: Sequence[int]) -> bool:
        return self.within(devs) == self.matched == self.streams

    @property
    def all_met(self) -> bool:
        return (
            not self.failed
            and self.rows_met
            and self.tokens_met(self.prompt_devs)
            and self.tokens_met(self.completion_devs)
            and self.cost_exact == self.rows_found
        )


def figures_of(level: Level) -> Figures:
    fig = Figures(streams=len(level.results), rows_found=level.rows_found)
    fig.rows_wait_s = level.rows_wait_s
    fig.by_mode = dict(collections.Counter(r.point.mode for r in level.results))
    fig.failed = dict(collections.Counter(r.error for r in level.results if r.error is not None))
    reasons: collections.Counter[str] = collections.Counter()
    engine_reasons: collections.Counter[str] = collections.Counter()
    for r in level.results:
        fig.cancelled += r.cancelled
        fig.completed += r.completed
        if r.cancelled:
            fig.seen.append(r.seen)
        if not r.request_id:
            continue
        fig.with_id += 1
        row = level.rows.get(r.request_id)
        if row is None:
            fig.no_row += 1
            continue
        reasons[row.finish_reason] += 1
        fig.estimated += row.usage_estimated
        if row.cost_micro_usd == PRICING.cost_micro_usd(row.prompt_tokens, row.completion_tokens):
            fig.cost_exact += 1
        if r.cancelled:
            fig.client_vs_row.append(row.completion_tokens - r.seen)
            fig.gateway_lag_ms.append((row.ended_at - r.closed_wall) * 1000)
        entry = level.engine.get(r.request_id)
        if entry is None:
            fig.no_entry += 1
            continue
        fig.matched += 1
        engine_reasons[str(entry["finish_reason"])] += 1
        prompt, output = int(entry["prompt_tokens"]), int(entry["output_tokens"])
        fig.prompt_devs.append(row.prompt_tokens - prompt)
        fig.completion_devs.append(row.completion_tokens - output)
        fig.cost_vs_engine.append(row.cost_micro_usd - PRICING.cost_micro_usd(prompt, output))
        if r.cancelled and entry.get("last_write_s") is not None:
            fig.engine_lag_ms.append((float(entry["last_write_s"]) - r.closed_at) * 1000)
    fig.reasons = dict(sorted(reasons.items()))
    fig.engine_reasons = dict(sorted(engine_reasons.items()))
    return fig


def _devs(devs: Sequence[int]) -> str:
    counts = collections.Counter(devs)
    return ", ".join(f"{d:+d}: {n}" for d, n in sorted(counts.items())) or "-"


def _spread(values_ms: Sequence[float]) -> str:
    """p50 / p99 / max."""
    if not values_ms:
        return "-"
    ordered = sorted(values_ms)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"{p50:.1f} / {p99:.1f} / {ordered[-1]:.1f}"


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def render_level(concurrency: int, fig: Figures, max_tokens: int) -> str:
    seen = sorted(fig.seen) or [0]
    worst_prompt = max((abs(d) for d in fig.prompt_devs), default=0)
    worst_completion = max((abs(d) for d in fig.completion_devs), default=0)
    failed = f" {fig.failed}" if fig.failed else ""
    lines = [
        f"-- {concurrency} streams at once --",
        f"streams           : {fig.streams} ({fig.by_mode.get('events', 0)} cut after a number "
        f"of content events, {fig.by_mode.get('time', 0)} after a time); {fig.cancelled} closed "
        f"mid-stream, {fig.completed} ended before their cancel point, "
        f"{sum(fig.failed.values())} failed{failed}",
        f"cut points        : content events decoded before the close: min {seen[0]}, median "
        f"{seen[len(seen) // 2]}, max {seen[-1]} of {max_tokens}; "
        f"{sum(1 for s in fig.seen if s == 0)} closed before the first",
        f"ledger rows       : {fig.rows_found} of {fig.streams}, all there {fig.rows_wait_s:.3f} s "
        f"after the last close (limit {ROWS_WITHIN_S:g} s): {_met(fig.rows_met)}",
        f"matched           : {fig.matched} streams with a row and an engine log entry "
        f"({fig.no_row} without a row, {fig.no_entry} without an engine entry)",
        f"prompt tokens     : {fig.within(fig.prompt_devs)} of {fig.streams} within +-1 of the "
        f"engine's log, max |dev| {worst_prompt} (row - engine: {_devs(fig.prompt_devs)}): "
        f"{_met(fig.tokens_met(fig.prompt_devs))}",
        f"completion tokens : {fig.within(fig.completion_devs)} of {fig.streams} within +-1 of "
        f"the engine's log, max |dev| {worst_completion} (row - engine: "
        f"{_devs(fig.completion_devs)}): {_met(fig.tokens_met(fig.completion_devs))}",
        f"cost              : {fig.cost_exact} of {fig.rows_found} rows cost exactly "
        f"tokens x price (rounded up to a micro-$): {_met(fig.cost_exact == fig.rows_found)}; "
        f"row - engine tokens x price: {min(fig.cost_vs_engine, default=0)} to "
        f"{max(fig.cost_vs_engine, default=0)} micro-$",
        f"client vs row     : row completion - content events the client decoded: "
        f"{_devs(fig.client_vs_row)}",
        f"after the close   : the gateway's row ended {_spread(fig.gateway_lag_ms)} ms later; "
        f"the engine's last write came {_spread(fig.engine_lag_ms)} ms later (p50 / p99 / max)",
        f"finish reasons    : ledger {fig.reasons}; engine {fig.engine_reasons}; "
        f"usage_estimated rows {fig.estimated}",
    ]
    return "\n".join(lines)


def render_summary(levels: Sequence[tuple[int, Figures]]) -> str:
    head = f"{'streams at once':<32}" + "".join(f"{c:>14}" for c, _ in levels)
    rows: list[tuple[str, Callable[[Figures], str]]] = [
        ("streams closed mid-stream", lambda f: f"{f.cancelled}/{f.streams}"),
        ("ledger rows", lambda f: f"{f.rows_found}/{f.streams}"),
        ("  all there after the close, s", lambda f: f"{f.rows_wait_s:.3f}"),
        ("prompt within +-1", lambda f: f"{f.within(f.prompt_devs)}/{f.streams}"),
        ("  max |row - engine|", lambda f: str(max((abs(d) for d in f.prompt_devs), default=0))),
        ("completion within +-1", lambda f: f"{f.within(f.completion_devs)}/{f.streams}"),
        ("  max |row - engine|",
         lambda f: str(max((abs(d) for d in f.completion_devs), default=0))),
        ("cost = tokens x price", lambda f: f"{f.cost_exact}/{f.rows_found}"),
        ("row = client's count", lambda f: f"{f.client_vs_row.count(0)}/{len(f.client_vs_row)}"),
        ("  max row - client", lambda f: f"{max(f.client_vs_row, default=0):+d}"),
        ("engine's last write p50 ms",
         lambda f: _spread(f.engine_lag_ms).split(" / ")[0]),
        ("all limits", lambda f: _met(f.all_met)),
    ]  # fmt: skip
    out = [head]
    for name, value in rows:
        out.append(f"{name:<32}" + "".join(f"{value(f):>14}" for _, f in levels))
    return "\n".join(out)


async def settle(
    table: UsageTable, tenant: str, results: Sequence[StreamResult]
) -> tuple[int, float, dict[str, LedgerRow]]:
    """Wait for a row per stream that got an id: (rows found, s after the last close, rows)."""
    with_id = sum(1 for r in results if r.request_id)
    last_close = max((r.closed_at for r in results), default=time.monotonic())
    found, _ = await wait_count(table, tenant, with_id, SETTLE_TIMEOUT_S)
    # From the last close to the poll that saw them all (polls are 20 ms apart).
    wait_s = time.monotonic() - last_close
    rows = {row.request_id: row for row in await table.rows(tenant)}
    return found, wait_s, rows


def engine_entries(urls: Sequence[str], wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The engines' log, once it has every wanted id (an engine logs a request when its
    handler ends) or SETTLE_TIMEOUT_S has passed."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    entries = engine_log(urls)
    while not wanted <= entries.keys() and time.monotonic() < deadline:
        time.sleep(0.1)
        entries = engine_log(urls)
    return entries


def run(
    plan: Plan, seed: int, gateway_core: int | None, engine_core: int | None
) -> tuple[float, list[Level]]:
    with (
        tempfile.TemporaryDirectory(prefix="tenancy-cancel-") as tmp,
        Processes(Path(tmp)) as procs,
    ):
        state = Path(tmp) / "state"
        state.mkdir()
        spec = StackSpec(
            model=MODEL, pricing=PRICING, profile="h100", engines=plan.engines, workers=1,
            state_dir=state, gateway_core=gateway_core, engine_core=engine_core,
        )  # fmt: skip
        stack = TenancyStack(procs, spec)
        stack.start_engines()
        stack.start_gateway()
        stack.wait_gateway()
        table = UsageTable(sqlite_path=state / "fleetserve.db")
        calibration_key = stack.new_key("calibration")
        stream_s = uvloop.run(time_one_stream(stack.url, calibration_key, plan.max_tokens))
        levels = []
        for concurrency in plan.levels:
            tenant = f"cancel-c{concurrency}"
            key = stack.new_key(tenant)
            points = cancel_points(plan, stream_s, random.Random(seed))
            results = uvloop.run(run_streams(stack.url, key, points, concurrency, plan, seed))
            found, wait_s, rows = uvloop.run(settle(table, tenant, results))
            wanted = {r.request_id for r in results if r.request_id}
            engine = engine_entries(stack.engine_urls, wanted)
            levels.append(Level(concurrency, results, found, wait_s, rows, engine))
        return stream_s, levels


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("each concurrency must be at least 1")
    return levels


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, help=f"streams per level ({FULL.streams})")
    parser.add_argument("--concurrency", type=_levels,
                        help="streams open at once, one level or a list run in turn "
                        f"({','.join(map(str, FULL.levels))})")  # fmt: skip
    parser.add_argument(
        "--max-tokens", type=int, help=f"max_tokens of each stream ({FULL.max_tokens})"
    )
    parser.add_argument("--engines", type=int, help=f"sim engines, profile h100 ({FULL.engines})")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few seconds: 20 streams")
    parser.add_argument("--gateway-core", type=int, default=0)
    parser.add_argument("--engine-core", type=int, default=1, help="engines and this client")
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    args.plan = Plan(
        streams=args.streams or base.streams,
        levels=args.concurrency or base.levels,
        max_tokens=args.max_tokens or base.max_tokens,
        engines=args.engines or base.engines,
    )
    if min(args.plan.streams, args.plan.engines) < 1:
        parser.error("--streams and --engines must be at least 1")
    if args.plan.max_tokens < 2:
        parser.error("--max-tokens must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    clean_environment()
    gateway_core = None if args.no_pin else args.gateway_core
    engine_core = None if args.no_pin else args.engine_core
    if engine_core is not None:
        pin_self(engine_core)
    plan: Plan = args.plan
    print("tenancy_cancel: cancelled streams are charged prompt + delivered tokens (issue 10, #3)")
    print(time.strftime("date    : %Y-%m-%d %H:%M:%S %Z"))
    print(machine_line())
    pin = (
        "nothing pinned" if args.no_pin
        else f"gateway on core {gateway_core}; engines and this client on core {engine_core}"
    )  # fmt: skip
    print(
        f"setup   : 1 gateway worker (--auth keys, SQLite ledger), {plan.engines} sim engine(s) "
        f"profile h100, model priced ${PRICING.input_per_mtok_usd:g} / "
        f"${PRICING.output_per_mtok_usd:g} per Mtok in / out; {plan.streams} streams per level "
        f"at {', '.join(map(str, plan.levels))} at once, max_tokens {plan.max_tokens}, "
        f"seed {args.seed}; {pin}",
        flush=True,
    )
    with sigterm_as_exit():
        stream_s, levels = run(plan, args.seed, gateway_core, engine_core)
    print(f"calib   : one whole stream, alone, took {stream_s:.3f} s (time cuts: 0 to that)")
    figures = [(level.concurrency, figures_of(level)) for level in levels]
    for concurrency, fig in figures:
        print()
        print(render_level(concurrency, fig, plan.max_tokens))
    print()
    print(render_summary(figures))
    ok = all(fig.all_met for _, fig in figures)
    print(f"verdict : {'every limit met' if ok else 'a limit was MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
