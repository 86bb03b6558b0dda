"""Load for the fairness benchmark: tenants that stay backlogged, and the service they get.

Each tenant sends streamed chat requests with its own key, either from `sessions` closed-loop
clients (each sends its next request as soon as the last one ends, so the tenant always has
requests waiting at a saturated gateway) or open loop at `rate_rps` (Poisson arrivals; latency
counts from the intended send time, so a late sender is charged for its lateness).

Service is counted as the client sees it, in VTC's unit: a request's prompt tokens when its
first content event arrives, and one output token per content event (the sim engine streams
one token per event), into 1 s bins of wall-clock time, so that windows line up with the
ledger's `started_at` / `ended_at`. Prompt tokens are counted client-side with the sim
engine's own tokenizer (`engines.sim.text`) and checked against each answer's `usage`.

Every loop is bounded in count and in time; everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

from fleetserve.engines.sim.text import chat_prompt_tokens
from fleetserve.protocol.sse import SseDecoder, chunk_has_content
from fleetserve.telemetry.quantiles import percentile_of

CHAT_PATH = "/v1/chat/completions"
BIN_S = 1.0
SAMPLE_S = 0.25  # how often the requests waiting for their first token are counted
MAX_REQUESTS_PER_CLIENT = 100_000  # a bound on every load loop besides its stop time
REQUEST_TIMEOUT_S = 600.0  # a held request waits at most the gateway's hold bound

_WORDS = (
    "fleet", "replica", "model", "token", "batch", "cache", "tenant", "queue", "share", "weight",
    "window", "request", "stream", "engine", "prefill", "decode", "budget", "limit", "ledger",
    "gateway", "slot", "latency", "service", "counter", "virtual", "fair", "priority",
    "interactive", "standard", "class", "starvation", "guard", "charge", "release", "order",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Shape:
    """What one tenant's requests look like: uniform ranges, inclusive."""

    prompt_words: tuple[int, int]
    max_tokens: tuple[int, int]

    def describe(self) -> str:
        (p0, p1), (m0, m1) = self.prompt_words, self.max_tokens
        words = f"{p0}" if p0 == p1 else f"{p0}-{p1}"
        out = f"{m0}" if m0 == m1 else f"{m0}-{m1}"
        return f"prompt {words} words, max_tokens {out}"


@dataclass(frozen=True, slots=True)
class TenantLoad:
    name: str
    key: str
    shape: Shape
    sessions: int = 0  # closed-loop clients
    rate_rps: float = 0.0  # open-loop Poisson arrivals (used when sessions == 0)
    start_after_s: float = 0.0  # from the phase's start
    seed: int = 0


@dataclass(slots=True)
class RequestRecord:
    tenant: str
    sched_wall: float  # intended send time (wall clock)
    ttft_s: float | None = None  # intended send -> first content event
    end_wall: float | None = None
    prompt_tokens: int = 0  # client-side count
    output_tokens: int = 0  # content events received
    usage: tuple[int, int] | None = None  # (prompt, completion) as the answer reported
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_wall is not None


