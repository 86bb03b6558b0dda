"""Which picker should be the gateway's default: the four pickers under one mixed load.

For each picker (round_robin, least_outstanding, p2c, prefix_affinity) a fresh fleet of four
SIMULATED a10g engines (`fleetserve engine sim`, cold start 0) runs behind one gateway process
(`fleetserve gateway --picker NAME`), and an open-loop Poisson load of streaming chat requests
runs at two fractions of the fleet's capacity. The workload mixes

(a) shared-prefix traffic: 8 tenants, each with its own ~1,500-token system prompt and short,
    distinct user turns; tenant popularity is Zipf-skewed, so one prefix is hot. It rewards
    prefix affinity (a cache hit skips ~0.7 s of a10g prefill);
(b) unique prompts of 32-1,024 tokens (log-uniform), which reward load balancing;

and every request asks for 16-128 output tokens. Every picker gets the same requests at the
same intended send times (same seeds). Each fleet starts with every engine's prefix cache
primed with every system prompt (a fleet that has served a while), then warms up at the load's
rate before each measured window. Capacity is measured once per invocation: completed
requests/s of a saturated closed loop under least_outstanding, the cache-blind balancer.
Latency counts from each request's intended send time (no coordinated omission).

    .venv/bin/python -m benchmarks.routing_compare              # one run, about 7 minutes
    .venv/bin/python -m benchmarks.routing_compare --repeat 2   # min/median over 2 runs
    .venv/bin/python -m benchmarks.routing_compare --quick      # smoke run, about 2-3 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import http.client
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import aiohttp
import orjson
import psutil
import uvloop

from benchmarks._harness import CpuWindow, SseCheck, sigterm_as_exit
from fleetserve.engines.sim.text import count_tokens
from fleetserve.fleet.processes import free_port
from fleetserve.telemetry.quantiles import percentile_of
from fleetserve.testing.stack import (
    SimStack,
    fleetserve_argv,
    gateway_argv,
    services,
    sim_engine_argv,
)

MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
PICKERS = ("round_robin", "least_outstanding", "p2c", "prefix_affinity")
CAPACITY_PICKER = "least_outstanding"
REPLICA_HEADER = "x-fleetserve-replica"
REPLICAS = 4
PROFILE = "a10g"
# Engine overrides of the a10g profile, and why:
# - max_num_seqs 32 (a10g: 256). Saturated, the fleet then streams at most 4 x 32 sequences,
#   about 2,000 tokens/s through the gateway into this one client process. With 256 it would
#   stream several times that, more than this 2-core machine can proxy and parse next to the
#   four engines, and the figures would measure the CPU instead of the picker.
# - kv_capacity_tokens 8,192 (a10g: 25,872). The 8 system prompts (~12.3k tokens) then exceed
#   one replica's cache but fit the fleet's (32.8k): the regime of a real fleet, whose tenants'
#   prompts, RAG contexts and conversations outgrow one replica's cache. With the full cache
#   every replica holds all 8 prefixes whatever the routing, and the benchmark could not show
#   what affinity buys; `--kv-capacity-tokens 25872` measures that regime.
MAX_NUM_SEQS = 32
KV_CAPACITY_TOKENS = 8192
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 60.0
TIE_FRAC = 0.05  # TTFT p95 within 5% of the best counts as a tie
_WORD_TEXT = """time person year way day thing world life hand part child eye place work week
    case point number group problem fact account answer batch cache queue replica model token
    stream river stone light green signal engine scale order price table window system letter
    market report policy budget tenant owner server region review summary detail figure method"""
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class Plan:
    """How long each part runs; FULL keeps one run near seven minutes."""

    probe_warmup_s: float
    probe_s: float
    warmup_s: float
    measure_s: float
    loads: tuple[float, ...] = (0.5, 0.85)  # fractions of the measured capacity


FULL = Plan(probe_warmup_s=5, probe_s=15, warmup_s=8, measure_s=30)
QUICK = Plan(probe_warmup_s=3, probe_s=8, warmup_s=2, measure_s=6)


@dataclass(frozen=True, slots=True)
class Workload:
    groups: int = 8
    system_tokens: int = 1536  # words of each system prompt (one sim token each)
    shared_frac: float = 0.6
    group_skew: float = 1.0  # Zipf exponent of tenant popularity; 0 = uniform
    user_tokens: tuple[int, int] = (8, 48)
    unique_tokens: tuple[int, int] = (32, 1024)  # log-uniform
    output_tokens: tuple[int, int] = (16, 128)  # uniform

    def group_shares(self) -> list[float]:
        weights = [1.0 / (g + 1) ** self.group_skew for g in range(self.groups)]
        return [w / sum(weights) for w in weights]


DEFAULT_WORKLOAD = Workload()


@dataclass(frozen=True, slots=True)
class Setup:
    workload: Workload
    max_num_seqs: int
    kv_capacity_tokens: int

    def engine_args(self) -> tuple[str, ...]:
        return ("--cold-start-s", "0", "--max-num-seqs", str(self.max_num_seqs),
                "--kv-capacity-tokens", str(self.kv_capacity_tokens))  # fmt: skip


@dataclass(frozen=True, slots=True)
class PickerVariant:
    name: str
    load_factor: float | None = None  # prefix affinity's bound; None = the gateway's default

    @property
    def label(self) -> str:
        return self.name if self.load_factor is None else f"{self.name}@{self.load_factor:g}"


# --- workload ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatRequest:
    group: int  # tenant of a shared-prefix request; -1 for a unique prompt
    body: bytes
    max_tokens: int


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def system_prompt(group: int, tokens: int) -> str:
    """Tenant `group`'s system prompt: the same text in every run and process."""
    head = f"You are the assistant of tenant {group}. Follow these rules."
    return f"{head} {_words(random.Random(f'tenant-{group}'), tokens - count_tokens(head))}"


