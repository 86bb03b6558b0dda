"""Kill one of three replicas under streaming load: only its in-flight streams may fail.

Three sim engine processes (a10g latency model: a 32-token stream takes ~1.8 s under this
load) behind a gateway process; 50 streaming clients in a closed loop for 30 s and a trickle
of non-streaming requests. At 10 s one engine's process group gets SIGKILL.

The gateway runs as its own process rather than in the test's event loop: the clients parse
about a thousand SSE events a second, and sharing one loop (and one GIL) with them would turn
the test's own load into gateway latency. It also runs `fleetserve gateway` as shipped.

Which replica served a request comes from the gateway's `x-fleetserve-replica` header.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from fleetserve.protocol.sse import SseDecoder
from fleetserve.testing.stack import SimStack, sim_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "sim-llama"
REPLICAS = 3
STREAMS = 50
DURATION_S = 30.0
KILL_AT_S = 10.0
MAX_TOKENS = 32
TRICKLE_CLIENTS = 4
TRICKLE_TOKENS = 16
TRICKLE_PAUSE_S = 0.25
BURST = 9
BURST_BEFORE_KILL_S = 0.5
REQUEST_TIMEOUT_S = 20.0
REPLICA_HEADER = "x-fleetserve-replica"
PROMPT = "Summarise the plot of a long novel."


@dataclass
class Record:
    """One request as the client saw it (times from time.monotonic())."""

    started: float
    want_tokens: int
    ended: float = 0.0
    status: int | None = None
    replica: str | None = None
    tokens: int = 0
    done: bool = False  # a stream ended with [DONE], or a whole answer arrived
    error: dict[str, object] | None = None  # a stream's error event, or an error body
    exception: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.status == 200
            and self.done
            and self.error is None
            and self.exception is None
            and self.tokens == self.want_tokens
        )


def chat(i: int, max_tokens: int, stream: bool) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"client {i}: {PROMPT}"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def one_stream(http: aiohttp.ClientSession, url: str, i: int) -> Record:
    record = Record(time.monotonic(), MAX_TOKENS)
    decoder = SseDecoder()
    try:
        async with http.post(url, json=chat(i, MAX_TOKENS, stream=True)) as response:
            record.status = response.status
            record.replica = response.headers.get(REPLICA_HEADER)
            async for chunk in response.content.iter_any():
                for data in decoder.feed(chunk):
                    if data == b"[DONE]":
                        record.done = True
                        continue
                    event = orjson.loads(data)
                    if "error" in event:
                        record.error = event["error"]
                    elif event["choices"] and event["choices"][0]["delta"].get("content"):
                        record.tokens += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        record.exception = f"{type(exc).__name__}: {exc}"
    record.ended = time.monotonic()
    return record


async def one_request(
    http: aiohttp.ClientSession, url: str, i: int, tokens: int = TRICKLE_TOKENS
) -> Record:
    record = Record(time.monotonic(), tokens)
    try:
        async with http.post(url, json=chat(i, tokens, stream=False)) as response:
            record.status = response.status
            record.replica = response.headers.get(REPLICA_HEADER)
            body = orjson.loads(await response.read())
            record.error = body.get("error")
            record.done = record.error is None
            if record.done:
                record.tokens = body["usage"]["completion_tokens"]
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
        record.exception = f"{type(exc).__name__}: {exc}"
    record.ended = time.monotonic()
    return record


async def closed_loop(
    http: aiohttp.ClientSession, url: str, i: int, until: float, stream: bool
) -> list[Record]:
    records: list[Record] = []
    while time.monotonic() < until:
        if stream:
            records.append(await one_stream(http, url, i))
        else:
            records.append(await one_request(http, url, i))
            await asyncio.sleep(TRICKLE_PAUSE_S)
    return records


async def admin_replica(http: aiohttp.ClientSession, url: str, replica: str) -> dict[str, object]:
    async with http.get(url + "/admin/fleet") as response:
        fleet = await response.json()
    found: dict[str, object] = next(r for r in fleet["replicas"] if r["id"] == replica)
    return found


async def counters(http: aiohttp.ClientSession, url: str, *prefixes: str) -> dict[str, float]:
    """The gateway's Prometheus samples whose names start with a prefix, by label set."""
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            key, _, value = line.rpartition(" ")
            samples[key.removeprefix("fleetserve_")] = float(value)
    return samples