@dataclass
class ServiceLog:
    """Tokens served to each tenant in 1 s bins from `t0` (wall clock), and the number of
    requests each had sent but not yet answered with a token, sampled every SAMPLE_S."""

    t0: float
    tokens: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    waiting_now: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    waiting_samples: dict[str, list[tuple[float, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def add(self, tenant: str, at_wall: float, tokens: int) -> None:
        bins = self.tokens[tenant]
        index = math.floor((at_wall - self.t0) / BIN_S)
        bins[index] = bins.get(index, 0) + tokens

    def served(self, tenant: str, start_s: float, end_s: float) -> int:
        """Tokens served to `tenant` in [start_s, end_s) from t0 (whole bins)."""
        bins = self.tokens.get(tenant, {})
        first, last = round(start_s / BIN_S), round(end_s / BIN_S)
        return sum(bins.get(i, 0) for i in range(first, last))

    def sample(self, tenants: Sequence[str]) -> None:
        now = time.time()
        for tenant in tenants:
            self.waiting_samples[tenant].append((now, self.waiting_now[tenant]))

    def waiting(self, tenant: str, start_s: float, end_s: float) -> tuple[float, float]:
        """(mean waiting, fraction of samples with at least one waiting) in the window."""
        lo, hi = self.t0 + start_s, self.t0 + end_s
        counts = [n for at, n in self.waiting_samples.get(tenant, []) if lo <= at < hi]
        if not counts:
            return 0.0, 0.0
        return sum(counts) / len(counts), sum(1 for n in counts if n > 0) / len(counts)


def make_prompt(rng: random.Random, load: TenantLoad, serial: int) -> tuple[str, int, int]:
    """(content, prompt tokens as the sim engine counts them, max_tokens). The first words
    are unique, so the engine's prefix cache does not make prefill free."""
    words = rng.randint(*load.shape.prompt_words)
    body = " ".join(rng.choice(_WORDS) for _ in range(max(0, words - 3)))
    content = f"{load.name} request {serial}: {body}".strip()
    tokens = len(chat_prompt_tokens([("user", content)]))
    return content, tokens, rng.randint(*load.shape.max_tokens)


@dataclass(frozen=True, slots=True)
class Target:
    url: str  # the gateway's chat completions URL
    model: str


async def _send(
    http: aiohttp.ClientSession,
    target: Target,
    load: TenantLoad,
    content: str,
    max_tokens: int,
    sched_perf: float,
    record: RequestRecord,
    log: ServiceLog,
) -> RequestRecord:
    """One streamed chat request; its service lands in `log` as it arrives."""
    body = orjson.dumps(
        {
            "model": target.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    headers = {"Authorization": f"Bearer {load.key}", "Content-Type": "application/json"}
    log.waiting_now[load.name] += 1
    waiting = True
    try:
        async with http.post(target.url, data=body, headers=headers) as response:
            if response.status != 200:
                await response.read()
                record.error = f"http_{response.status}"
                return record
            events = SseDecoder()
            done = False
            async for chunk in response.content.iter_any():
                now_wall = time.time()
                for payload in events.feed(chunk):
                    if payload == b"[DONE]":
                        done = True
                        continue
                    event = orjson.loads(payload)
                    if not isinstance(event, dict):
                        continue
                    if "error" in event:
                        record.error = f"stream_{event['error'].get('code') or 'error'}"
                        continue
                    usage = event.get("usage")
                    if isinstance(usage, dict):
                        record.usage = (
                            int(usage.get("prompt_tokens", 0)),
                            int(usage.get("completion_tokens", 0)),
                        )
                    if chunk_has_content(event):
                        if record.ttft_s is None:
                            record.ttft_s = time.perf_counter() - sched_perf
                            log.add(load.name, now_wall, record.prompt_tokens)
                            log.waiting_now[load.name] -= 1
                            waiting = False
                        record.output_tokens += 1
                        log.add(load.name, now_wall, 1)
            if record.error is None:
                if not done:
                    record.error = "no_done"
                else:
                    record.end_wall = time.time()
    except TimeoutError:
        record.error = "timeout"
    except aiohttp.ClientError as exc:
        record.error = f"client_{type(exc).__name__}"
    except ValueError:  # orjson.JSONDecodeError: not an OpenAI answer
        record.error = "bad_json"
    finally:
        if waiting:
            log.waiting_now[load.name] -= 1
    return record


@dataclass
class PhaseResult:
    records: list[RequestRecord] = field(default_factory=list)
    cut: int = 0  # requests still open at the stop (cancelled there, not counted as errors)

    def by_tenant(self, tenant: str) -> list[RequestRecord]:
        return [r for r in self.records if r.tenant == tenant]

    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for record in self.records:
            if record.error is not None:
                out[record.error] = out.get(record.error, 0) + 1
        return out


async def _closed_loop(
    http: aiohttp.ClientSession,
    target: Target,
    load: TenantLoad,
    client: int,
    stop_perf: float,
    log: ServiceLog,
    out: list[RequestRecord],
) -> None:
    rng = random.Random(f"{load.seed}-{load.name}-{client}")
    for serial in range(MAX_REQUESTS_PER_CLIENT):
        now = time.perf_counter()
        if now >= stop_perf:
            return
        content, tokens, max_tokens = make_prompt(
            rng, load, client * MAX_REQUESTS_PER_CLIENT + serial
        )
        record = await _send(
            http, target, load, content, max_tokens, now,
            RequestRecord(load.name, time.time(), prompt_tokens=tokens), log,
        )  # fmt: skip
        out.append(record)
        if record.error is not None and record.error.startswith("client_"):
            await asyncio.sleep(0.1)  # a refused connection: do not spin


async def _open_loop(
    http: aiohttp.ClientSession,
    target: Target,
    load: TenantLoad,
    stop_perf: float,
    log: ServiceLog,
    out: list[RequestRecord],
) -> None:
    rng = random.Random(f"{load.seed}-{load.name}-open")
    tasks: list[asyncio.Task[None]] = []

    async def one(content: str, tokens: int, max_tokens: int, sched: float) -> None:
        record = RequestRecord(load.name, time.time() - (time.perf_counter() - sched),
                               prompt_tokens=tokens)  # fmt: skip
        out.append(await _send(http, target, load, content, max_tokens, sched, record, log))

    at = time.perf_counter()
    try:
        for serial in range(MAX_REQUESTS_PER_CLIENT):
            at += rng.expovariate(load.rate_rps)
            if at >= stop_perf:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            content, tokens, max_tokens = make_prompt(rng, load, serial)
            tasks.append(asyncio.create_task(one(content, tokens, max_tokens, at)))
        if tasks:
            await asyncio.wait(tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_phase(
    base_url: str, model: str, loads: Sequence[TenantLoad], duration_s: float, log: ServiceLog
) -> PhaseResult:
    """Drive every load for `duration_s` (each from its `start_after_s`), then cancel what is
    still open. Bounded: every client stops at the phase's end, and the phase returns within
    a few seconds after it."""
    target = Target(base_url + CHAT_PATH, model)
    result = PhaseResult()
    t0 = time.perf_counter()
    stop = t0 + duration_s
    clients = sum(max(1, load.sessions) for load in loads)
    connector = aiohttp.TCPConnector(limit=clients + 64)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    names = [load.name for load in loads]
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as http:

        async def delayed(load: TenantLoad) -> None:
            await asyncio.sleep(max(0.0, t0 + load.start_after_s - time.perf_counter()))
            if load.sessions > 0:
                await asyncio.gather(
                    *(
                        _closed_loop(http, target, load, i, stop, log, result.records)
                        for i in range(load.sessions)
                    )
                )
            else:
                await _open_loop(http, target, load, stop, log, result.records)

        async def sampler() -> None:
            for _ in range(math.ceil(duration_s / SAMPLE_S) + 1):
                log.sample(names)
                await asyncio.sleep(SAMPLE_S)

        tasks = [asyncio.create_task(delayed(load)) for load in loads]
        sampling = asyncio.create_task(sampler())
        _, pending = await asyncio.wait(tasks, timeout=duration_s)
        result.cut = sum(log.waiting_now[name] for name in names)  # approximate, for the log
        for task in (*pending, sampling):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, sampling, return_exceptions=True)
    return result


def ttft_ms(records: Sequence[RequestRecord], pct: float) -> float | None:
    values = [r.ttft_s for r in records if r.ttft_s is not None and r.error is None]
    value = percentile_of(values, pct)
    return None if value is None else value * 1000.0