class RequestMaker:
    """Draws the mixed workload's requests from one seed: the same sequence for every picker."""

    def __init__(self, workload: Workload, seed: int) -> None:
        self.workload = workload
        self._rng = random.Random(seed)
        self._seed = seed
        self._serial = 0
        self._systems = [system_prompt(g, workload.system_tokens) for g in range(workload.groups)]
        self._cum_shares = list(accumulate(workload.group_shares()))

    def __iter__(self) -> Iterator[ChatRequest]:
        return self

    def __next__(self) -> ChatRequest:
        w, rng = self.workload, self._rng
        self._serial += 1
        tag = f"{self._seed}-{self._serial}"
        if rng.random() < w.shared_frac:
            group = self._draw_group()
            user = f"Question {tag}: {_words(rng, rng.randint(*w.user_tokens))}"
            messages = [
                {"role": "system", "content": self._systems[group]},
                {"role": "user", "content": user},
            ]
        else:
            group = -1
            lo, hi = w.unique_tokens
            n = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            messages = [{"role": "user", "content": f"Ticket {tag}: {_words(rng, n)}"}]
        max_tokens = rng.randint(*w.output_tokens)
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True}
        return ChatRequest(group, orjson.dumps(body), max_tokens)

    def _draw_group(self) -> int:
        u = self._rng.random()
        return next((i for i, c in enumerate(self._cum_shares) if u < c), self.workload.groups - 1)


def poisson_arrivals(
    maker: RequestMaker, rate_rps: float, duration_s: float, seed: int
) -> list[tuple[float, ChatRequest]]:
    """Intended send offsets (exponential gaps) and their requests, drawn before the run."""
    rng = random.Random(seed)
    out: list[tuple[float, ChatRequest]] = []
    t = rng.expovariate(rate_rps)
    cap = int(rate_rps * duration_s * 2) + 10  # bounded even for an unlucky draw
    while t < duration_s and len(out) < cap:
        out.append((t, next(maker)))
        t += rng.expovariate(rate_rps)
    return out


# --- client --------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    request: ChatRequest
    t_sched: float
    ok: bool = False
    error: str = ""
    replica: str = "?"
    ttft_s: float | None = None
    e2e_s: float | None = None
    done_at: float = 0.0


