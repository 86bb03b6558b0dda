"""The load side of benchmarks/tenancy_limits.py: impatient clients spread over two gateways,
and the samplers that watch the engines and the limiter's Redis keys while they run.

Every client loops until its deadline (and at most `MAX_ATTEMPTS` times): it sends, waits a
jittered pause (also when refused: not the Retry-After, so that demand stays far above every
limit) and sends again. It records each attempt with the client's own `time.time()` before the
send and after the answer: the server decided somewhere in between. A client whose gateway
died moves to the other one, as a load balancer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from redis.asyncio import Redis

from benchmarks._harness import SseCheck

REDIS_URL = "redis://127.0.0.1:6379/0"
MAX_ATTEMPTS = 1_000_000  # per client: a bound, never reached at these pauses
US = 1_000_000
_GAUGE = re.compile(rb"^vllm:num_requests_(running|waiting)\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class Attempt:
    """One request as its client saw it."""

    tenant: str
    gateway: int  # 0 or 1
    sent_us: int
    answered_us: int = 0  # the status line arrived (for a stream: admitted and started)
    ended_us: int = 0
    status: int = 0  # 0: no answer (the connection failed or was cut)
    code: str = ""  # the error's code, or the client error's name
    request_id: str = ""  # x-request-id of an admitted request
    complete: bool = False  # a whole, valid answer
    retry_after_s: float | None = None  # a refusal's Retry-After


class Gateways:
    """The gateway URLs and which of them are dead; a client of a dead one moves over."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self.dead: set[int] = set()

    def route(self, preferred: int) -> int:
        if preferred not in self.dead:
            return preferred
        alive = [i for i in range(len(self.urls)) if i not in self.dead]
        return alive[0] if alive else preferred


@dataclass
class OpenStreams:
    """Streams admitted (their status line came) and not yet over, per gateway; and every
    request id each gateway admitted."""

    open: list[dict[str, int]] = field(default_factory=lambda: [{}, {}])
    admitted: list[set[str]] = field(default_factory=lambda: [set(), set()])


@dataclass(frozen=True, slots=True)
class TenantLoad:
    """What one tenant's clients send."""

    tenant: str
    key: str
    body: bytes | None  # fixed body, or None: `stream_tokens` draws max_tokens per request
    model: str
    stream: bool = False
    stream_tokens: tuple[int, int] = (0, 0)
    prompt: str = ""

    def next_body(self, rng: random.Random) -> bytes:
        if self.body is not None:
            return self.body
        tokens = rng.randint(*self.stream_tokens)
        return orjson.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": self.prompt}],
                "max_tokens": tokens,
                "stream": True,
            }
        )