@pytest.fixture
def stack() -> Iterator[SimStack]:
    with sim_stack(REPLICAS, model=MODEL, profile="a10g") as running:
        yield running


@pytest.mark.timeout(90)
async def test_killing_a_replica_fails_only_its_in_flight_streams(stack: SimStack) -> None:
    victim = stack.engines[1]
    victim_id = stack.replica_id(victim)
    chat_url = stack.url + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        until = time.monotonic() + DURATION_S
        loops = [
            *(closed_loop(http, chat_url, i, until, stream=True) for i in range(STREAMS)),
            *(closed_loop(http, chat_url, -i, until, stream=False) for i in range(TRICKLE_CLIENTS)),
        ]
        tasks = [asyncio.create_task(loop) for loop in loops]
        await asyncio.sleep(KILL_AT_S - BURST_BEFORE_KILL_S)
        # Longer non-stream requests just before the kill, so that some are cut mid-way.
        burst = [
            asyncio.create_task(one_request(http, chat_url, 1000 + i, MAX_TOKENS))
            for i in range(BURST)
        ]
        await asyncio.sleep(BURST_BEFORE_KILL_S)
        gateway_in_flight = (await admin_replica(http, stack.url, victim_id))["in_flight"]
        killed_at = time.monotonic()
        victim.crash()
        await asyncio.to_thread(victim.process.wait, 5.0)
        dead_at = time.monotonic()  # from here on nothing can reach the victim
        state = ""
        while state != "unhealthy" and time.monotonic() < dead_at + 5.0:
            state = str((await admin_replica(http, stack.url, victim_id))["state"])
            await asyncio.sleep(0.05)
        unhealthy_after_s = time.monotonic() - killed_at
        results = await asyncio.gather(*tasks)
        burst_results = await asyncio.gather(*burst)
        final_state = (await admin_replica(http, stack.url, victim_id))["state"]
        gateway_counts = await counters(
            http, stack.url, "fleetserve_retries_total{", "fleetserve_upstream_errors_total{"
        )

    streams = [r for batch in results[:STREAMS] for r in batch]
    plain = [r for batch in results[STREAMS:] for r in batch] + burst_results
    failed = [r for r in streams if not r.ok]
    plain_failed = [r for r in plain if not r.ok]
    on_victim = [r for r in streams if r.replica == victim_id and r.started < dead_at]
    in_flight_at_kill = [r for r in on_victim if r.ended > killed_at]
    plain_at_kill = [r for r in plain if r.started < dead_at and r.ended > killed_at]
    after_kill = [r for r in streams if r.started > dead_at]
    durations = [r.ended - r.started for r in streams if r.ok]
    print(
        f"\nkill one of {REPLICAS} replicas at {KILL_AT_S:g}s of {DURATION_S:g}s: "
        f"{len(streams) + len(plain)} requests\n"
        f"  streams: {len(streams)}, failed {len(failed)}; in flight on the killed replica "
        f"{len(in_flight_at_kill)} (gateway's in_flight count for it: {gateway_in_flight}); "
        f"started after the kill {len(after_kill)}, failed "
        f"{sum(not r.ok for r in after_kill)}\n"
        f"  non-stream: {len(plain)}, failed {len(plain_failed)}; in flight at the kill "
        f"{len(plain_at_kill)}\n"
        f"  killed replica marked unhealthy {unhealthy_after_s:.2f}s after SIGKILL\n"
        f"  stream duration p50 {statistics.median(durations):.2f}s, max {max(durations):.2f}s\n"
        + "".join(f"  gateway {key} {value:g}\n" for key, value in sorted(gateway_counts.items()))
    )

    assert not plain_failed, plain_failed[:3]
    assert in_flight_at_kill, "no stream was in flight on the killed replica: fault not exercised"
    assert failed, "streams were in flight on the killed replica, yet none failed"
    for r in failed:  # mid-flight on the victim when it died, ended by an error event
        assert r.exception is None, r
        assert r.status == 200, r
        assert r.replica == victim_id, r
        assert r.started < dead_at, r
        assert r.ended > killed_at, r
        assert not r.done, r
        assert r.error is not None, r
        assert r.error["type"] == "server_error", r
        assert r.error["code"] == "upstream_stream_error", r
        assert r.error["message"], r
    assert len(failed) <= len(in_flight_at_kill)
    assert after_kill
    assert all(r.ok for r in after_kill)
    assert final_state == "unhealthy"