async def stream_one(
    session: aiohttp.ClientSession, url: str, req: ChatRequest, t_sched: float
) -> Outcome:
    """Send one streaming request; check the stream carries exactly max_tokens content chunks."""
    out = Outcome(req, t_sched)
    try:
        async with session.post(url, data=req.body) as response:
            out.replica = response.headers.get(REPLICA_HEADER, "?")
            if response.status != 200:
                await response.read()
                out.error = f"http_{response.status}"
                return out
            check = SseCheck()
            async for chunk in response.content.iter_any():
                if check.feed(chunk) and out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - t_sched
            end = time.perf_counter()
            if not check.valid or out.ttft_s is None:
                out.error = "bad_stream"
            elif check.content_chunks != req.max_tokens:
                out.error = "wrong_length"
            else:
                out.ok, out.e2e_s = True, end - t_sched
    except TimeoutError:
        out.error = "timeout"
    except aiohttp.ClientError as exc:
        out.error = f"client_{type(exc).__name__}"
    except ValueError:  # orjson.JSONDecodeError: not an OpenAI event
        out.error = "bad_json"
    finally:
        out.done_at = time.perf_counter()
    return out


def _session(timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4096),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"Content-Type": "application/json"},
        auto_decompress=False,
    )


@dataclass
class LoadRun:
    t0: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    send_lag_s: list[float] = field(default_factory=list)
    unfinished: int = 0


async def open_loop(
    url: str, arrivals: Sequence[tuple[float, ChatRequest]], timeout_s: float
) -> LoadRun:
    """Send each request at its intended time; wait at most timeout_s + 1 s after the last."""
    run = LoadRun()
    loop = asyncio.get_running_loop()
    async with _session(timeout_s) as session:
        tasks: list[asyncio.Task[Outcome]] = []
        run.t0 = time.perf_counter() + 0.05
        for offset, req in arrivals:
            t_sched = run.t0 + offset
            delay = t_sched - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            run.send_lag_s.append(time.perf_counter() - t_sched)
            tasks.append(loop.create_task(stream_one(session, url, req, t_sched)))
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s + 1.0)
        for task in tasks:
            if task.done():
                run.outcomes.append(task.result())
            else:
                task.cancel()
                run.unfinished += 1
        await asyncio.gather(*tasks, return_exceptions=True)
    return run


@dataclass(frozen=True, slots=True)
class Capacity:
    rps: float
    out_tok_s: float
    completed: int
    errors: int
    concurrency: int


async def closed_loop(
    url: str, maker: RequestMaker, concurrency: int, warmup_s: float, measure_s: float
) -> Capacity:
    """`concurrency` back-to-back clients; what completes inside the measured window counts.

    At the window's end the clients are cancelled, which closes their streams (the gateway then
    aborts them in the engines).
    """
    done: list[Outcome] = []
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + measure_s)
    async with _session(REQUEST_TIMEOUT_S) as session:

        async def client() -> None:
            while time.perf_counter() < window[1]:
                done.append(await stream_one(session, url, next(maker), time.perf_counter()))

        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
        await asyncio.sleep(window[1] - time.perf_counter())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    inside = [o for o in done if window[0] <= o.done_at <= window[1]]
    ok = [o for o in inside if o.ok]
    tokens = sum(o.request.max_tokens for o in ok)
    return Capacity(len(ok) / measure_s, tokens / measure_s, len(ok), len(inside) - len(ok),
                    concurrency)  # fmt: skip