def _code_of(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        code = orjson.loads(body)["error"]["code"]
        return str(code)
    return "not_openai"


async def send(
    session: aiohttp.ClientSession,
    url: str,
    load: TenantLoad,
    body: bytes,
    attempt: Attempt,
    streams: OpenStreams | None = None,
) -> None:
    """One request; fills `attempt` in."""
    headers = {"Authorization": f"Bearer {load.key}", "Content-Type": "application/json"}
    try:
        async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
            attempt.answered_us = now_us()
            attempt.status = r.status
            attempt.request_id = r.headers.get("x-request-id", "")
            if r.status != 200:
                attempt.code = _code_of(await r.read())
                with contextlib.suppress(KeyError, ValueError):
                    attempt.retry_after_s = float(r.headers["Retry-After"])
                return
            if not load.stream:
                data = await r.read()
                attempt.complete = bool(orjson.loads(data).get("choices"))
                return
            check = SseCheck()
            if streams is not None:
                streams.open[attempt.gateway][attempt.request_id] = attempt.answered_us
                streams.admitted[attempt.gateway].add(attempt.request_id)
            try:
                async for chunk in r.content.iter_any():
                    check.feed(chunk)
            finally:
                if streams is not None:
                    streams.open[attempt.gateway].pop(attempt.request_id, None)
            attempt.complete = check.valid
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        attempt.code = type(exc).__name__
    finally:
        attempt.ended_us = now_us()


async def impatient_client(
    session: aiohttp.ClientSession,
    gateways: Gateways,
    load: TenantLoad,
    index: int,
    deadline: float,
    pause_s: float,
    log: list[Attempt],
    streams: OpenStreams | None = None,
) -> None:
    """Send until `deadline` (monotonic), with a jittered pause after each answer (a client
    that went again at once would take back the slot its own request just freed)."""
    rng = random.Random(index)
    preferred = index % 2
    for _ in range(MAX_ATTEMPTS):
        if time.monotonic() >= deadline:
            return
        gateway = gateways.route(preferred)
        attempt = Attempt(load.tenant, gateway, now_us())
        log.append(attempt)
        await send(session, gateways.urls[gateway], load, load.next_body(rng), attempt, streams)
        pause = rng.uniform(0.5, 1.5) * pause_s
        await asyncio.sleep(max(0.0, min(pause, deadline - time.monotonic())))


# --- what the samplers see ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineSample:
    at_us: int
    spread_us: int  # between the first and the last engine's answer of this sample
    per_engine: tuple[int, ...]  # running + waiting of each engine
    leases: int  # unexpired leases in Redis at the same moment


async def engine_load(session: aiohttp.ClientSession, url: str) -> int:
    """running + waiting, from an engine's /metrics."""
    async with session.get(url + "/metrics") as response:
        text = await response.read()
    return round(sum(float(v) for _, v in _GAUGE.findall(text)))


@dataclass
class RedisKeys:
    """The limiter's keys of one tenant (layout: fleetserve/tenancy/redis_limiter.py)."""

    prefix: str
    tenant: str

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{{t:{self.tenant}}}:{name}"

    @property
    def rpm(self) -> str:
        return self._key("rpm")

    @property
    def tpm(self) -> str:
        return self._key("tpm")

    @property
    def tpm_sums(self) -> str:
        return self._key("tpm:n")

    @property
    def leases(self) -> str:
        return self._key("conc")

    @property
    def budget_expiries(self) -> str:
        return self._key("budget:exp")


@dataclass
class Watch:
    """Everything the samplers recorded."""

    rpm_admitted: dict[str, int] = field(default_factory=dict)  # request id -> Redis time
    tpm_admitted: dict[str, int] = field(default_factory=dict)
    tpm_window_sums: list[int] = field(default_factory=list)
    engine_samples: list[EngineSample] = field(default_factory=list)
    lease_ids: set[str] = field(default_factory=set)
    # budget: request id -> (first score seen, first poll start, last poll start seen held,
    # first poll end not seen any more)
    budget_seen: dict[str, list[int]] = field(default_factory=dict)
    budget_polls: int = 0


async def _zrange(redis: Redis, key: str) -> list[tuple[str, int]]:
    pairs: list[Any] = await redis.zrange(key, 0, -1, withscores=True)
    return [(str(member), int(score)) for member, score in pairs]


async def harvest(redis: Redis, rpm: RedisKeys, tpm: RedisKeys, watch: Watch) -> None:
    """The RPM and TPM logs' admissions (each stays 60 s: a read a second sees them all)."""
    for member, score in await _zrange(redis, rpm.rpm):
        watch.rpm_admitted.setdefault(member, score)
    for member, score in await _zrange(redis, tpm.tpm):
        watch.tpm_admitted.setdefault(member, score)


async def harvest_until(
    redis: Redis, rpm: RedisKeys, tpm: RedisKeys, watch: Watch, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        await harvest(redis, rpm, tpm, watch)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    await harvest(redis, rpm, tpm, watch)


async def sample_until(
    engines: Sequence[str],
    conc: RedisKeys,
    tpm: RedisKeys,
    watch: Watch,
    every_s: float,
    stop: asyncio.Event,
) -> None:
    """Every `every_s`: each concurrency engine's running + waiting (asked at once), the
    tenant's live leases, and the TPM window's sum as the limiter keeps it. Meant for a
    `BackgroundLoop`, with clients of its own."""
    timeout = aiohttp.ClientTimeout(total=10)
    redis = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                t0 = now_us()
                loads = await asyncio.gather(*(engine_load(session, url) for url in engines))
                t1 = now_us()
                members = await _zrange(redis, conc.leases)
                live = [m for m, expiry in members if expiry > t1]
                watch.lease_ids.update(live)
                total = await redis.hget(tpm.tpm_sums, "sum")
                if total is not None:
                    watch.tpm_window_sums.append(int(total))
                watch.engine_samples.append(EngineSample(t0, t1 - t0, tuple(loads), len(live)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every_s)
    finally:
        await redis.aclose()


class BackgroundLoop:
    """A coroutine on an event loop of its own, in a thread of its own: a sampler's timing
    then waits on the GIL at most, not on the load generator's busy loop."""

    def __init__(self, main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        self._main = main
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10.0):
            raise RuntimeError("the sampler's event loop did not start")

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop it and wait for it; re-raises what it failed with."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RuntimeError(f"the sampler did not stop within {timeout_s:g} s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._main(self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # handed to the thread that stops it
            self._error = exc
        finally:
            self._ready.set()


async def watch_budget(keys: RedisKeys, watch: Watch, every_s: float, stop: asyncio.Event) -> None:
    """The budget's reservations in flight: when each was first seen (its expiry score is
    admission + TTL until a renewal moves it) and between which polls it went. Meant for a
    `BackgroundLoop`."""
    redis = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        while not stop.is_set():
            before = now_us()
            members = dict(await _zrange(redis, keys.budget_expiries))
            after = now_us()
            watch.budget_polls += 1
            for rid, score in members.items():
                seen = watch.budget_seen.get(rid)
                if seen is None:
                    watch.budget_seen[rid] = [score, before, before, 0]
                else:
                    seen[2] = before
            for rid, seen in watch.budget_seen.items():
                if rid not in members and seen[3] == 0:
                    seen[3] = after
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
    finally:
        await redis.aclose()


# --- the crash of one gateway ---------------------------------------------------------------


@dataclass
class LeaseExpiry:
    killed_at_us: int = 0
    held_by_dead: int = 0  # leases the killed gateway held
    redis_gone_s: float | None = None  # its last lease expired (Redis, exact to a poll)
    admin_caught_up_s: float | None = None  # the survivor's admin API counts no more than it holds
    polls: int = 0
    admin_trace: list[tuple[float, int, int]] = field(default_factory=list)  # (s, used, held)


async def follow_dead_leases(
    session: aiohttp.ClientSession,
    redis: Redis,
    conc: RedisKeys,
    survivor_url: str,
    tenant: str,
    survivor: int,
    dead: int,
    streams: OpenStreams,
    result: LeaseExpiry,
    timeout_s: float,
    every_s: float = 0.1,
) -> None:
    """After the kill: poll the tenant's leases in Redis until none of the dead gateway's is
    live, and the survivor's admin API (`GET /admin/tenants/{name}/limits`) until the count
    it reports is no more than the streams the survivor's clients hold."""
    deadline = time.monotonic() + timeout_s
    await asyncio.sleep(0.2)  # the survivor's admitted streams show up at their clients
    members = await _zrange(redis, conc.leases)
    t = now_us()
    suspects = {m for m, expiry in members if expiry > t} - streams.admitted[survivor]
    result.held_by_dead = len(suspects & streams.admitted[dead]) or len(suspects)
    while time.monotonic() < deadline and (
        result.redis_gone_s is None or result.admin_caught_up_s is None
    ):
        result.polls += 1
        t = now_us()
        since_s = (t - result.killed_at_us) / US
        if result.redis_gone_s is None:
            suspects -= streams.admitted[survivor]
            live = {m for m, expiry in await _zrange(redis, conc.leases) if expiry > now_us()}
            if not live & suspects:
                result.redis_gone_s = since_s
        if result.admin_caught_up_s is None:
            used = await admin_concurrent(session, survivor_url, tenant)
            held = len(streams.open[survivor])
            result.admin_trace.append((since_s, used, held))
            if used <= held:
                result.admin_caught_up_s = since_s
        await asyncio.sleep(every_s)


async def admin_concurrent(session: aiohttp.ClientSession, url: str, tenant: str) -> int:
    """The tenant's live lease count as a gateway's admin API reports it."""
    async with session.get(f"{url}/admin/tenants/{tenant}/limits") as response:
        state = orjson.loads(await response.read())
    used = 0
    for key_state in state["keys"].values():
        used = max(used, int(key_state["tenant"]["concurrent"]["used"]))
    return used