# --- fleet ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunningFleet:
    gateway_url: str
    engine_urls: tuple[str, ...]
    replica_ids: tuple[str, ...]  # as the gateway's replica header names them, engine order
    pids: tuple[int, ...]  # engines and gateway


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    host_port, _, path = url.split("://", 1)[1].partition("/")
    conn = http.client.HTTPConnection(host_port, timeout=timeout_s)
    try:
        conn.request("GET", "/" + path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _wait_fleet_ready(gateway_url: str, replicas: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, ValueError):
            status, body = _get(gateway_url + "/admin/fleet")
            if status == 200 and orjson.loads(body).get("ready") == replicas:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not see {replicas} ready replicas in time")
        time.sleep(0.1)


@contextlib.contextmanager
def fleet(setup: Setup, picker: PickerVariant) -> Iterator[RunningFleet]:
    """Four sim engines and a gateway with `picker`, stopped by PID when the block ends."""
    with services() as started:
        engines = []
        for i in range(REPLICAS):
            port = free_port()
            argv = sim_engine_argv(port, MODEL, PROFILE, setup.engine_args())
            engines.append(started.start(f"engine-{i}", argv, port))
        for engine in engines:
            engine.wait_ok("/health", START_TIMEOUT_S)
        urls = [e.url for e in engines]
        port = free_port()
        if picker.load_factor is None:
            argv = gateway_argv(port, MODEL, urls, "sim", ("--picker", picker.name))
        else:  # the load factor is a fleet-file setting only
            spec = {"name": MODEL, "engine": "sim", "picker": picker.name, "replicas": urls,
                    "prefix_load_factor": picker.load_factor}  # fmt: skip
            path = started.log_dir / "fleet.yaml"
            path.write_bytes(orjson.dumps({"models": [spec]}))  # JSON is YAML
            argv = fleetserve_argv("gateway", "--port", str(port), "--fleet-file", str(path))
        gateway = started.start("gateway", argv, port)
        gateway.wait_ok("/ready", START_TIMEOUT_S)
        _wait_fleet_ready(gateway.url, REPLICAS, START_TIMEOUT_S)
        ids = tuple(SimStack.replica_id(e) for e in engines)
        pids = tuple(s.pid for s in (*engines, gateway))
        yield RunningFleet(gateway.url, tuple(urls), ids, pids)


async def prime_caches(engine_urls: Sequence[str], workload: Workload) -> None:
    """Every tenant's system prompt once on every engine, the hottest last (LRU keeps it).

    The caches then look like those of a fleet that has served a while, not of one just
    started; where they are too small for every prefix, the warm-up's traffic soon evicts
    what the picker does not keep sending.
    """
    shares = workload.group_shares()
    tenants = sorted(range(workload.groups), key=lambda g: shares[g])
    bodies = [
        orjson.dumps({"model": MODEL, "max_tokens": 1, "messages": [
            {"role": "system", "content": system_prompt(g, workload.system_tokens)},
            {"role": "user", "content": "Hello."}]})
        for g in tenants
    ]  # fmt: skip

    async def prime(session: aiohttp.ClientSession, url: str) -> None:
        for body in bodies:
            async with session.post(url + CHAT_PATH, data=body) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"priming {url} failed: HTTP {response.status}")

    async with _session(REQUEST_TIMEOUT_S) as session:
        await asyncio.gather(*(prime(session, url) for url in engine_urls))


PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"


def prefix_counters(engine_urls: Sequence[str]) -> tuple[float, float]:
    """Prefix-cache (queries, hits) in tokens, summed over the engines' /metrics."""
    queries = hits = 0.0
    for url in engine_urls:
        _, body = _get(url + "/metrics")
        for line in body.decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name == PREFIX_QUERIES:
                queries += float(line.rsplit(" ", 1)[1])
            elif name == PREFIX_HITS:
                hits += float(line.rsplit(" ", 1)[1])
    return queries, hits


# --- one point: measurement and figures ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Point:
    picker: str
    load_frac: float
    rate_rps: float
    sent: int
    ok: int
    errors: dict[str, int]
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    out_tok_s: float
    hit_rate: float | None  # prefix-cache hit tokens / prompt tokens, all engines
    per_replica: tuple[int, ...]  # requests served, engine order
    home_share: float | None  # shared-prefix requests served by their tenant's top replica
    hot_split: tuple[int, ...]  # the hottest tenant's requests per replica, engine order
    send_lag_p99_ms: float | None
    cpu_busy_pct: float  # the machine's CPU busy over the window, mean of the cores
    own_cpu_pct: float  # engines + gateway + this client; 100 = one core

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def spread(self) -> float:
        """Most over fewest requests served by one replica (inf when one got none)."""
        lo, hi = min(self.per_replica), max(self.per_replica)
        return math.inf if lo == 0 else hi / lo

    def figures(self) -> dict[str, float | None]:
        """The numbers that --repeat aggregates."""
        return {
            "ttft_p50_ms": self.ttft_p50_ms, "ttft_p95_ms": self.ttft_p95_ms,
            "ttft_p99_ms": self.ttft_p99_ms, "e2e_p50_ms": self.e2e_p50_ms,
            "e2e_p99_ms": self.e2e_p99_ms, "out_tok_s": self.out_tok_s,
            "errors": float(self.error_count), "hit_rate": self.hit_rate,
            "spread": self.spread, "home_share": self.home_share,
        }  # fmt: skip


def _ms(values: Sequence[float], pct: float) -> float | None:
    value = percentile_of(values, pct)
    return None if value is None else value * 1000.0


def summarise(
    picker: str,
    load_frac: float,
    rate_rps: float,
    run: LoadRun,
    replica_ids: Sequence[str],
    prefix_delta: tuple[float, float],
    cpu_pct: tuple[float, float],
) -> Point:
    ok = [o for o in run.outcomes if o.ok]
    errors = Counter(o.error for o in run.outcomes if not o.ok)
    if run.unfinished:
        errors["unfinished"] += run.unfinished
    served = Counter(o.replica for o in run.outcomes if o.replica != "?")
    by_group: dict[int, Counter[str]] = {}
    for o in run.outcomes:
        if o.request.group >= 0 and o.replica != "?":
            by_group.setdefault(o.request.group, Counter())[o.replica] += 1
    shared = sum(sum(c.values()) for c in by_group.values())
    home = sum(max(c.values()) for c in by_group.values())
    hot = by_group.get(0, Counter())
    last_done = max((o.done_at for o in ok), default=run.t0)
    tokens = sum(o.request.max_tokens for o in ok)
    queries, hits = prefix_delta
    return Point(
        picker=picker,
        load_frac=load_frac,
        rate_rps=rate_rps,
        sent=len(run.send_lag_s),
        ok=len(ok),
        errors=dict(errors),
        ttft_p50_ms=_ms([o.ttft_s for o in ok if o.ttft_s is not None], 50),
        ttft_p95_ms=_ms([o.ttft_s for o in ok if o.ttft_s is not None], 95),
        ttft_p99_ms=_ms([o.ttft_s for o in ok if o.ttft_s is not None], 99),
        e2e_p50_ms=_ms([o.e2e_s for o in ok if o.e2e_s is not None], 50),
        e2e_p99_ms=_ms([o.e2e_s for o in ok if o.e2e_s is not None], 99),
        out_tok_s=tokens / max(last_done - run.t0, 1e-9),
        hit_rate=hits / queries if queries > 0 else None,
        per_replica=tuple(served.get(r, 0) for r in replica_ids),
        home_share=home / shared if shared else None,
        hot_split=tuple(hot.get(r, 0) for r in replica_ids),
        send_lag_p99_ms=_ms(run.send_lag_s, 99),
        cpu_busy_pct=cpu_pct[0],
        own_cpu_pct=cpu_pct[1],
    )


def _cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds used so far by `pids` and by this process."""
    total = 0.0
    for pid in (*pids, os.getpid()):
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def _run_loop(url: str, arrivals: Sequence[tuple[float, ChatRequest]]) -> LoadRun:
    """One open-loop run on a fresh uvloop with the GC paused (its pauses would add latency)."""
    gc.collect()
    gc.disable()
    try:
        run: LoadRun = uvloop.run(open_loop(url, arrivals, REQUEST_TIMEOUT_S))
        return run
    finally:
        gc.enable()


def measure_picker(
    setup: Setup,
    plan: Plan,
    picker: PickerVariant,
    capacity_rps: float,
    seed: int,
    say: Callable[[str], None],
) -> list[Point]:
    """A fresh fleet with `picker`, caches primed; each load level: warm-up, measured run."""
    points = []
    with fleet(setup, picker) as running:
        url = running.gateway_url + CHAT_PATH
        uvloop.run(prime_caches(running.engine_urls, setup.workload))
        for level, frac in enumerate(plan.loads):
            rate = capacity_rps * frac
            level_seed = seed * 100 + level
            say(f"  {picker.label}: {frac:.0%} load, {rate:.2f} req/s: warm-up, measure ...")
            warm = RequestMaker(setup.workload, level_seed + 50)
            _run_loop(url, poisson_arrivals(warm, rate, plan.warmup_s, level_seed + 50))
            maker = RequestMaker(setup.workload, level_seed)
            arrivals = poisson_arrivals(maker, rate, plan.measure_s, level_seed)
            before = prefix_counters(running.engine_urls)
            machine, own_s, wall_s = CpuWindow([]), _cpu_s(running.pids), time.monotonic()
            machine.start()
            run = _run_loop(url, arrivals)
            busy = statistics.fmean(machine.stop().core_busy_pct)
            own = 100 * (_cpu_s(running.pids) - own_s) / (time.monotonic() - wall_s)
            after = prefix_counters(running.engine_urls)
            delta = (after[0] - before[0], after[1] - before[1])
            points.append(
                summarise(picker.label, frac, rate, run, running.replica_ids, delta, (busy, own))
            )
    return points


def measure_capacity(setup: Setup, plan: Plan, say: Callable[[str], None]) -> Capacity:
    """Saturated closed loop under the cache-blind balancer: the fleet's completed req/s.

    One client per sequence slot of the fleet keeps every engine busy with a queue waiting: the
    KV cache admits fewer than max_num_seqs of this workload (64 to 192 clients measured within
    10% of each other).
    """
    concurrency = REPLICAS * setup.max_num_seqs
    say(f"capacity: closed loop, {concurrency} clients, picker {CAPACITY_PICKER} ...")
    with fleet(setup, PickerVariant(CAPACITY_PICKER)) as running:
        url = running.gateway_url + CHAT_PATH
        uvloop.run(prime_caches(running.engine_urls, setup.workload))
        maker = RequestMaker(setup.workload, seed=7)
        return uvloop.run(closed_loop(url, maker, concurrency, plan.probe_warmup_s, plan.probe_s))


# --- rendering -----------------------------------------------------------------------------


def _f(value: float | None, spec: str = ".0f") -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return format(value, spec)


COLUMNS = (  # header, figure, format, width
    ("TTFT p50", "ttft_p50_ms", ",.0f", 8), ("p95", "ttft_p95_ms", ",.0f", 7),
    ("p99", "ttft_p99_ms", ",.0f", 7), ("e2e p50", "e2e_p50_ms", ",.0f", 7),
    ("p99", "e2e_p99_ms", ",.0f", 7), ("out tok/s", "out_tok_s", ",.0f", 9),
    ("err", "errors", ".0f", 4), ("hit %", "hit_rate", ".1%", 6),
    ("spread", "spread", ".2f", 6), ("home %", "home_share", ".0%", 6),
)  # fmt: skip


def _header(extra: str = "") -> str:
    cols = " ".join(f"{h:>{w}}" for h, _, _, w in COLUMNS)
    return f"  {'picker':<22} {'load':>4} {'req/s':>6} {cols}{extra}"


def _row(picker: str, frac: float, rate: float, figures: dict[str, float | None]) -> str:
    cells = []
    for _, key, spec, width in COLUMNS:
        value = figures.get(key)
        shown = _f(None if value is None else value * 100, spec[:-1] + "f") + "%"
        if value is None or not spec.endswith("%"):
            shown = _f(value, spec)
        cells.append(f"{shown:>{width}}")
    return f"  {picker:<22} {frac:>4.0%} {rate:>6.2f} " + " ".join(cells)


def render_run(points: Sequence[Point]) -> str:
    lines = [
        "latency in ms from the intended send time; hit % = prefix-cache hit tokens / prompt "
        "tokens over the 4 engines; spread = max/min requests per replica; home % = "
        "shared-prefix requests on their tenant's most-used replica",
        _header("  ok/sent lag p99  cpu % own %"),
    ]
    for p in points:
        lines.append(
            _row(p.picker, p.load_frac, p.rate_rps, p.figures())
            + f"  {p.ok:>3}/{p.sent:<3} {_f(p.send_lag_p99_ms, '.1f'):>7} {p.cpu_busy_pct:>6.0f}"
            + f" {p.own_cpu_pct:>5.0f}"
        )
    lines.append("  requests per replica (engine order) | hottest tenant's requests per replica:")
    for p in points:
        errors = ", ".join(f"{k}={v}" for k, v in sorted(p.errors.items())) or "no errors"
        lines.append(
            f"    {p.picker:<22} {p.load_frac:>4.0%}  {'/'.join(map(str, p.per_replica)):<17} | "
            f"{'/'.join(map(str, p.hot_split)):<15} {errors}"
        )
    return "\n".join(lines)


def aggregate(
    runs: Sequence[Sequence[Point]], how: Callable[[Sequence[float]], float]
) -> dict[tuple[str, float], dict[str, float | None]]:
    """One figure set per (picker, load) across runs: `how` over the runs that have a value."""
    keyed: dict[tuple[str, float], list[dict[str, float | None]]] = {}
    for points in runs:
        for p in points:
            keyed.setdefault((p.picker, p.load_frac), []).append(p.figures())
    out: dict[tuple[str, float], dict[str, float | None]] = {}
    for key, figs in keyed.items():
        out[key] = {}
        for name in figs[0]:
            values = [v for f in figs if (v := f[name]) is not None]
            out[key][name] = how(values) if values else None
    return out


def verdict(medians: dict[tuple[str, float], dict[str, float | None]], high: float) -> str:
    """Lowest TTFT p95 at the high load among error-free pickers; ties by p99, then tokens/s."""

    def fig(picker: str, name: str, missing: float) -> float:
        value = medians[(picker, high)].get(name)
        return missing if value is None else value

    pickers = [p for p, frac in medians if frac == high]
    clean = [p for p in pickers if fig(p, "errors", 1.0) == 0] or pickers
    best_p95 = min(fig(p, "ttft_p95_ms", math.inf) for p in clean)
    tied = [p for p in clean if fig(p, "ttft_p95_ms", math.inf) <= best_p95 * (1 + TIE_FRAC)]
    tied.sort(key=lambda p: (fig(p, "ttft_p99_ms", math.inf), -fig(p, "out_tok_s", 0.0)))
    best = tied[0]
    ranked = sorted(clean, key=lambda p: fig(p, "ttft_p95_ms", math.inf))
    order = ", ".join(f"{p} {fig(p, 'ttft_p95_ms', math.inf):,.0f}" for p in ranked)
    tie_note = f"; tied within {TIE_FRAC:.0%} with {', '.join(tied[1:])}" if len(tied) > 1 else ""
    return (
        f"VERDICT: {best} is best. Criterion: lowest median TTFT p95 at {high:.0%} load among "
        f"pickers without errors (within {TIE_FRAC:.0%} = tie, broken by TTFT p99, then output "
        f"tokens/s). TTFT p95 ms: {order}{tie_note}."
    )


def render_summary(runs: Sequence[Sequence[Point]], plan: Plan) -> str:
    medians = aggregate(runs, statistics.median)
    mins = aggregate(runs, min)
    rates = {(p.picker, p.load_frac): p.rate_rps for p in runs[0]}
    lines = []
    for title, table in ((f"median over {len(runs)} run(s)", medians), ("min", mins)):
        if title == "min" and len(runs) == 1:
            continue
        lines += [f"Summary: {title}", _header()]
        for frac in plan.loads:
            for (picker, f), figs in table.items():
                if f == frac:
                    lines.append(_row(picker, frac, rates[(picker, frac)], figs))
        lines.append("")
    lines.append(verdict(medians, max(plan.loads)))
    return "\n".join(lines)


def machine_facts(setup: Setup, plan: Plan) -> str:
    w = setup.workload
    load1, load5, _ = os.getloadavg()
    system = count_tokens(system_prompt(0, w.system_tokens))
    shares = ", ".join(f"{s:.0%}" for s in w.group_shares())
    return "\n".join(
        [
            f"machine : {os.cpu_count()} cores, load average {load1:.2f} / {load5:.2f} (1/5 min) "
            "at start; nothing pinned (4 engines, gateway and this client share the cores)",
            f"fleet   : {REPLICAS} x `fleetserve engine sim --profile {PROFILE} "
            f"{' '.join(setup.engine_args())}` (SIMULATED vLLM) behind 1 gateway worker, "
            "production health/scrape intervals",
            f"workload: {w.shared_frac:.0%} shared-prefix: {w.groups} tenants, system prompt "
            f"{system} tokens, user turn {w.user_tokens[0]}-{w.user_tokens[1]} words, tenant "
            f"shares (Zipf {w.group_skew:g}) {shares}; {1 - w.shared_frac:.0%} unique prompts "
            f"{w.unique_tokens[0]}-{w.unique_tokens[1]} words (log-uniform); output "
            f"{w.output_tokens[0]}-{w.output_tokens[1]} tokens (uniform); streaming chat",
            f"load    : open loop, Poisson arrivals, {plan.warmup_s:g} s warm-up then "
            f"{plan.measure_s:g} s measured per level; levels "
            f"{', '.join(f'{x:.0%}' for x in plan.loads)} of capacity, low then high on one "
            "fleet per picker",
        ]
    )


# --- main ----------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=1, help="full runs (fresh fleets each)")
    ap.add_argument("--quick", action="store_true", help="smoke run: short windows")
    ap.add_argument("--capacity-rps", type=float, help="skip the capacity probe; use this")
    ap.add_argument("--pickers", default=",".join(PICKERS), help="comma-separated subset")
    ap.add_argument(
        "--affinity-load-factors", default="",
        help="also run prefix_affinity with these bounds (comma-separated, e.g. 1.1,2)",
    )  # fmt: skip
    ap.add_argument("--max-num-seqs", type=int, default=MAX_NUM_SEQS)
    ap.add_argument("--kv-capacity-tokens", type=int, default=KV_CAPACITY_TOKENS)
    ap.add_argument("--groups", type=int, default=DEFAULT_WORKLOAD.groups)
    ap.add_argument("--group-skew", type=float, default=DEFAULT_WORKLOAD.group_skew)
    ap.add_argument("--shared-frac", type=float, default=DEFAULT_WORKLOAD.shared_frac)
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    args = ap.parse_args(argv)
    if not 1 <= args.repeat <= 10:
        ap.error("--repeat must be between 1 and 10")
    unknown = set(args.pickers.split(",")) - set(PICKERS)
    if unknown:
        ap.error(f"unknown pickers: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    plan = QUICK if args.quick else FULL
    workload = Workload(groups=args.groups, group_skew=args.group_skew,
                        shared_frac=args.shared_frac)  # fmt: skip
    setup = Setup(workload, args.max_num_seqs, args.kv_capacity_tokens)
    variants = [PickerVariant(p) for p in args.pickers.split(",")]
    variants += [
        PickerVariant("prefix_affinity", float(x))
        for x in args.affinity_load_factors.split(",")
        if x
    ]

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.monotonic()
    print("routing_compare: the gateway's pickers under a mixed prefix-sharing / unique load")
    print(time.strftime("date    : %Y-%m-%d %H:%M:%S %Z"))
    print(machine_facts(setup, plan), flush=True)
    runs: list[list[Point]] = []
    capacity: Capacity | None = None
    with sigterm_as_exit():
        if args.capacity_rps is not None:
            capacity_rps = args.capacity_rps
            print(f"capacity: {capacity_rps:.2f} req/s (given with --capacity-rps)")
        else:
            capacity = measure_capacity(setup, plan, say)
            capacity_rps = capacity.rps
            print(
                f"capacity: {capacity.rps:.2f} req/s, {capacity.out_tok_s:,.0f} output tokens/s "
                f"({capacity.completed} completed, {capacity.errors} errors in {plan.probe_s:g} s "
                f"after {plan.probe_warmup_s:g} s; closed loop, {capacity.concurrency} clients, "
                f"{CAPACITY_PICKER})",
                flush=True,
            )
        for i in range(args.repeat):
            say(f"run {i + 1}/{args.repeat}")
            # Rotate the order per run so that a drift in machine load hits every picker.
            order = variants[i % len(variants) :] + variants[: i % len(variants)]
            points: list[Point] = []
            for variant in order:
                points += measure_picker(setup, plan, variant, capacity_rps, i + 1, say)
            points.sort(key=lambda p: (p.load_frac, [v.label for v in variants].index(p.picker)))
            runs.append(points)
            print(f"\n== run {i + 1}/{args.repeat} (picker order: "
                  f"{', '.join(v.label for v in order)}) ==")  # fmt: skip
            print(render_run(points), flush=True)
    print()
    print(render_summary(runs, plan))
    load1, load5, _ = os.getloadavg()
    print(f"done in {time.monotonic() - started:.0f} s; load average {load1:.2f} / {load5:.2f} "
          "at the end")  # fmt: skip
    if args.json:
        data = {
            "plan": dataclasses.asdict(plan),
            "setup": dataclasses.asdict(setup),
            "capacity": None if capacity is None else dataclasses.asdict(capacity),
            "capacity_rps": capacity_rps,
            "runs": [[dataclasses.asdict(p) | {"spread": p.spread} for p in r] for r in runs],
        }
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0 if all(p.error_count == 0 for r in runs for p in r) else 1


if __name__ == "__main__":
    sys.exit(main())
